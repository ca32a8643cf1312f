#!/usr/bin/env bash
# Collect predictor training data from OPT-125m on C4 training requests (--model-type opt-save).
#   MODEL_PATH (default $ROOT/pretrained_models/opt-125m), DATA (default $ROOT/data/c4_train.jsonl),
#   DATA_PATH dump folder (default $ROOT/data/opt_125m_c4), SP_ROWS, SP_RESUME=1; see run_infer_common.sh.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_infer_common.sh"
DATA_PATH="$(from_root "${DATA_PATH:-data/opt_125m_c4}")"
export DATA_PATH
run_pipeline "${MODEL_PATH:-pretrained_models/opt-125m}" opt-save \
  "${DATA:-data/c4_train.jsonl}" "${OUTPUT:-data/output_c4_train_opt_125m_collect.jsonl}" \
  --sp-data-path "$DATA_PATH" --sp-rows "${SP_ROWS:-400000}" ${SP_RESUME:+--sp-resume} "$@"
