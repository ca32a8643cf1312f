# Shared by the run_infer_*.sh scripts (source it; do not run it).
# Paths resolve from the repository root; the runner runs from inside Decentralized_FM_alpha/
# (as upstream), whatever the caller's working directory.
#
# Environment (all optional):
#   PYTHON      interpreter (default: $ROOT/.venv/bin/python if it exists, else python3)
#   DEVICE      auto | cuda | cpu (default auto: cuda when available)
#   STAGES      pipeline stages; more than one starts them with torchrun --nproc-per-node
#   BATCH_SIZE, MICRO_BATCH_SIZE, INPUT_SEQ_LENGTH, EXTRA_ARGS (appended to the runner's flags)

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

from_root() {  # absolute path: as given if absolute, else relative to the repository root
  case "$1" in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$ROOT/$1" ;;
  esac
}

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
DEVICE="${DEVICE:-auto}"
STAGES="${STAGES:-1}"
BATCH_SIZE="${BATCH_SIZE:-8}"
MICRO_BATCH_SIZE="${MICRO_BATCH_SIZE:-4}"
INPUT_SEQ_LENGTH="${INPUT_SEQ_LENGTH:-2048}"

# run_pipeline MODEL_PATH MODEL_TYPE DATA OUTPUT [more runner flags...]
run_pipeline() {
  local model_path data output model_type
  model_path="$(from_root "$1")"; model_type="$2"; data="$(from_root "$3")"; output="$(from_root "$4")"
  shift 4
  if [ ! -f "$model_path/config.json" ]; then
    echo "error: no converted checkpoint at $model_path (set MODEL_PATH, or convert one with" >&2
    echo "       python convert_${model_type%%-*}_checkpoint.py --model-name HUB_ID --save-path $model_path)" >&2
    return 1
  fi
  if [ ! -f "$data" ]; then
    echo "error: no request file at $data (set DATA, or write one with" >&2
    echo "       $PYTHON $HERE/c4_val/getdata.py --output $data)" >&2
    return 1
  fi
  local args=(
    --model-name "$model_path" --model-type "$model_type"
    --infer-data "$data" --output-path "$output"
    --device "$DEVICE" --fp16 --seed 42
    --batch-size "$BATCH_SIZE" --token-micro-batch-size "$MICRO_BATCH_SIZE"
    --input-seq-length "$INPUT_SEQ_LENGTH"
    --pp-mode pipe_sync_sample_mask_token_pipe
    --pipeline-group-size "$STAGES" --data-group-size 1
  )
  # shellcheck disable=SC2206
  local extra=(${EXTRA_ARGS:-})
  echo "running $model_type from $model_path on $data ($STAGES stage(s), device $DEVICE)"
  cd "$HERE"
  if [ "$STAGES" -le 1 ]; then
    "$PYTHON" dist_inference_runner.py "${args[@]}" --world-size 1 --rank 0 "$@" "${extra[@]}"
  else
    if [ -z "${OMP_NUM_THREADS:-}" ]; then  # share the CPU cores between the stages
      OMP_NUM_THREADS=$(( $(nproc) / STAGES )); [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
      export OMP_NUM_THREADS
    fi
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$STAGES" \
      dist_inference_runner.py "${args[@]}" --world-size "$STAGES" "$@" "${extra[@]}"
  fi
  "$PYTHON" -m dejavu_llama.task_datasets.perplexity "$output"
}
