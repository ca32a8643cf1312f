#!/usr/bin/env bash
# Controls for the MLP predictors on the scaling study's layers: predictor capacity (low-rank D,
# full-rank linear, a ReLU MLP), the label (top-k of |SiLU(gate)*up|, gate > 0, top-k of
# |SiLU(gate)|), the activation function (a ReLU stand-in fitted layer by layer, attention, RoPE
# and the residual stream held as they are), and drift against depth. Every predictor set is also
# scored on a dump of the validation passages (documents it never saw). Perplexity runs sparsify
# the MLP of those layers only (the others dense), predicted and oracle, as scripts/scaling.sh.
#
#   REUSE_DUMP=1 bash scripts/controls.sh          # reuse runs/scaling-<name>/dump and its request files
#   RESUME=1 REUSE_DUMP=1 bash scripts/controls.sh # keep what a stopped run finished (dumps, predictor
#                                                  # sets with every layer, ReLU fits, perplexity results)
#   DRY_RUN=1 bash scripts/controls.sh             # print the commands, run nothing
#
# Every variable below can be set in the environment. Outputs: $CONTROLS (predictors, ReLU
# checkpoints and dumps, results, controls.jsonl) and $OUT (controls.md, summary.json, PNGs).
set -euo pipefail
DRY_RUN="${DRY_RUN:-0}"
if [ "$DRY_RUN" = 1 ]; then
  # only the variables of study_common.sh; no setup, conversion or Python
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
  INFER="$ROOT/Decentralized_FM_alpha"; MODEL="${MODEL:-smollm2}"; MODEL_TYPE="${MODEL_TYPE:-llama}"
  NAME="${NAME:-smollm2-135m-instruct}"; CHECKPOINT="${CHECKPOINT:-$ROOT/pretrained_models/$NAME}"
  MODEL_LABEL="$MODEL"; started=$SECONDS
  step() { echo; echo "=== $*"; }
  convert_model() { LAYERS_TOTAL="${LAYERS_TOTAL:-30}"; }
else
  source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/study_common.sh"
fi
x() { if [ "$DRY_RUN" = 1 ]; then echo "+ $*"; else "$@"; fi; }

RUN="${RUN:-$ROOT/runs/scaling-$NAME}"        # the scaling study's run: dump/, train.jsonl, val.jsonl
CONTROLS="${CONTROLS:-$RUN/controls}"
OUT="${OUT:-$ROOT/reports/controls-$NAME}"
DEVICE="${DEVICE:-cpu}"
LAYERS="${LAYERS:-2,7,12,17,22,27}"           # scaling.sh's layers
VAL_FRACTION="${VAL_FRACTION:-0.025}"         # scaling.sh's split: the same held-out rows
SP_ROWS="${SP_ROWS:-225000}"                  # scaling.sh's dump capacity (used when the dump is collected here)
TRAIN_DOCS="${TRAIN_DOCS:-500}"
VAL_DOCS="${VAL_DOCS:-24}"
MAX_TOKENS_PER_DOC="${MAX_TOKENS_PER_DOC:-512}"
TRAIN_ROWS="${TRAIN_ROWS:-50000}"             # training rows of every predictor set (scaling.sh's middle size)
KEEP_FRACTIONS="${KEEP_FRACTIONS:-0.5 0.25}"
LABEL_K="${LABEL_K:-0.1}"
D="${D:-128}"                                 # the reference width (scaling.sh's)
CAPACITY_DS="${CAPACITY_DS:-32 64 128 256 576}"   # low-rank widths; 576 = SmolLM2's hidden size (full rank)
MLP_D="${MLP_D:-576}"                         # hidden width of the nonlinear predictor
EPOCHS="${EPOCHS:-30}"
PATIENCE="${PATIENCE:-2}"
LR="${LR:-3e-3}"
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-1024}"
VAL_SP_ROWS="${VAL_SP_ROWS:-$(( VAL_DOCS * MAX_TOKENS_PER_DOC ))}"   # the validation passages' dump
# ReLU stand-in: "plain" (ReLU at 0) and "sparse" (threshold at the 0.9 quantile of the gate, L1 on the activations)
RELU_VARIANTS="${RELU_VARIANTS:-plain sparse}"
RELU_FIT_ROWS="${RELU_FIT_ROWS:-50000}"
RELU_EPOCHS="${RELU_EPOCHS:-20}"
RELU_LR="${RELU_LR:-1e-4}"
RELU_L1="${RELU_L1:-1e-3}"
# the ReLU models' dumps: enough rows for TRAIN_ROWS training rows after the VAL_FRACTION split
RELU_SP_ROWS="${RELU_SP_ROWS:-$(awk -v n="$TRAIN_ROWS" -v f="$VAL_FRACTION" 'BEGIN { printf "%d", n / (1 - f) + 1 }')}"
CPU_WORKERS="${CPU_WORKERS:-$([ "$MODEL" = smollm2 ] && nproc || echo 1)}"
REUSE_DUMP="${REUSE_DUMP:-0}"
RESUME="${RESUME:-0}"
# the study report whose every-layer recall against drift the report carries (scripts/demo.sh writes it)
STUDY_SUMMARY="${STUDY_SUMMARY:-$ROOT/reports/$NAME/summary.json}"
ANSWER_KEEP="${ANSWER_KEEP:-0.5}"             # the kept fraction the answer compares the controls at
BATCH_SIZE="${BATCH_SIZE:-4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

