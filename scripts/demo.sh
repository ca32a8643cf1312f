#!/usr/bin/env bash
# The whole study in one command, on the embedded SmolLM2-135M-Instruct with the offline corpus
# (Python documentation and World English Bible, installed by setup.sh):
#   convert -> dense perplexity through a 2-stage pipeline -> collect activations -> train the
#   MLP and attention predictors of every layer (early stopping; PREV_KINDS also on the
#   look-ahead input) -> calibrate the training-free baselines (TEAL, CATS) -> per-layer kept
#   fractions from each layer's sensitivity on the training dump (predicted, TEAL, CATS) ->
#   sparse perplexity at several kept fractions, uniform and allocated: oracle, predicted, teal,
#   cats, wina for the MLP; oracle and predicted for the heads -> decode speed of every MLP
#   configuration against dense -> a downstream task (dejavu_continuation) for dense and the
#   configurations the report's Answer picks -> report.
# scripts/frontier.sh runs the same study on the full grid of kept fractions and the whole task.
#
# The same study on a GPU server with real models and more data, e.g.
#   MODEL=meta-llama/Llama-3.2-3B MODEL_TYPE=llama DEVICE=cuda ONLINE=1 TRAIN_DOCS=2000 VAL_DOCS=500 \
#     HF_TOKEN=... bash scripts/demo.sh
#   MODEL=facebook/opt-125m MODEL_TYPE=opt DEVICE=cuda ONLINE=1 bash scripts/demo.sh
# and then `python scripts/report.py runs/<llama> runs/<opt>` overlays the two.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/study_common.sh"

STUDY="${STUDY:-}"                            # a prefix of the run and report names (frontier.sh: frontier)
RUN="${RUN:-$ROOT/runs/${STUDY:+$STUDY-}$NAME}"
REPORT="${REPORT:-$ROOT/reports/${STUDY:+$STUDY-}$NAME}"
REUSE="${REUSE:-0}"                           # 1: keep a dump and predictors already in $RUN (rerun the rest)
DEVICE="${DEVICE:-cpu}"
STAGES="${STAGES:-2}"                         # stages of the dense perplexity run
TRAIN_DOCS="${TRAIN_DOCS:-80}"                # corpus passages collected for predictor training
VAL_DOCS="${VAL_DOCS:-16}"                    # passages of other documents for perplexity (frontier.sh: 20)
MAX_TOKENS_PER_DOC="${MAX_TOKENS_PER_DOC:-256}"
KEEP_FRACTIONS="${KEEP_FRACTIONS:-0.9 0.75 0.5 0.25}"      # MLP neurons kept (attention dense)
ATT_KEEP_FRACTIONS="${ATT_KEEP_FRACTIONS:-0.5}"             # heads kept (MLP dense; frontier.sh: 0.75 too)
ONLINE="${ONLINE:-0}"                         # 1: request files from C4 on the hub
RANDOM_WEIGHTS="${RANDOM_WEIGHTS:-0}"         # 1: the model is random-init (a tooling check): the report says "not evidence"
EPOCHS="${EPOCHS:-20}"                        # a cap: early stopping (PATIENCE) ends training before it
PATIENCE="${PATIENCE:-2}"
LR="${LR:-3e-3}"
# Predictor width: the trainer's default min(1000, hidden) on real models; 256 on the embedded
# model on 2 cores (0.44 of the weights of D=576, trains about twice as fast).
D="${D:-$([ "$MODEL" = smollm2 ] && echo 256)}"
# Kinds whose predictors are also trained on the look-ahead input (prev). On the embedded model on
# 2 cores only the heads' (cheap: 9 outputs): the MLP's would add about 3.5 minutes to its 14;
# both on real models.
PREV_KINDS="${PREV_KINDS:-$([ "$MODEL" = smollm2 ] && echo att || echo "mlp att")}"
SELECT_METRIC="${SELECT_METRIC:-recall_at_matched_k}"  # what a top-K executor uses
MLP_METHODS="${MLP_METHODS:-oracle predicted teal cats wina}"  # MLP modes run at each of KEEP_FRACTIONS
CALIBRATION_ROWS="${CALIBRATION_ROWS:-4096}"  # dump rows TEAL's and CATS's thresholds are calibrated on
# Also run with per-layer kept fractions: TEAL's (its own proposal); frontier.sh allocates
# predicted, teal and cats (on 2 cores the other two would take the demo past 20 minutes).
ALLOCATE_METHODS="${ALLOCATE_METHODS:-teal}"
ALLOCATION_ROWS="${ALLOCATION_ROWS:-1024}"    # dump rows each layer's sensitivity is measured on
# The steps a layer's fraction takes (each one calibrated for TEAL and CATS): the demo's kept
# fractions and 0.1; frontier.sh's are its own.
ALLOCATION_GRID="${ALLOCATION_GRID:-1 $KEEP_FRACTIONS 0.1}"
DECODE_THREADS="${DECODE_THREADS:-$(nproc)}"  # decode speed: cpu backend at this many threads
DECODE_ROUNDS="${DECODE_ROUNDS:-3}"           # per-round ratios against dense; the median is reported
DECODE_TOKENS="${DECODE_TOKENS:-32}"          # tokens decoded per timing
# Which configurations are timed: kernel (realisable, what the Answer chooses from), bound
# (oracle), masks (wina); frontier.sh times all three.
DECODE_KINDS="${DECODE_KINDS:-kernel}"
# Time only the configurations within this much perplexity over dense (percent; empty: all): the
# Answer's largest budget is +10%, so the others cannot be chosen; frontier.sh times them all.
DECODE_MAX_CHANGE="${DECODE_MAX_CHANGE-10}"
CONTROLS_REPORT="${CONTROLS_REPORT:-$ROOT/reports/controls-$NAME}"  # linked from the Answer where it exists
DOWNSTREAM="${DOWNSTREAM:-1}"                 # 0: no downstream task
DOWNSTREAM_ITEMS="${DOWNSTREAM_ITEMS-200}"    # items of dejavu_continuation (empty: all 1,200)
LM_EVAL_BATCH_SIZE="${LM_EVAL_BATCH_SIZE:-32}"
BATCH_SIZE="${BATCH_SIZE:-4}"
PORT="${PORT:-29517}"
# Predictor-training processes without a GPU (run_layers.sh): one per core on the embedded model;
# one on others, since each holds its layer's training rows (Llama-3.2-3B: up to 8 GB at 400k rows).
CPU_WORKERS="${CPU_WORKERS:-$([ "$MODEL" = smollm2 ] && nproc || echo 1)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

