"""Study report over one or more study runs: python scripts/report.py RUN [RUN ...] (see dejavu_study.report)."""
import sys

from dejavu_study.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