x mkdir -p "$CONTROLS"
timing() { [ "$DRY_RUN" = 1 ] || printf '{"step": "%s", "seconds": %d}\n' "$1" "$2" >> "$CONTROLS/timings.jsonl"; }
[ "$DRY_RUN" = 1 ] || { [ -f "$CONTROLS/timings.jsonl" ] && mv "$CONTROLS/timings.jsonl" "$CONTROLS/timings.previous.jsonl" || true; }

step "convert $MODEL -> $CHECKPOINT"
convert_model
cd "$INFER"

if [ "$REUSE_DUMP" = 1 ] && [ -f "$RUN/train.jsonl" ] && [ -f "$RUN/val.jsonl" ]; then
  step "reusing the request files of $RUN"
else
  step "request files: $TRAIN_DOCS training and $VAL_DOCS validation documents of the offline corpus"
  x "$PYTHON" c4_train/getdata.py --offline --num-docs "$TRAIN_DOCS" --max-tokens "$MAX_TOKENS_PER_DOC" \
    --tokenizer "$CHECKPOINT" --output "$RUN/train.jsonl"
  x "$PYTHON" c4_val/getdata.py --offline --num-docs "$VAL_DOCS" --max-tokens "$MAX_TOKENS_PER_DOC" \
    --tokenizer "$CHECKPOINT" --output "$RUN/val.jsonl"
fi

run_model() {  # run_model CHECKPOINT TYPE REQUESTS RESULTS [runner flags...]
  local checkpoint="$1" type="$2" requests="$3" results="$4"; shift 4
  x "$PYTHON" dist_inference_runner.py --model-name "$checkpoint" --model-type "$type" --infer-data "$requests" \
    --output-path "$results" --device "$DEVICE" --batch-size "$BATCH_SIZE" \
    --input-seq-length "$MAX_TOKENS_PER_DOC" --num-layers "$LAYERS_TOTAL" --max-layers "$LAYERS_TOTAL" "$@"
}
collect() {  # collect CHECKPOINT REQUESTS DUMP ROWS: only the batches that can fill ROWS rows
  if [ "$RESUME" = 1 ] && dump_filled "$3"; then step "keeping the dump $3 (RESUME=1)"; return; fi
  local batches=$(( ($4 + BATCH_SIZE * MAX_TOKENS_PER_DOC - 1) / (BATCH_SIZE * MAX_TOKENS_PER_DOC) ))
  # passages may be shorter than MAX_TOKENS_PER_DOC: half as many batches again, and a few more
  run_model "$1" "$MODEL_TYPE-save" "$2" "$(dirname "$3")/results_collect_$(basename "$3").jsonl" \
    --sp-data-path "$3" --sp-rows "$4" --sp-layers "$LAYERS" --sp-force --num-iters $(( batches * 3 / 2 + 4 ))
}
dump_filled() {  # dump_filled DUMP: whether its meta.json says it is complete or every row is written
  [ -f "$1/meta.json" ] && "$PYTHON" -c '
import json, sys
meta = json.load(open(sys.argv[1]))
sys.exit(0 if meta.get("complete") or meta.get("capacity_reached") else 1)' "$1/meta.json"
}
layers_trained() {  # layers_trained FOLDER: whether every layer of LAYERS has an ok metrics line
  [ -f "$1/metrics_mlp.jsonl" ] && "$PYTHON" -c '
import json, sys
ok = {e.get("layer") for e in map(json.loads, open(sys.argv[1])) if e.get("status") == "ok"}
sys.exit(0 if {int(l) for l in sys.argv[2].split(",")} <= ok else 1)' "$1/metrics_mlp.jsonl" "$LAYERS"
}
record_run() {  # record_run RESULTS KEY=VALUE... : one line of $CONTROLS/controls.jsonl
  [ "$DRY_RUN" = 1 ] && { echo "+ record $*"; return; }
  record "$CONTROLS/controls.jsonl" "$@"
}

