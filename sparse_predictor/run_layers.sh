#!/usr/bin/env bash
# Train predictors for every layer of a dump, then print a summary table.
# Used by run_c4_mlp.sh, run_c4_att.sh, run_c4_mlp_llama.sh and run_c4_att_llama.sh:
#     run_layers.sh <entry point .py> <mlp|att> [extra arguments for the entry point]
#
# GPUs (nvidia-smi; CUDA_VISIBLE_DEVICES limits them): one process per GPU, layers dealt out
# round-robin, logs in $CKPT_DIR/logs/. No GPU: CPU_WORKERS processes (default 1), the layers
# dealt out the same way, each on THREADS threads (default: the cores / CPU_WORKERS), their
# lines on the terminal and in the logs. A small predictor's products are too small to keep two
# threads busy: on 2 cores two 1-thread workers trained SmolLM2's MLP predictors 1.4x faster than
# one 2-thread process. One worker (torch imported once) suits a machine with few layers or
# little memory. A failed layer is reported and the others still run; the exit status is 1
# when any layer failed.
#
# Environment (all optional except DATA_PATH):
#   DATA_PATH   dump folder; a relative path is taken from the current directory, else the repo root
#   CKPT_DIR    checkpoints and metrics (default: sparse_predictor/checkpoints/<dump folder name>)
#   PYTHON      default: the repository's .venv/bin/python if present, else python3
#   LAYERS      layers to train, e.g. "0-3,9" (default: every layer in meta.json)
#   NUM_GPUS    use at most this many GPUs (0, or DEVICE=cpu, forces the CPU path)
#   CPU_WORKERS training processes on the CPU path (default 1)
#   LABEL K THRESHOLD TARGET_SPARSITY INPUT D EPOCHS LR BATCH_SIZE SEED VAL_FRACTION MAX_ROWS TRAIN_ROWS
#   MODEL DATASET DEVICE THREADS PATIENCE SELECT_METRIC RUN_ID   map to the entry point's flags
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
if [ $# -lt 2 ]; then
  echo "usage: $0 <entry point .py> <mlp|att> [entry point arguments]" >&2
  exit 2
fi
ENTRY="$HERE/$1"; KIND="$2"; shift 2

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -z "${DATA_PATH:-}" ]; then
  echo "run_layers: set DATA_PATH to the dump folder (e.g. DATA_PATH=$ROOT/data/<dump>)" >&2
  exit 1
fi
if [ ! -e "$DATA_PATH" ] && [ -e "$ROOT/$DATA_PATH" ]; then DATA_PATH="$ROOT/$DATA_PATH"; fi
DATA_PATH="$(cd "$DATA_PATH" 2>/dev/null && pwd || echo "$DATA_PATH")"
CKPT_DIR="${CKPT_DIR:-$HERE/checkpoints/$(basename "$DATA_PATH")}"
mkdir -p "$CKPT_DIR"
CKPT_DIR="$(cd "$CKPT_DIR" && pwd)"
RUN_ID="${RUN_ID:-$(date +%Y%m%d-%H%M%S)-$$}"

args=(--data-path "$DATA_PATH" --ckpt-dir "$CKPT_DIR" --run-id "$RUN_ID")
add() { if [ -n "${!1:-}" ]; then args+=("$2" "${!1}"); fi; }
add LABEL --label; add K --k; add THRESHOLD --threshold; add TARGET_SPARSITY --target-sparsity
add INPUT --input; add D --D; add EPOCHS --epochs; add LR --lr; add BATCH_SIZE --batch_size
add SEED --seed; add VAL_FRACTION --val-fraction; add MAX_ROWS --max-rows; add TRAIN_ROWS --train-rows; add MODEL --model
add DATASET --dataset; add THREADS --threads; add PATIENCE --patience; add SELECT_METRIC --select-metric

# The layer list comes from meta.json (this also reports a missing or broken dump early).
layer_spec="${LAYERS:-all}"
if ! layer_list="$("$PYTHON" "$ENTRY" --data-path "$DATA_PATH" --L "$layer_spec" --list-layers)"; then
  echo "run_layers: cannot read the dump at $DATA_PATH or bad LAYERS (see the error above)" >&2
  exit 1
fi
read -r -a todo <<<"$layer_list"

