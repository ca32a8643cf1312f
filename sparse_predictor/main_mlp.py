"""Train OPT MLP-neuron predictors (upstream's main_mlp.py).

Thin entry point: all logic is shared in sparse_predictor/cli.py. Run from anywhere, e.g.
    python main_mlp.py --data-path ../data/<dump> --L all
"""
import os
import sys

# Before torch loads: idle OpenMP threads sleep instead of spinning, so a busy core (another
# job on a small machine) does not stall every matmul.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sparse_predictor.cli import main  # noqa: E402  (after OMP_WAIT_POLICY)

if __name__ == "__main__":
    sys.exit(main(kind="mlp", family="opt"))