t=$SECONDS
if [ "$REUSE_DUMP" = 1 ] && [ -f "$RUN/dump/meta.json" ]; then
  step "reusing the dump in $RUN/dump"
else
  step "collect layers $LAYERS from the training documents (capacity $SP_ROWS rows)"
  collect "$CHECKPOINT" "$RUN/train.jsonl" "$RUN/dump" "$SP_ROWS"
fi
step "collect layers $LAYERS from the validation passages (capacity $VAL_SP_ROWS rows)"
collect "$CHECKPOINT" "$RUN/val.jsonl" "$CONTROLS/dump_val" "$VAL_SP_ROWS"
step "drift of the training dump"
x "$PYTHON" "$ROOT/scripts/drift.py" "$RUN/dump" --no-progress
timing collect $(( SECONDS - t ))

suffix=""; [ "$MODEL_TYPE" = llama ] && suffix="_llama"
train() {  # train DUMP EVAL_DUMP SET_NAME [entry point flags...]
  local dump="$1" eval_dump="$2" name="$3"; shift 3
  if [ "$RESUME" = 1 ] && layers_trained "$CONTROLS/predictors/$name"; then
    step "keeping the predictors $name (RESUME=1)"; return
  fi
  x rm -rf "$CONTROLS/predictors/$name"
  step "train MLP predictors $name of layers $LAYERS on $TRAIN_ROWS rows"
  DATA_PATH="$dump" CKPT_DIR="$CONTROLS/predictors/$name" LAYERS="$LAYERS" TRAIN_ROWS="$TRAIN_ROWS" \
    INPUT=same EPOCHS="$EPOCHS" PATIENCE="$PATIENCE" VAL_FRACTION="$VAL_FRACTION" DEVICE="$DEVICE" \
    LR="$LR" BATCH_SIZE="$TRAIN_BATCH_SIZE" CPU_WORKERS="$CPU_WORKERS" SELECT_METRIC=recall_at_matched_k \
    x bash "$ROOT/sparse_predictor/run_c4_mlp${suffix}.sh" --eval-data-path "$eval_dump" "$@" \
    || echo "some layers of $name failed; see above"
}

t=$SECONDS
for width in $CAPACITY_DS; do
  train "$RUN/dump" "$CONTROLS/dump_val" "lowrank_D$width" --predictor-form lowrank --D "$width" \
    --label-target act-topk --k "$LABEL_K"
done
train "$RUN/dump" "$CONTROLS/dump_val" linear --predictor-form linear --label-target act-topk --k "$LABEL_K"
train "$RUN/dump" "$CONTROLS/dump_val" "mlp_D$MLP_D" --predictor-form mlp --D "$MLP_D" --label-target act-topk --k "$LABEL_K"
# the act-topk label at width D is the capacity sweep's set of that width
x ln -sfn "lowrank_D$D" "$CONTROLS/predictors/label_act-topk"
for target in gate-positive gate-topk; do
  train "$RUN/dump" "$CONTROLS/dump_val" "label_$target" --D "$D" --label-target "$target" --k "$LABEL_K" \
    --checkpoint "$CHECKPOINT"
done
timing train $(( SECONDS - t ))

