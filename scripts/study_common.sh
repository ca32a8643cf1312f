# What demo.sh and scaling.sh share (source it; do not run it): the environment, the model
# variables, progress lines and the conversion of the model.
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
