#!/usr/bin/env bash
# Llama-3.2-3B on C4 validation requests over a pipeline of STAGES (default 2) stages on one
# machine: torchrun --nproc-per-node $STAGES, stage s on GPU s (or CPU with DEVICE=cpu).
# Across machines, run dist_inference_runner.py once per rank with --rank R --world-size N
# --pipeline-group-size N --dist-url tcp://RANK0_HOST:PORT (or torchrun --nnodes ...).
#   MODEL_PATH, DATA, OUTPUT, DEVICE as in run_infer_llama_3b_c4_1gpu.sh.
set -euo pipefail
export STAGES="${STAGES:-2}"
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/run_infer_common.sh"
run_pipeline "${MODEL_PATH:-pretrained_models/llama-3.2-3b}" "${MODEL_TYPE:-llama}" \
  "${DATA:-data/c4_val.jsonl}" "${OUTPUT:-data/output_c4_val_llama_3b_${STAGES}stage.jsonl}" "$@"