t=$SECONDS
for variant in $RELU_VARIANTS; do
  folder="$CONTROLS/relu/$variant"
  case "$variant" in
    plain) sparser=() ;;
    sparse) sparser=(--target-zeros 0.9 --l1 "$RELU_L1") ;;
    *) echo "unknown RELU_VARIANTS entry '$variant' (plain, sparse)" >&2; exit 2 ;;
  esac
  if [ "$RESUME" = 1 ] && [ -f "$folder/checkpoint/relu_control.json" ]; then
    step "keeping the ReLU stand-in '$variant' (RESUME=1)"
  else
  step "ReLU stand-in '$variant' in layers $LAYERS (fit on $RELU_FIT_ROWS rows of $RUN/dump)"
  x "$PYTHON" -m dejavu_study.relu_control --checkpoint "$CHECKPOINT" --data-path "$RUN/dump" --layers "$LAYERS" \
    --out "$folder/checkpoint" --force --rows "$RELU_FIT_ROWS" --epochs "$RELU_EPOCHS" --lr "$RELU_LR" \
    --device "$DEVICE" --no-progress ${sparser[@]+"${sparser[@]}"}
  fi
  step "collect the ReLU model's layers $LAYERS ($RELU_SP_ROWS training rows, and the validation passages)"
  collect "$folder/checkpoint" "$RUN/train.jsonl" "$folder/dump" "$RELU_SP_ROWS"
  collect "$folder/checkpoint" "$RUN/val.jsonl" "$folder/dump_val" "$VAL_SP_ROWS"
  train "$folder/dump" "$folder/dump_val" "relu-${variant}_topk" --D "$D" --label-target act-topk --k "$LABEL_K"
done
timing relu $(( SECONDS - t ))

t=$SECONDS
[ "$DRY_RUN" = 1 ] || rm -f "$CONTROLS/controls.jsonl"
kept_result() {  # kept_result RESULTS: RESUME=1 and the runner wrote it (atomically: whole or absent)
  [ "$RESUME" = 1 ] && [ -s "$1" ]
}
sparse() {  # sparse CHECKPOINT MODE KEEP RESULTS [PREDICTORS]
  kept_result "$4" && return
  run_model "$1" "$MODEL_TYPE-ml-att-sparse" "$RUN/val.jsonl" "$4" --sparse-mode "$2" --mlp-keep "$3" \
    --sparse-attention off --sparse-layers "$LAYERS" ${5:+--sparse-path "$5"}
}
perplexity() {  # perplexity MODEL_NAME CHECKPOINT PREDICTOR_SETS...
  local name="$1" checkpoint="$2"; shift 2
  step "perplexity of $name on the validation passages: dense, then oracle and predicted on layers $LAYERS"
  kept_result "$CONTROLS/results_${name}_dense.jsonl" ||
    run_model "$checkpoint" "$MODEL_TYPE" "$RUN/val.jsonl" "$CONTROLS/results_${name}_dense.jsonl"
  record_run "$CONTROLS/results_${name}_dense.jsonl" model="$name" mode=dense
  for keep in $KEEP_FRACTIONS; do
    sparse "$checkpoint" oracle "$keep" "$CONTROLS/results_${name}_oracle_$keep.jsonl"
    record_run "$CONTROLS/results_${name}_oracle_$keep.jsonl" model="$name" mode=oracle keep="$keep"
    for set in "$@"; do
      out="$CONTROLS/results_${name}_predicted_${set}_$keep.jsonl"
      sparse "$checkpoint" predicted "$keep" "$out" "$CONTROLS/predictors/$set"
      record_run "$out" model="$name" mode=predicted keep="$keep" predictors="$set"
    done
  done
}
silu_sets=()
for width in $CAPACITY_DS; do silu_sets+=("lowrank_D$width"); done
silu_sets+=(linear "mlp_D$MLP_D" label_gate-positive label_gate-topk)
perplexity silu "$CHECKPOINT" "${silu_sets[@]}"
for variant in $RELU_VARIANTS; do
  perplexity "relu-$variant" "$CONTROLS/relu/$variant/checkpoint" "relu-${variant}_topk"
done
timing perplexity $(( SECONDS - t ))

step "report"
study=(); [ -f "$STUDY_SUMMARY" ] && study=(--study "$STUDY_SUMMARY")
x "$PYTHON" -m dejavu_study.controls "$CONTROLS" --dump "$RUN/dump" --out "$OUT" --model "$MODEL_LABEL" \
  --layers "$LAYERS" --drift-set "lowrank_D$D" --keep "$ANSWER_KEEP" ${study[@]+"${study[@]}"}
step "done in $(( (SECONDS - started) / 60 )) min; report: $OUT/controls.md"