mkdir -p "$RUN"

step "1/9 convert $MODEL -> $CHECKPOINT"
convert_model
cd "$INFER"

step "2/9 request files (train: $TRAIN_DOCS documents, validation: $VAL_DOCS)"
source_flag=(--offline)
[ "$ONLINE" = 1 ] && source_flag=()
cut=(--max-tokens "$MAX_TOKENS_PER_DOC" --tokenizer "$CHECKPOINT")
"$PYTHON" c4_train/getdata.py "${source_flag[@]}" --num-docs "$TRAIN_DOCS" "${cut[@]}" --output "$RUN/c4_train.jsonl"
"$PYTHON" c4_val/getdata.py "${source_flag[@]}" --num-docs "$VAL_DOCS" "${cut[@]}" --output "$RUN/c4_val.jsonl"

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
LOG="$RUN/perplexity.jsonl"
# sparse_run NAME [RECORD KEY=VALUE...] -- [runner flags...]: one sparse perplexity run and its line
sparse_run() {
  local name="$1"; shift
  local fields=(); while [ "$1" != -- ]; do fields+=("$1"); shift; done; shift
  local out="$RUN/results_$name.jsonl" stats="$RUN/stats_$name.json"
  run_pipeline 1 "$MODEL_TYPE-ml-att-sparse" "$RUN/c4_val.jsonl" "$out" --sparse-stats "$stats" "$@" &&
    record "$LOG" "$out" "${fields[@]}" --stats "$stats"
}

rm -f "$LOG"
step "3/9 dense perplexity through a $STAGES-stage pipeline"
run_pipeline "$STAGES" "$MODEL_TYPE" "$RUN/c4_val.jsonl" "$RUN/results_dense.jsonl"
record "$LOG" "$RUN/results_dense.jsonl" mode=dense mlp_keep=- att_keep=-

if [ "$REUSE" = 1 ] && [ -f "$RUN/dump/meta.json" ] && [ -d "$RUN/predictors/same" ]; then
  step "4-5/9 reusing the dump and predictors in $RUN (REUSE=1)"
else
  step "4/9 collect activations ($MODEL_TYPE-save) from the training documents and the validation passages"
  run_pipeline 1 "$MODEL_TYPE-save" "$RUN/c4_train.jsonl" "$RUN/results_collect.jsonl" \
    --sp-data-path "$RUN/dump" --sp-rows "${SP_ROWS:-$(( TRAIN_DOCS * MAX_TOKENS_PER_DOC ))}" --sp-force
  # the validation passages (other documents): every recall figure of the report is measured on them
  run_pipeline 1 "$MODEL_TYPE-save" "$RUN/c4_val.jsonl" "$RUN/results_collect_val.jsonl" \
    --sp-data-path "$RUN/dump_val" --sp-rows "$(( VAL_DOCS * MAX_TOKENS_PER_DOC ))" --sp-force

  step "5/9 train predictors for all $LAYERS_TOTAL layers (MLP and attention, input same; $PREV_KINDS also input prev)"
  suffix=""; [ "$MODEL_TYPE" = llama ] && suffix="_llama"
  for input in same prev; do
    for kind in mlp att; do
      [ "$input" = prev ] && [[ " $PREV_KINDS " != *" $kind "* ]] && continue
      DATA_PATH="$RUN/dump" CKPT_DIR="$RUN/predictors/$input" INPUT="$input" EPOCHS="$EPOCHS" DEVICE="$DEVICE" \
        PATIENCE="$PATIENCE" SELECT_METRIC="$SELECT_METRIC" D="$D" LR="$LR" CPU_WORKERS="$CPU_WORKERS" \
        bash "$ROOT/sparse_predictor/run_c4_${kind}${suffix}.sh" --eval-data-path "$RUN/dump_val" || echo "some $kind layers failed (input $input); see above"
    done
  done
