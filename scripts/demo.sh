#!/usr/bin/env bash
# The whole study in one command, on the embedded SmolLM2-135M-Instruct with offline English text:
#   convert -> dense perplexity through a 2-stage pipeline -> collect activations -> train the
#   MLP and attention predictors of every layer (both input modes) -> sparse perplexity
#   (oracle and predicted) at several kept fractions -> report.
#
# The same study on a GPU server with real models and more data, e.g.
#   MODEL=meta-llama/Llama-3.2-3B MODEL_TYPE=llama DEVICE=cuda ONLINE=1 TRAIN_DOCS=2000 VAL_DOCS=500 \
#     HF_TOKEN=... bash scripts/demo.sh
#   MODEL=facebook/opt-125m MODEL_TYPE=opt DEVICE=cuda ONLINE=1 bash scripts/demo.sh
# and then `python scripts/report.py runs/<llama> runs/<opt>` overlays the two.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-$VENV/bin/python}"
export PYTHON

MODEL="${MODEL:-smollm2}"                     # 'smollm2' (embedded GGUF), a hub id or a local folder
MODEL_TYPE="${MODEL_TYPE:-llama}"             # llama | opt
NAME="${NAME:-$(basename "${MODEL%/}" | tr '[:upper:]' '[:lower:]')}"
[ "$MODEL" = smollm2 ] && NAME="${NAME/smollm2/smollm2-135m-instruct}"
CHECKPOINT="${CHECKPOINT:-$ROOT/pretrained_models/$NAME}"
RUN="${RUN:-$ROOT/runs/$NAME}"
DEVICE="${DEVICE:-cpu}"
STAGES="${STAGES:-2}"                         # stages of the dense perplexity run
TRAIN_DOCS="${TRAIN_DOCS:-59}"
VAL_DOCS="${VAL_DOCS:-19}"
MAX_TOKENS_PER_DOC="${MAX_TOKENS_PER_DOC:-256}"
KEEP_FRACTIONS="${KEEP_FRACTIONS:-0.5 0.25 0.1}"           # MLP neurons kept (attention dense)
ATT_KEEP_FRACTIONS="${ATT_KEEP_FRACTIONS:-0.75 0.5 0.25}"   # heads kept (MLP dense)
ONLINE="${ONLINE:-0}"                         # 1: request files from C4 on the hub
RANDOM_WEIGHTS="${RANDOM_WEIGHTS:-0}"         # 1: the model is random-init (a tooling check): the report says "not evidence"
EPOCHS="${EPOCHS:-4}"
BATCH_SIZE="${BATCH_SIZE:-4}"
PORT="${PORT:-29517}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

INFER="$ROOT/Decentralized_FM_alpha"
mkdir -p "$RUN"
started=$SECONDS
step() { echo; echo "=== [$(( (SECONDS - started) / 60 ))m$(( (SECONDS - started) % 60 ))s] $*"; }

step "1/7 convert $MODEL -> $CHECKPOINT"
cd "$INFER"
converter="convert_${MODEL_TYPE}_checkpoint.py"
if [ "$MODEL" = smollm2 ]; then
  gguf_dir="$("$PYTHON" -c 'from dejavu_common.helpers import embedded_gguf; print(embedded_gguf()[0])')"
  gguf_file="$("$PYTHON" -c 'from dejavu_common.helpers import embedded_gguf; print(embedded_gguf()[1])')"
  "$PYTHON" "$converter" --model-name "$gguf_dir" --gguf-file "$gguf_file" --save-path "$CHECKPOINT"
else
  "$PYTHON" "$converter" --model-name "$MODEL" --save-path "$CHECKPOINT" ${HF_TOKEN:+--auth-token "$HF_TOKEN"}
fi
LAYERS_TOTAL="$("$PYTHON" -c 'import json,sys; print(json.load(open(sys.argv[1]))["num_hidden_layers"])' "$CHECKPOINT/config.json")"

step "2/7 request files (train: $TRAIN_DOCS documents, validation: $VAL_DOCS)"
source_flag=(--offline)
[ "$ONLINE" = 1 ] && source_flag=()
"$PYTHON" c4_train/getdata.py "${source_flag[@]}" --num-docs "$TRAIN_DOCS" --output "$RUN/c4_train.jsonl"
"$PYTHON" c4_val/getdata.py "${source_flag[@]}" --num-docs "$VAL_DOCS" --output "$RUN/c4_val.jsonl"

