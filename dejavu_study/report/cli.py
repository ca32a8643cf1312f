"""The report's command line: python scripts/report.py RUN [RUN ...] [--out DIR] [--name NAME]."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from dejavu_common.helpers import repo_root, write_json_atomic, write_text_atomic
from dejavu_study import downstream
from dejavu_study.report.findings import build_summary
from dejavu_study.report.markdown import render_markdown
from dejavu_study.report.plots import make_plots
from dejavu_study.report.runs import ReportError, load_run

ROOT = repo_root()


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "report"


def write_report(run_dirs: list[str], out_dir: str | None = None, name: str | None = None,
                 recompute_drift: bool = False, drift_rows: int | None = None, progress: bool = True,
                 plots: bool = True, downstream_dir: str | None = None) -> str:
    """Build summary.json, plots and report.md; returns the report.md path. Raises ReportError.
    downstream_dir: an lm-eval --output_path folder, whose results add a downstream table."""
    runs = [load_run(r, recompute_drift, drift_rows, progress) for r in run_dirs]
    name = name or (runs[0]["name"] if len(runs) == 1 else "comparison")
    out_dir = os.path.abspath(out_dir or os.path.join(ROOT, "reports", safe_name(name)))
    os.makedirs(out_dir, exist_ok=True)
    summary = build_summary(runs, name)
    summary["plots"] = make_plots(summary, out_dir) if plots else {}
    summary["plots_skipped"] = not plots
    if downstream_dir:
        try:
            summary["downstream"] = downstream.read_results(downstream_dir)
        except downstream.DownstreamError as error:
            raise ReportError(str(error)) from None
    summary_path = os.path.join(out_dir, "summary.json")
    write_json_atomic(summary_path, summary)
    with open(summary_path) as f:  # the markdown sees exactly what was written
        written = json.load(f)
    report_path = os.path.join(out_dir, "report.md")
    write_text_atomic(report_path, render_markdown(written))
    return report_path


def main(argv: list[str] | None = None) -> int:
    # the package docstring says what a run folder holds and what is written
    description = sys.modules[__package__].__doc__
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="study run folder(s); several overlay")
    p.add_argument("--out", default=None, help="output folder (default ROOT/reports/<name>)")
    p.add_argument("--name", default=None, help="report name (default: the run's name, or 'comparison')")
    p.add_argument("--recompute-drift", action="store_true", help="ignore RUN/dump/drift.json")
    p.add_argument("--drift-rows", type=int, default=None, help="compute drift on the first N rows only")
    p.add_argument("--no-plots", action="store_true", help="summary.json and report.md only")
    p.add_argument("--downstream", metavar="DIR", default=None,
                   help="an lm-eval --output_path folder (dejavu-lm-eval): adds a downstream table, dense "
                        "against each sparse run")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="[report] %(levelname)s: %(message)s", stream=sys.stderr)
    if args.drift_rows is not None and args.drift_rows < 1:
        p.error(f"--drift-rows must be at least 1, got {args.drift_rows}")
    try:
        path = write_report(args.runs, args.out, args.name, args.recompute_drift, args.drift_rows,
                            progress=not args.no_progress, plots=not args.no_plots, downstream_dir=args.downstream)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0
