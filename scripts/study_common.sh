# What the study scripts share (source it; do not run it): the environment, the model variables,
# progress lines, the conversion of the model, the perplexity log's lines and parallel runs.
#   MODEL       'smollm2' (the embedded GGUF), a hub id or a local folder (default smollm2)
#   MODEL_TYPE  llama | opt (default llama); NAME, CHECKPOINT, VENV, PYTHON, HF_TOKEN
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$VENV/bin/python}"
export PYTHON
INFER="$ROOT/Decentralized_FM_alpha"

MODEL="${MODEL:-smollm2}"
MODEL_TYPE="${MODEL_TYPE:-llama}"
NAME="${NAME:-$(basename "${MODEL%/}" | tr '[:upper:]' '[:lower:]')}"
[ "$MODEL" = smollm2 ] && NAME="${NAME/smollm2/smollm2-135m-instruct}"
CHECKPOINT="${CHECKPOINT:-$ROOT/pretrained_models/$NAME}"
# What the report says the weights are: the embedded model is de-quantized from a 4-bit GGUF.
MODEL_LABEL="$MODEL"
[ "$MODEL" = smollm2 ] && MODEL_LABEL="HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF Q4_1, de-quantized to float32)"

started=$SECONDS
step() { echo; echo "=== [$(( (SECONDS - started) / 60 ))m$(( (SECONDS - started) % 60 ))s] $*"; }

convert_model() {  # MODEL -> CHECKPOINT (skipped when already converted); sets LAYERS_TOTAL
  (
    cd "$INFER"
    if [ "$MODEL" = smollm2 ]; then
      local gguf_dir gguf_file
      gguf_dir="$("$PYTHON" -c 'from dejavu_common.helpers import embedded_gguf; print(embedded_gguf()[0])')"
      gguf_file="$("$PYTHON" -c 'from dejavu_common.helpers import embedded_gguf; print(embedded_gguf()[1])')"
      "$PYTHON" "convert_${MODEL_TYPE}_checkpoint.py" --model-name "$gguf_dir" --gguf-file "$gguf_file" \
        --save-path "$CHECKPOINT"
    else
      "$PYTHON" "convert_${MODEL_TYPE}_checkpoint.py" --model-name "$MODEL" --save-path "$CHECKPOINT" \
        ${HF_TOKEN:+--auth-token "$HF_TOKEN"}
    fi
  )
  LAYERS_TOTAL="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' \
    "$CHECKPOINT/config.json")"
}

# record LOG RESULTS [KEY=VALUE...] [--stats FILE]: one line of a study's perplexity log
# (dejavu_study/record.py: the perplexity of RESULTS and, with --stats, the kept fraction reached and
# the MLP bytes it costs).
record() { "$PYTHON" -m dejavu_study.record "$@"; }

# Runs of a sweep in parallel: `start_job NAME COMMAND...` runs COMMAND in the background (its
# output in $RUN/logs/NAME.log) once fewer than JOBS run; `wait_jobs` waits for all of them and
# fails, after the others finish, if any failed (the tail of its log shown). Each job gets
# JOB_THREADS threads: on a CPU, two one-thread runs overlap their start-up and single-threaded
# parts and finish a sweep about a fifth sooner than one run after another at two threads.
JOBS="${JOBS:-$([ "${DEVICE:-cpu}" = cpu ] && nproc || echo 1)}"
JOB_THREADS="${JOB_THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}"
job_pids=(); job_names=(); job_failures=0
start_job() {
  local name="$1"; shift
  mkdir -p "$RUN/logs"
  ( export OMP_NUM_THREADS="$JOB_THREADS"; "$@" ) > "$RUN/logs/$name.log" 2>&1 &
  job_pids+=("$!"); job_names+=("$name")
  while [ "${#job_pids[@]}" -ge "$JOBS" ]; do wait_first_job; done
}
wait_first_job() {
  local pid="${job_pids[0]}" name="${job_names[0]}"
  job_pids=("${job_pids[@]:1}"); job_names=("${job_names[@]:1}")
  if wait "$pid"; then
    echo "  $name: $(grep -v '^[[:space:]]*$' "$RUN/logs/$name.log" | tail -n 1 | cut -c1-200)"
  else
    job_failures=$(( job_failures + 1 ))
    echo "  $name FAILED; the end of $RUN/logs/$name.log:"; tail -n 15 "$RUN/logs/$name.log" | sed 's/^/    /'
  fi
}
wait_jobs() {
  while [ "${#job_pids[@]}" -gt 0 ]; do wait_first_job; done
  if [ "$job_failures" -gt 0 ]; then
    echo "$job_failures run(s) failed (logs in $RUN/logs)" >&2; job_failures=0; return 1
  fi
}