# run_pipeline STAGES MODEL_TYPE REQUESTS RESULTS [extra runner flags...]
run_pipeline() {
  local stages="$1" type="$2" requests="$3" results="$4"; shift 4
  local common=(--model-name "$CHECKPOINT" --model-type "$type" --infer-data "$requests"
                --output-path "$results" --device "$DEVICE" --batch-size "$BATCH_SIZE"
                --input-seq-length "$MAX_TOKENS_PER_DOC" --pipeline-group-size "$stages"
                --num-layers $(( LAYERS_TOTAL / stages )) --max-layers "$LAYERS_TOTAL")
  if [ "$stages" = 1 ]; then
    "$PYTHON" dist_inference_runner.py "${common[@]}" "$@"
  else
    OMP_NUM_THREADS=$(( OMP_NUM_THREADS / stages > 0 ? OMP_NUM_THREADS / stages : 1 )) \
      "$PYTHON" -m torch.distributed.run --nproc-per-node "$stages" --master-port "$PORT" \
      dist_inference_runner.py "${common[@]}" "$@"
  fi
}
record() {  # record MODE MLP_KEEP ATT_KEEP RESULTS
  "$PYTHON" - "$@" "$RUN/perplexity.jsonl" <<'EOF'
import json, subprocess, sys
mode, mlp_keep, att_keep, results, out = sys.argv[1:]
from dejavu_llama.task_datasets.perplexity import perplexity_of_file
figures = perplexity_of_file(results)
value, tokens = figures["perplexity"], figures["tokens"]
line = {"mode": mode, "mlp_keep": None if mlp_keep == "-" else float(mlp_keep),
        "att_keep": None if att_keep == "-" else float(att_keep), "perplexity": value, "tokens": tokens,
        "result_file": results}
with open(out, "a") as handle:
    handle.write(json.dumps(line) + "\n")
print(f"perplexity {mode} mlp_keep={mlp_keep} att_keep={att_keep}: {value:.4f} over {tokens} tokens")
EOF
}

rm -f "$RUN/perplexity.jsonl"
step "3/7 dense perplexity through a $STAGES-stage pipeline"
run_pipeline "$STAGES" "$MODEL_TYPE" "$RUN/c4_val.jsonl" "$RUN/results_dense.jsonl"
record dense - - "$RUN/results_dense.jsonl"

step "4/7 collect activations ($MODEL_TYPE-save) from the training documents"
run_pipeline 1 "$MODEL_TYPE-save" "$RUN/c4_train.jsonl" "$RUN/results_collect.jsonl" \
  --sp-data-path "$RUN/dump" --sp-rows "${SP_ROWS:-400000}" --sp-force

step "5/7 train predictors for all $LAYERS_TOTAL layers (MLP and attention; input same and prev)"
suffix=""; [ "$MODEL_TYPE" = llama ] && suffix="_llama"
for input in same prev; do
  for kind in mlp att; do
    DATA_PATH="$RUN/dump" CKPT_DIR="$RUN/predictors/$input" INPUT="$input" EPOCHS="$EPOCHS" DEVICE="$DEVICE" \
      bash "$ROOT/sparse_predictor/run_c4_${kind}${suffix}.sh" || echo "some $kind layers failed (input $input); see above"
  done
done

# One component at a time, so the report can tell the MLP's share from the attention's.
step "6/7 sparse perplexity, oracle and predicted: MLP kept $KEEP_FRACTIONS; heads kept $ATT_KEEP_FRACTIONS"
for keep in $KEEP_FRACTIONS; do
  for mode in oracle predicted; do
    out="$RUN/results_${mode}_mlp_${keep}.jsonl"
    run_pipeline 1 "$MODEL_TYPE-ml-att-sparse" "$RUN/c4_val.jsonl" "$out" --sparse-mode "$mode" \
      --mlp-keep "$keep" --sparse-attention off --sparse-path "$RUN/predictors/same"
    record "$mode" "$keep" - "$out"
  done
done
for keep in $ATT_KEEP_FRACTIONS; do
  for mode in oracle predicted; do
    out="$RUN/results_${mode}_att_${keep}.jsonl"
    run_pipeline 1 "$MODEL_TYPE-ml-att-sparse" "$RUN/c4_val.jsonl" "$out" --sparse-mode "$mode" \
      --att-keep "$keep" --sparse-mlp off --sparse-path "$RUN/predictors/same"
    record "$mode" - "$keep" "$out"
  done
done

step "7/7 report"
"$PYTHON" - "$RUN" "$NAME" "$MODEL" "$MODEL_TYPE" "$CHECKPOINT" "$STAGES" "$DEVICE" "$VAL_DOCS" "$ONLINE" "$RANDOM_WEIGHTS" <<'EOF'
import json, os, sys
run, name, model, model_type, checkpoint, stages, device, val_docs, online, random_weights = sys.argv[1:]
if model == "smollm2":  # say what the weights are: de-quantized from the embedded 4-bit GGUF
    model = "HuggingFaceTB/SmolLM2-135M-Instruct (embedded GGUF Q4_1, de-quantized to float32)"
source = "C4 from the hub" if online == "1" else "built-in offline English documents"
study = {"name": name, "model": model, "model_type": model_type, "checkpoint": checkpoint,
         "data": f"{source}: {os.path.join(run, 'c4_train.jsonl')}",
         "validation_data": os.path.join(run, "c4_val.jsonl"),
         "documents": sum(1 for _ in open(os.path.join(run, "c4_train.jsonl"))),
         "validation_documents": int(val_docs), "random_weights": random_weights == "1",
         "stages": int(stages), "device": device,
         "notes": "MLP predictors read mlp_x; perplexity runs use the input-'same' predictors."}
tmp = os.path.join(run, ".study.json.tmp")
json.dump(study, open(tmp, "w"), indent=2)
os.replace(tmp, os.path.join(run, "study.json"))
EOF
"$PYTHON" "$ROOT/scripts/report.py" "$RUN" --out "$ROOT/reports/$NAME"
step "done in $(( (SECONDS - started) / 60 )) min; report: $ROOT/reports/$NAME/report.md"
