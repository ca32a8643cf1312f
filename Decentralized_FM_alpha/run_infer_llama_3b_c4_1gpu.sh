#!/usr/bin/env bash
# Dense Llama-3.2-3B inference on C4 validation requests (perplexity), one stage on one GPU.
# (Llama 3.2 3B has 28 layers; --num-layers/--max-layers default to the checkpoint's count.)
#   MODEL_PATH  converted checkpoint (default $ROOT/pretrained_models/llama-3.2-3b;
#               python convert_llama_checkpoint.py --model-name meta-llama/Llama-3.2-3B --save-path ...)
#   DATA        request file (default $ROOT/data/c4_val.jsonl; python c4_val/getdata.py)
#   OUTPUT      result file (default $ROOT/data/output_c4_val_llama_3b.jsonl)
#   DEVICE=cpu runs the same on a CPU machine; see run_infer_common.sh for the rest.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_infer_common.sh"
run_pipeline "${MODEL_PATH:-pretrained_models/llama-3.2-3b}" "${MODEL_TYPE:-llama}" \
  "${DATA:-data/c4_val.jsonl}" "${OUTPUT:-data/output_c4_val_llama_3b.jsonl}" "$@"
