#!/usr/bin/env bash
# Predictor quality against training-set size, in one command: collect one large dump of a layer
# subset, train the MLP predictors of those layers on nested training sets of growing size (the
# same validation rows for every size, early stopping under a cap), run predicted and oracle MLP
# sparsity on those layers (the others dense) at each kept fraction, and write the scaling report.
# It also trains at the budget (label k = the kept fraction) to show which label serves each
# kept fraction best.
#
#   bash scripts/scaling.sh                      # SmolLM2, offline corpus, 6 layers, 12k/50k/200k tokens
#   SIZES="12000 50000" LAYERS=3,9,15,21,27 bash scripts/scaling.sh
#
# Every variable below can be set in the environment. Outputs: $RUN (dump, predictors, results)
# and $OUT (scaling.md, summary.json, PNGs).
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/study_common.sh"

RUN="${RUN:-$ROOT/runs/scaling-$NAME}"
OUT="${OUT:-$ROOT/reports/scaling-$NAME}"
DEVICE="${DEVICE:-cpu}"
LAYERS="${LAYERS:-2,7,12,17,22,27}"           # spread over the depth (SmolLM2 has 30 layers)
SIZES="${SIZES:-12000 50000 200000}"          # training rows (tokens) per predictor
VAL_FRACTION="${VAL_FRACTION:-0.025}"         # of the dump's rows (5.6k): the validation rows of every size
SP_ROWS="${SP_ROWS:-225000}"                  # dump capacity: the largest size / (1 - VAL_FRACTION), rounded up
TRAIN_DOCS="${TRAIN_DOCS:-500}"               # corpus documents collected (cut to MAX_TOKENS_PER_DOC)
VAL_DOCS="${VAL_DOCS:-24}"                    # validation documents for perplexity (never collected)
MAX_TOKENS_PER_DOC="${MAX_TOKENS_PER_DOC:-512}"
KEEP_FRACTIONS="${KEEP_FRACTIONS:-0.5 0.25}"
LABEL_K="${LABEL_K:-0.1}"                     # the label of the size sweep (the demo's)
BUDGET_LABEL_SIZE="${BUDGET_LABEL_SIZE:-50000}"   # the size at which labels k = each kept fraction are trained too
D="${D:-128}"                                 # predictor width (the demo uses min(1000, hidden))
EPOCHS="${EPOCHS:-30}"                        # a cap; early stopping (PATIENCE) ends training before it
PATIENCE="${PATIENCE:-2}"
LR="${LR:-3e-3}"                              # with TRAIN_BATCH_SIZE 1024: 200k rows train in minutes per layer
TRAIN_BATCH_SIZE="${TRAIN_BATCH_SIZE:-1024}"
# Predictor-training processes without a GPU (run_layers.sh): one per core on the embedded model;
# one on others, since each holds its layer's training rows (Llama-3.2-3B: up to 8 GB at 400k rows).
CPU_WORKERS="${CPU_WORKERS:-$([ "$MODEL" = smollm2 ] && nproc || echo 1)}"
REUSE_DUMP="${REUSE_DUMP:-0}"                 # 1: keep a complete dump already in $RUN/dump (retrain only)
BATCH_SIZE="${BATCH_SIZE:-4}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

mkdir -p "$RUN"
timing() { printf '{"step": "%s", "seconds": %d}\n' "$1" "$2" >> "$RUN/timings.jsonl"; }
[ -f "$RUN/timings.jsonl" ] && mv "$RUN/timings.jsonl" "$RUN/timings.previous.jsonl"

step "convert $MODEL -> $CHECKPOINT"
convert_model
cd "$INFER"

step "request files: $TRAIN_DOCS training and $VAL_DOCS validation documents of the offline corpus"
"$PYTHON" c4_train/getdata.py --offline --num-docs "$TRAIN_DOCS" --max-tokens "$MAX_TOKENS_PER_DOC" \
  --tokenizer "$CHECKPOINT" --output "$RUN/train.jsonl"
"$PYTHON" c4_val/getdata.py --offline --num-docs "$VAL_DOCS" --max-tokens "$MAX_TOKENS_PER_DOC" \
  --tokenizer "$CHECKPOINT" --output "$RUN/val.jsonl"

run_model() {  # run_model TYPE REQUESTS RESULTS [runner flags...]
  local type="$1" requests="$2" results="$3"; shift 3
  "$PYTHON" dist_inference_runner.py --model-name "$CHECKPOINT" --model-type "$type" --infer-data "$requests" \
    --output-path "$results" --device "$DEVICE" --batch-size "$BATCH_SIZE" \
    --input-seq-length "$MAX_TOKENS_PER_DOC" --num-layers "$LAYERS_TOTAL" --max-layers "$LAYERS_TOTAL" "$@"
}

