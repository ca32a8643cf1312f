"""Residual-stream drift of an activation dump: python scripts/drift.py DUMP_DIR (see dejavu_study.drift)."""
import sys

from dejavu_study.drift import main

if __name__ == "__main__":
    sys.exit(main())
