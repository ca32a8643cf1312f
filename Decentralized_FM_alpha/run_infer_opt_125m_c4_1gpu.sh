#!/usr/bin/env bash
# Dense OPT-125m inference on C4 validation requests (perplexity), one stage on one GPU.
#   MODEL_PATH  converted checkpoint (default $ROOT/pretrained_models/opt-125m;
#               python convert_opt_checkpoint.py --model-name facebook/opt-125m --save-path ...)
#   DATA        request file (default $ROOT/data/c4_val.jsonl; python c4_val/getdata.py)
#   OUTPUT      result file (default $ROOT/data/output_c4_val_opt_125m.jsonl)
#   DEVICE=cpu runs the same on a CPU machine; see run_infer_common.sh for the rest.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_infer_common.sh"
run_pipeline "${MODEL_PATH:-pretrained_models/opt-125m}" "${MODEL_TYPE:-opt}" \
  "${DATA:-data/c4_val.jsonl}" "${OUTPUT:-data/output_c4_val_opt_125m.jsonl}" "$@"
