"""Per-layer MLP kept fractions from each layer's sensitivity on the training dump (predicted, teal, cats).

Thin entry point: the logic is in sparse_predictor/allocation.py. Run from anywhere, e.g.
    python sparse_predictor/allocate.py --data-path data/<dump> --checkpoint pretrained_models/<model> \
        --method teal --predictors <predictors> --target-keep 0.5 0.25
"""
import os
import sys

# Before torch loads: idle OpenMP threads sleep instead of spinning (as the trainers' entry points).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sparse_predictor.allocation import main  # noqa: E402  (after OMP_WAIT_POLICY)

if __name__ == "__main__":
    sys.exit(main())
