#!/usr/bin/env bash
# The GPU checks in one command, on a CUDA machine: the CUDA-only tests (graph replays against
# eager, the Triton predicted MLP against the CPU path, the Triton kernels compiled), then the
# GPU benchmark (benchmarks/bench_gpu.py). Works without installing the project: the packages
# are put on PYTHONPATH (dejavu_llama is the folder Decentralized_FM_alpha).
#   bash scripts/gpu_check.sh            OUT=DIR (results), DIMS=1b,3b, PYTHON=python3
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT=${OUT:-$ROOT/benchmarks/results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! "$PYTHON" -c "import dejavu_llama" 2>/dev/null; then
    packages=$(mktemp -d)
    ln -s "$ROOT/Decentralized_FM_alpha" "$packages/dejavu_llama"
    export PYTHONPATH="$packages:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"
timeout "${TEST_TIMEOUT:-300}" "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda_decode.py tests/test_triton_sparse.py
tests=$?
timeout "${BENCH_TIMEOUT:-600}" "$PYTHON" benchmarks/bench_gpu.py --dims "${DIMS:-1b,3b}" --batches 1,16 --json "$OUT/bench_gpu.json"
bench=$?
exit $(( tests || bench ))