t=$SECONDS
if [ "$REUSE_DUMP" = 1 ] && [ -f "$RUN/dump/meta.json" ]; then
  step "reusing the dump in $RUN/dump"
  [ -f "$RUN/timings.previous.jsonl" ] && grep '"collect"' "$RUN/timings.previous.jsonl" >> "$RUN/timings.jsonl"
else
  step "collect layers $LAYERS from the training documents (capacity $SP_ROWS rows)"
  run_model "$MODEL_TYPE-save" "$RUN/train.jsonl" "$RUN/results_collect.jsonl" \
    --sp-data-path "$RUN/dump" --sp-rows "$SP_ROWS" --sp-layers "$LAYERS" --sp-force
  timing collect $(( SECONDS - t ))
fi

t=$SECONDS
rm -rf "$RUN/predictors"
suffix=""; [ "$MODEL_TYPE" = llama ] && suffix="_llama"
train() {  # train ROWS LABEL_K
  DATA_PATH="$RUN/dump" CKPT_DIR="$RUN/predictors/rows$1_k$2" LAYERS="$LAYERS" TRAIN_ROWS="$1" K="$2" \
    INPUT=same D="$D" EPOCHS="$EPOCHS" PATIENCE="$PATIENCE" VAL_FRACTION="$VAL_FRACTION" DEVICE="$DEVICE" \
    LR="$LR" BATCH_SIZE="$TRAIN_BATCH_SIZE" CPU_WORKERS="$CPU_WORKERS" \
    SELECT_METRIC=recall_at_matched_k bash "$ROOT/sparse_predictor/run_c4_mlp${suffix}.sh" \
    || echo "some layers failed (rows $1, label k $2); see above"
}
for rows in $SIZES; do
  step "train MLP predictors of layers $LAYERS on $rows rows (label k $LABEL_K)"
  train "$rows" "$LABEL_K"
done
for keep in $KEEP_FRACTIONS; do
  [ "$keep" = "$LABEL_K" ] && continue
  step "train MLP predictors on $BUDGET_LABEL_SIZE rows with the label at the budget (k $keep)"
  train "$BUDGET_LABEL_SIZE" "$keep"
done
timing train $(( SECONDS - t ))

t=$SECONDS
rm -f "$RUN/scaling.jsonl"
step "perplexity on the validation documents: dense, then oracle and predicted on layers $LAYERS"
run_model "$MODEL_TYPE" "$RUN/val.jsonl" "$RUN/results_dense.jsonl"
record "$RUN/scaling.jsonl" "$RUN/results_dense.jsonl" mode=dense
sparse() {  # sparse MODE KEEP RESULTS [PREDICTORS]
  run_model "$MODEL_TYPE-ml-att-sparse" "$RUN/val.jsonl" "$3" --sparse-mode "$1" --mlp-keep "$2" \
    --sparse-attention off --sparse-layers "$LAYERS" ${4:+--sparse-path "$4"}
}
for keep in $KEEP_FRACTIONS; do
  sparse oracle "$keep" "$RUN/results_oracle_$keep.jsonl"
  record "$RUN/scaling.jsonl" "$RUN/results_oracle_$keep.jsonl" mode=oracle keep="$keep"
  for rows in $SIZES; do
    out="$RUN/results_predicted_rows${rows}_k${LABEL_K}_$keep.jsonl"
    sparse predicted "$keep" "$out" "$RUN/predictors/rows${rows}_k$LABEL_K"
    record "$RUN/scaling.jsonl" "$out" mode=predicted keep="$keep" train_rows="$rows" label_k="$LABEL_K"
  done
  if [ "$keep" != "$LABEL_K" ]; then
    out="$RUN/results_predicted_rows${BUDGET_LABEL_SIZE}_k${keep}_$keep.jsonl"
    sparse predicted "$keep" "$out" "$RUN/predictors/rows${BUDGET_LABEL_SIZE}_k$keep"
    record "$RUN/scaling.jsonl" "$out" mode=predicted keep="$keep" train_rows="$BUDGET_LABEL_SIZE" label_k="$keep"
  fi
done
timing perplexity $(( SECONDS - t ))

step "report"
du -sb "$RUN/dump" | awk '{printf "{\"step\": \"dump_bytes\", \"bytes\": %.0f}\n", $1}' >> "$RUN/timings.jsonl"
"$PYTHON" -m dejavu_study.scaling "$RUN" --out "$OUT" --model "$MODEL_LABEL" --layers "$LAYERS"
step "done in $(( (SECONDS - started) / 60 )) min; report: $OUT/scaling.md"
