"""Train Llama attention-head predictors (top-k heads by output norm).

Thin entry point: all logic is shared in sparse_predictor/cli.py. Run from anywhere, e.g.
    python main_att_llama.py --data-path ../data/<dump> --L all
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparse_predictor.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(kind="att", family="llama"))