fi
# TEAL's and CATS's thresholds at every fraction a run or an allocation uses.
calibration_keeps="$(printf '%s\n' $KEEP_FRACTIONS $ALLOCATION_GRID | sort -gru | grep -vxE '1|1\.0*')"
for method in teal cats; do
  case " $MLP_METHODS $ALLOCATE_METHODS " in *" $method "*) ;; *) continue ;; esac
  [ "$method" = cats ] && [ "$MODEL_TYPE" != llama ] && continue  # OPT has no gate
  start_job "calibrate_$method" "$PYTHON" "$ROOT/sparse_predictor/calibrate.py" --data-path "$RUN/dump" \
    --checkpoint "$CHECKPOINT" --method "$method" --keep $calibration_keeps --out "$RUN/predictors/same" \
    --max-rows "$CALIBRATION_ROWS"
done
wait_jobs

step "6/9 per-layer kept fractions ($ALLOCATE_METHODS) for mean kept fractions $KEEP_FRACTIONS, from each layer's sensitivity on the training dump"
for method in $ALLOCATE_METHODS; do
  [ "$method" = cats ] && [ "$MODEL_TYPE" != llama ] && continue
  start_job "allocate_$method" "$PYTHON" "$ROOT/sparse_predictor/allocate.py" --data-path "$RUN/dump" \
    --checkpoint "$CHECKPOINT" --method "$method" --predictors "$RUN/predictors/same" --target-keep $KEEP_FRACTIONS \
    --grid $ALLOCATION_GRID --max-rows "$ALLOCATION_ROWS"
done
wait_jobs
for method in $ALLOCATE_METHODS; do  # what each allocation chose (the table allocate.py logs)
  log="$RUN/logs/allocate_$method.log"; [ -f "$log" ] && sed -n '/per-layer kept fractions/,$p' "$log"
done

# One component at a time, so the report can tell the MLP's share from the attention's.
step "7/9 sparse perplexity ($JOBS run(s) at a time): MLP kept $KEEP_FRACTIONS ($MLP_METHODS; allocated: $ALLOCATE_METHODS); heads kept $ATT_KEEP_FRACTIONS (oracle, predicted)"
predictors=(--sparse-path "$RUN/predictors/same")
rm -f "$RUN"/results_*_mlp_* "$RUN"/results_*_att_* "$RUN"/stats_*_mlp_* "$RUN"/stats_*_att_*  # an earlier grid's
for keep in $KEEP_FRACTIONS; do
  for mode in $MLP_METHODS; do
    [ "$mode" = cats ] && [ "$MODEL_TYPE" != llama ] && continue
    start_job "${mode}_mlp_$keep" sparse_run "${mode}_mlp_$keep" mode="$mode" mlp_keep="$keep" att_keep=- -- \
      --sparse-mode "$mode" --mlp-keep "$keep" --sparse-attention off "${predictors[@]}"
  done
  for mode in $ALLOCATE_METHODS; do
    [ "$mode" = cats ] && [ "$MODEL_TYPE" != llama ] && continue
    allocation="$RUN/predictors/same/allocation_${mode}_$("$PYTHON" -c 'import sys; print(f"{float(sys.argv[1]):g}")' "$keep").json"
    start_job "${mode}_mlp_${keep}_allocated" sparse_run "${mode}_mlp_${keep}_allocated" mode="$mode" \
      mlp_keep="$keep" att_keep=- allocation="$allocation" -- \
      --sparse-mode "$mode" --mlp-keep "$keep" --mlp-keep-file "$allocation" --sparse-attention off "${predictors[@]}"
  done
done
for keep in $ATT_KEEP_FRACTIONS; do
  for mode in oracle predicted; do
    start_job "${mode}_att_$keep" sparse_run "${mode}_att_$keep" mode="$mode" mlp_keep=- att_keep="$keep" -- \
      --sparse-mode "$mode" --att-keep "$keep" --sparse-mlp off "${predictors[@]}"
  done
done
wait_jobs

