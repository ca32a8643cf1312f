"""Calibrate the thresholds of the training-free sparse MLPs (teal, cats) on an activation dump.

Thin entry point: the logic is in sparse_predictor/calibration.py. Run from anywhere, e.g.
    python sparse_predictor/calibrate.py --data-path data/<dump> --checkpoint pretrained_models/<model> \
        --method teal --keep 0.5 0.25 0.1
"""
import os
import sys

# Before torch loads: idle OpenMP threads sleep instead of spinning (as the trainers' entry points).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sparse_predictor.calibration import main  # noqa: E402  (after OMP_WAIT_POLICY)

if __name__ == "__main__":
    sys.exit(main())
