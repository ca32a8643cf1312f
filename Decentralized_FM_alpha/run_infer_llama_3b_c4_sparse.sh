#!/usr/bin/env bash
# Sparse Llama-3.2-3B inference on C4 validation requests; prints the perplexity.
#   SPARSE_MODE predicted | oracle | dense (default predicted)
#   SPRARSE_PATH predictor folder (default $ROOT/sparse_predictor/checkpoints/llama_3b_c4)
#   MLP_KEEP / ATT_KEEP kept fraction (<= 1) or count (upstream's TOPK / ATTN_TOPK_1 also work)
#   SPARSE_LAYERS 'all', '4-27', ... (upstream's LAYER=n means n onwards); see run_infer_common.sh.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_infer_common.sh"
export SPRARSE_PATH="$(from_root "${SPRARSE_PATH:-sparse_predictor/checkpoints/llama_3b_c4}")"
run_pipeline "${MODEL_PATH:-pretrained_models/llama-3.2-3b}" llama-ml-att-sparse \
  "${DATA:-data/c4_val.jsonl}" "${OUTPUT:-data/output_c4_val_llama_3b_sparse.jsonl}" \
  --sparse-mode "${SPARSE_MODE:-predicted}" ${MLP_KEEP:+--mlp-keep "$MLP_KEEP"} \
  ${ATT_KEEP:+--att-keep "$ATT_KEEP"} ${SPARSE_LAYERS:+--sparse-layers "$SPARSE_LAYERS"} "$@"
