#!/usr/bin/env bash
# Sparse OPT-125m inference on C4 validation requests; prints the perplexity.
#   SPARSE_MODE, SPRARSE_PATH (default $ROOT/sparse_predictor/checkpoints/opt_125m_c4), MLP_KEEP,
#   ATT_KEEP, SPARSE_LAYERS as in run_infer_llama_3b_c4_sparse.sh; see run_infer_common.sh.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_infer_common.sh"
export SPRARSE_PATH="$(from_root "${SPRARSE_PATH:-sparse_predictor/checkpoints/opt_125m_c4}")"
run_pipeline "${MODEL_PATH:-pretrained_models/opt-125m}" opt-ml-att-sparse \
  "${DATA:-data/c4_val.jsonl}" "${OUTPUT:-data/output_c4_val_opt_125m_sparse.jsonl}" \
  --sparse-mode "${SPARSE_MODE:-predicted}" ${MLP_KEEP:+--mlp-keep "$MLP_KEEP"} \
  ${ATT_KEEP:+--att-keep "$ATT_KEEP"} ${SPARSE_LAYERS:+--sparse-layers "$SPARSE_LAYERS"} "$@"
