#!/usr/bin/env bash
# The whole study in one command, on the embedded SmolLM2-135M-Instruct with the offline corpus
# (Python documentation and World English Bible, installed by setup.sh):
#   convert -> dense perplexity through a 2-stage pipeline -> collect activations -> train the
#   MLP and attention predictors of every layer (early stopping; PREV_KINDS also on the
#   look-ahead input) -> calibrate the training-free baselines (TEAL, CATS) -> sparse perplexity
#   at several kept fractions:
#   oracle, predicted, teal, cats, wina for the MLP; oracle and predicted for the heads -> report.
#
# The same study on a GPU server with real models and more data, e.g.
#   MODEL=meta-llama/Llama-3.2-3B MODEL_TYPE=llama DEVICE=cuda ONLINE=1 TRAIN_DOCS=2000 VAL_DOCS=500 \
#     HF_TOKEN=... bash scripts/demo.sh
#   MODEL=facebook/opt-125m MODEL_TYPE=opt DEVICE=cuda ONLINE=1 bash scripts/demo.sh
# and then `python scripts/report.py runs/<llama> runs/<opt>` overlays the two.
set -euo pipefail
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/study_common.sh"

RUN="${RUN:-$ROOT/runs/$NAME}"
DEVICE="${DEVICE:-cpu}"
STAGES="${STAGES:-2}"                         # stages of the dense perplexity run
TRAIN_DOCS="${TRAIN_DOCS:-80}"                # corpus passages collected for predictor training
VAL_DOCS="${VAL_DOCS:-20}"                    # passages of other documents for perplexity
MAX_TOKENS_PER_DOC="${MAX_TOKENS_PER_DOC:-256}"
KEEP_FRACTIONS="${KEEP_FRACTIONS:-0.5 0.25 0.1}"           # MLP neurons kept (attention dense)
ATT_KEEP_FRACTIONS="${ATT_KEEP_FRACTIONS:-0.75 0.5}"        # heads kept (MLP dense)
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
BATCH_SIZE="${BATCH_SIZE:-4}"
PORT="${PORT:-29517}"
# Predictor-training processes without a GPU (run_layers.sh): one per core on the embedded model;
# one on others, since each holds its layer's training rows (Llama-3.2-3B: up to 8 GB at 400k rows).
CPU_WORKERS="${CPU_WORKERS:-$([ "$MODEL" = smollm2 ] && nproc || echo 1)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"

mkdir -p "$RUN"

step "1/7 convert $MODEL -> $CHECKPOINT"
convert_model
cd "$INFER"

step "2/7 request files (train: $TRAIN_DOCS documents, validation: $VAL_DOCS)"
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
record() {  # record MODE MLP_KEEP ATT_KEEP RESULTS [SPARSE_STATS]
  "$PYTHON" - "$@" "$RUN/perplexity.jsonl" <<'EOF'
import json, os, sys
mode, mlp_keep, att_keep, results, *rest = sys.argv[1:]
stats, out = (rest[0], rest[1]) if len(rest) == 2 else (None, rest[0])
from dejavu_llama.task_datasets.perplexity import perplexity_of_file
figures = perplexity_of_file(results)
value, tokens = figures["perplexity"], figures["tokens"]
line = {"mode": mode, "mlp_keep": None if mlp_keep == "-" else float(mlp_keep),
        "att_keep": None if att_keep == "-" else float(att_keep), "perplexity": value, "tokens": tokens,
        "result_file": results}
if stats and os.path.isfile(stats):  # the kept fraction reached on this text and the MLP bytes it costs
    with open(stats) as handle:
        measured = json.load(handle)
    line.update(reached_keep=measured.get("mean_kept"), mlp_bytes_relative=measured.get("bytes_relative"),
                sparse_stats=stats)
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

step "5/7 train predictors for all $LAYERS_TOTAL layers (MLP and attention, input same; $PREV_KINDS also input prev)"
suffix=""; [ "$MODEL_TYPE" = llama ] && suffix="_llama"
for input in same prev; do
  for kind in mlp att; do
    [ "$input" = prev ] && [[ " $PREV_KINDS " != *" $kind "* ]] && continue
    DATA_PATH="$RUN/dump" CKPT_DIR="$RUN/predictors/$input" INPUT="$input" EPOCHS="$EPOCHS" DEVICE="$DEVICE" \
      PATIENCE="$PATIENCE" SELECT_METRIC="$SELECT_METRIC" D="$D" LR="$LR" CPU_WORKERS="$CPU_WORKERS" \
      bash "$ROOT/sparse_predictor/run_c4_${kind}${suffix}.sh" || echo "some $kind layers failed (input $input); see above"
  done
done
for method in teal cats; do
  case " $MLP_METHODS " in *" $method "*) ;; *) continue ;; esac
  [ "$method" = cats ] && [ "$MODEL_TYPE" != llama ] && continue  # OPT has no gate
  "$PYTHON" "$ROOT/sparse_predictor/calibrate.py" --data-path "$RUN/dump" --checkpoint "$CHECKPOINT" \
    --method "$method" --keep $KEEP_FRACTIONS --out "$RUN/predictors/same" --max-rows "$CALIBRATION_ROWS"
done

# One component at a time, so the report can tell the MLP's share from the attention's.
step "6/7 sparse perplexity: MLP kept $KEEP_FRACTIONS ($MLP_METHODS); heads kept $ATT_KEEP_FRACTIONS (oracle, predicted)"
for keep in $KEEP_FRACTIONS; do
  for mode in $MLP_METHODS; do
    [ "$mode" = cats ] && [ "$MODEL_TYPE" != llama ] && continue
    out="$RUN/results_${mode}_mlp_${keep}.jsonl" stats="$RUN/stats_${mode}_mlp_${keep}.json"
    run_pipeline 1 "$MODEL_TYPE-ml-att-sparse" "$RUN/c4_val.jsonl" "$out" --sparse-mode "$mode" \
      --mlp-keep "$keep" --sparse-attention off --sparse-path "$RUN/predictors/same" --sparse-stats "$stats"
    record "$mode" "$keep" - "$out" "$stats"
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
"$PYTHON" "$ROOT/scripts/report.py" "$RUN" --out "$ROOT/reports/$NAME"
step "done in $(( (SECONDS - started) / 60 )) min; report: $ROOT/reports/$NAME/report.md"
