#!/usr/bin/env bash
# Collect predictor training data from Llama-3.2-3B on C4 training requests (--model-type llama-save).
#   MODEL_PATH  converted checkpoint (default $ROOT/pretrained_models/llama-3.2-3b)
#   DATA        request file (default $ROOT/data/c4_train.jsonl; python c4_train/getdata.py)
#   DATA_PATH   dump folder (default $ROOT/data/llama_3b_c4), SP_ROWS capacity (default 400000)
#   SP_RESUME=1 appends to an existing dump; see run_infer_common.sh for DEVICE, STAGES, ...
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_infer_common.sh"
DATA_PATH="$(from_root "${DATA_PATH:-data/llama_3b_c4}")"
export DATA_PATH
run_pipeline "${MODEL_PATH:-pretrained_models/llama-3.2-3b}" llama-save \
  "${DATA:-data/c4_train.jsonl}" "${OUTPUT:-data/output_c4_train_llama_3b_collect.jsonl}" \
  --sp-data-path "$DATA_PATH" --sp-rows "${SP_ROWS:-400000}" ${SP_RESUME:+--sp-resume} "$@"