gpus=()
if [ "${NUM_GPUS:-}" != "0" ] && [ "${DEVICE:-}" != cpu ] && command -v nvidia-smi >/dev/null 2>&1; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=',' read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
  else
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null)
  fi
  if [ -n "${NUM_GPUS:-}" ] && [ "${#gpus[@]}" -gt "$NUM_GPUS" ]; then gpus=("${gpus[@]:0:$NUM_GPUS}"); fi
  # nvidia-smi can see GPUs that a CPU-only torch build cannot use
  if [ "${#gpus[@]}" -gt 0 ] && ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "run_layers: nvidia-smi lists GPUs but torch cannot use CUDA; training on the CPU" >&2
    gpus=()
  fi
fi

cpu_workers="${CPU_WORKERS:-1}"
if ! [[ "$cpu_workers" =~ ^[1-9][0-9]*$ ]]; then
  echo "run_layers: CPU_WORKERS must be a whole number of at least 1, got '$cpu_workers'" >&2
  exit 2
fi
workers=()  # one process each: "gpu <index>" or "cpu <number>"
if [ "${#gpus[@]}" -gt 0 ]; then
  for g in "${gpus[@]}"; do workers+=("gpu $g"); done
elif [ "$cpu_workers" -gt 1 ] && [ "${DEVICE:-auto}" != cuda ]; then
  [ "$cpu_workers" -gt "${#todo[@]}" ] && cpu_workers="${#todo[@]}"
  for ((w = 0; w < cpu_workers; w++)); do workers+=("cpu $w"); done
  cores="$(nproc 2>/dev/null || echo 1)"
  threads="${THREADS:-$(( cores / cpu_workers > 0 ? cores / cpu_workers : 1 ))}"
fi

echo "run_layers: $KIND predictors, $(basename "$ENTRY"), dump $DATA_PATH, layers $layer_spec, run $RUN_ID"
echo "run_layers: checkpoints and metrics -> $CKPT_DIR"
started=$SECONDS
status=0
if [ "${#workers[@]}" -gt 0 ]; then
  # Deal the layers out round-robin, one process per worker.
  mkdir -p "$CKPT_DIR/logs"
  pids=(); names=()
  for i in "${!workers[@]}"; do
    mine=()
    for j in "${!todo[@]}"; do
      if [ $((j % ${#workers[@]})) -eq "$i" ]; then mine+=("${todo[$j]}"); fi
    done
    [ "${#mine[@]}" -eq 0 ] && continue
    list="$(IFS=,; echo "${mine[*]}")"
    read -r where index <<<"${workers[$i]}"
    log="$CKPT_DIR/logs/${KIND}_${where}${index}_${RUN_ID}.log"
    if [ "$where" = gpu ]; then
      echo "run_layers: GPU $index: layers $list (log $log)"
      CUDA_VISIBLE_DEVICES="$index" "$PYTHON" "$ENTRY" "${args[@]}" --L "$list" --device cuda \
        --no-progress "$@" >"$log" 2>&1 &
      names+=("GPU $index (layers $list)")
    else
      echo "run_layers: CPU worker $index: layers $list on $threads thread(s) (log $log)"
      "$PYTHON" "$ENTRY" "${args[@]}" --L "$list" --device cpu --threads "$threads" --no-progress "$@" \
        > >(tee "$log") 2>&1 &
      names+=("CPU worker $index (layers $list)")
    fi
    pids+=($!)
  done
  trap 'kill "${pids[@]}" 2>/dev/null; exit 130' INT TERM
  for k in "${!pids[@]}"; do
    if wait "${pids[$k]}"; then
      echo "run_layers: ${names[$k]} done ($((SECONDS - started))s)"
    else
      echo "run_layers: ${names[$k]} had failures, see its log" >&2
      status=1
    fi
  done
else
  dev=()
  if [ -n "${DEVICE:-}" ]; then dev=(--device "$DEVICE"); fi
  "$PYTHON" "$ENTRY" "${args[@]}" --L "$(IFS=,; echo "${todo[*]}")" "${dev[@]}" "$@" || status=1
fi

echo "run_layers: finished in $((SECONDS - started))s"
"$PYTHON" "$HERE/summarize.py" --ckpt-dir "$CKPT_DIR" --kind "$KIND" --run-id "$RUN_ID" \
  --layers "${todo[*]}" || status=1
exit $status