step "8/9 decode speed of each MLP configuration ($DECODE_KINDS) against dense (cpu backend, $DECODE_THREADS threads, $DECODE_ROUNDS rounds)"
"$PYTHON" - "$RUN" "$NAME" "$MODEL_LABEL" "$MODEL_TYPE" "$CHECKPOINT" "$STAGES" "$DEVICE" "$VAL_DOCS" "$ONLINE" "$RANDOM_WEIGHTS" \
  "$EPOCHS" "$PATIENCE" "$SELECT_METRIC" "$D" "$LR" <<'EOF'
import json, os, sys
(run, name, model, model_type, checkpoint, stages, device, val_docs, online, random_weights,
 epochs, patience, select_metric, d, lr) = sys.argv[1:]
if online == "1":
    source = "C4 from the hub"
else:
    from collections import Counter
    from dejavu_llama.task_datasets.offline_text import SOURCES
    counts = Counter(json.loads(line).get("source") for line in open(os.path.join(run, "c4_train.jsonl")))
    source = "offline corpus: " + ", ".join(f"{name} ({SOURCES[name].licence}; {n} passages)"
                                           for name, n in sorted(counts.items()) if name in SOURCES)
study = {"name": name, "model": model, "model_type": model_type, "checkpoint": checkpoint,
         "data": f"{source}: {os.path.join(run, 'c4_train.jsonl')}",
         "validation_data": os.path.join(run, "c4_val.jsonl"),
         "documents": sum(1 for _ in open(os.path.join(run, "c4_train.jsonl"))),
         "validation_documents": int(val_docs), "random_weights": random_weights == "1",
         "stages": int(stages), "device": device,
         "label_rule": ("topk k=0.1" if model_type == "llama" else "positive") + " (MLP); topk k=0.5 (heads)",
         "notes": "MLP predictors read mlp_x; perplexity runs use the input-'same' predictors; predictors train "
                  f"(D = {d or 'min(1000, hidden)'}, lr {lr}) under a cap of {epochs} epochs with early stopping (patience {patience}, best "
                  f"{select_metric}); teal and cats thresholds are calibrated on the training dump."}
tmp = os.path.join(run, ".study.json.tmp")
json.dump(study, open(tmp, "w"), indent=2)
os.replace(tmp, os.path.join(run, "study.json"))
EOF
"$PYTHON" -m dejavu_study.decode_speed "$RUN" --threads "$DECODE_THREADS" --rounds "$DECODE_ROUNDS" \
  --new-tokens "$DECODE_TOKENS" --kinds $DECODE_KINDS ${DECODE_MAX_CHANGE:+--max-perplexity-change "$DECODE_MAX_CHANGE"}

step "9/9 downstream task (${DOWNSTREAM_ITEMS:-all} items of dejavu_continuation): dense and the Answer's configurations; report"
downstream=(--downstream "$RUN/downstream")
if [ "$DOWNSTREAM" = 1 ]; then
  rm -rf "$RUN/downstream"; mkdir -p "$RUN/downstream"
  "$PYTHON" -m dejavu_llama.task_datasets.continuation_task --tokenizer "$CHECKPOINT" --out "$RUN/downstream_task"
  lm_eval_run() {  # lm_eval_run NAME [model_args...]
    local name="$1"; shift
    local args="checkpoint=$CHECKPOINT,model_type=$MODEL_TYPE,device=$DEVICE,batch_size=$LM_EVAL_BATCH_SIZE,label=$name"
    for extra in "$@"; do args="$args,$extra"; done
    "$VENV/bin/dejavu-lm-eval" --model dejavu --model_args "$args" --tasks dejavu_continuation \
      --include_path "$RUN/downstream_task" ${DOWNSTREAM_ITEMS:+--limit "$DOWNSTREAM_ITEMS"} \
      --output_path "$RUN/downstream/$name"
  }
  start_job downstream_dense lm_eval_run dense
  for config in $("$PYTHON" "$ROOT/scripts/report.py" "$RUN" --chosen-configs); do
    name="$(basename "${config%.jsonl.sparse_config.json}")"; name="${name#results_}"
    start_job "downstream_$name" lm_eval_run "$name" "model_type=$MODEL_TYPE-ml-att-sparse" "sparse_config=$config" \
      "sparse_stats=$RUN/downstream/stats_$name.json"
  done
  wait_jobs
else
  downstream=()
fi
# the controls report (scripts/controls.sh), where one exists: the Answer names its decisive control
controls=(); [ -f "$CONTROLS_REPORT/summary.json" ] && controls=(--controls "$CONTROLS_REPORT")
"$PYTHON" "$ROOT/scripts/report.py" "$RUN" --out "$REPORT" ${downstream[@]+"${downstream[@]}"} \
  ${controls[@]+"${controls[@]}"}
step "done in $(( (SECONDS - started) / 60 )) min; report: $REPORT/report.md"
