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
from dejavu_study.report.runs import ReportError, load_run, read_json_file

ROOT = repo_root()


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "report"


def write_report(run_dirs: list[str], out_dir: str | None = None, name: str | None = None,
                 recompute_drift: bool = False, drift_rows: int | None = None, progress: bool = True,
                 plots: bool = True, downstream_dir: str | None = None, controls: str | None = None) -> str:
    """Build summary.json, plots and report.md; returns the report.md path. Raises ReportError.
    downstream_dir: an lm-eval --output_path folder, whose results add a downstream table.
    controls: a controls report (scripts/controls.sh: its folder or summary.json), whose answer
    the Answer section names and links."""
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
        attach_downstream(summary)
    if controls:
        summary["controls"] = read_controls(controls, out_dir)
    summary_path = os.path.join(out_dir, "summary.json")
    write_json_atomic(summary_path, summary)
    with open(summary_path) as f:  # the markdown sees exactly what was written
        written = json.load(f)
    report_path = os.path.join(out_dir, "report.md")
    write_text_atomic(report_path, render_markdown(written))
    return report_path


def read_controls(path: str, out_dir: str) -> dict:
    """The answer of a controls report (dejavu_study/controls.py) and the link to it from out_dir."""
    summary_path = os.path.join(path, "summary.json") if os.path.isdir(path) else path
    controls = read_json_file(summary_path, "controls report summary")
    if controls.get("format") != "dejavu-llama-controls":
        raise ReportError(f"{summary_path}: not a controls report summary (format {controls.get('format')!r})")
    answer = controls.get("answer") or {}
    if not answer.get("sentence"):
        raise ReportError(f"{summary_path}: the controls summary has no answer (rerun python -m dejavu_study.controls)")
    markdown_path = os.path.join(os.path.dirname(os.path.abspath(summary_path)), "controls.md")
    return {"summary": os.path.abspath(summary_path), "link": os.path.relpath(markdown_path, out_dir),
            "model": controls.get("model"), "layers": controls.get("layer_spec") or controls.get("layers"),
            "sentence": answer["sentence"], "decisive": answer.get("decisive"), "answer": answer}


CONFIG_SUFFIX = ".sparse_config.json"  # beside a run's results file (modules/sparse_config.py)


def chosen_configs(run_dir: str) -> list[str]:
    """The saved SparseConfig files of the configurations the Answer picks (where sparsity pays),
    each once, in budget order: what a downstream task is run on next to dense."""
    run = load_run(run_dir, progress=False)
    summary = build_summary([run], run["name"])
    pays = (summary["runs"][0]["findings"]["perplexity"] or {}).get("where_sparsity_pays") or {}
    files = []
    for budget in pays.get("budgets", []):
        path = (budget.get("result_file") or "") + CONFIG_SUFFIX
        if budget.get("result_file") and os.path.isfile(path) and path not in files:
            files.append(path)
    return files


def downstream_accuracy(rows: list[dict], config_file: str | None, metric: str = "acc") -> dict | None:
    """The downstream row (first task) of the run set up from `config_file` (its sparse_config
    model_arg), or of dense with None."""
    for row in rows:
        if row.get("metric") != metric:
            continue
        made_from = (row.get("model_args") or {}).get("sparse_config")
        if config_file is None and row.get("dense") and not made_from:
            return row
        if config_file is not None and made_from and os.path.realpath(made_from) == os.path.realpath(config_file):
            return row
    return None


def attach_downstream(summary: dict) -> None:
    """Each Answer budget gets the downstream accuracy of its configuration (and dense's), where run."""
    rows = summary.get("downstream") or []
    for run in summary["runs"]:
        pays = (run["findings"]["perplexity"] or {}).get("where_sparsity_pays")
        if not pays:
            continue
        dense = downstream_accuracy(rows, None)
        if dense is not None:
            pays["downstream_dense"] = {k: dense.get(k) for k in ("task", "metric", "value", "stderr", "samples")}
        for budget in pays["budgets"]:
            if budget.get("result_file"):
                row = downstream_accuracy(rows, budget["result_file"] + CONFIG_SUFFIX)
                if row is not None:
                    budget["downstream"] = {k: row.get(k) for k in ("task", "metric", "value", "stderr", "samples")}


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
    p.add_argument("--controls", metavar="PATH", default=None,
                   help="a controls report (scripts/controls.sh: its folder or summary.json): the Answer names "
                        "its decisive control and links it")
    p.add_argument("--chosen-configs", action="store_true",
                   help="print the saved SparseConfig files of the configurations the Answer picks (one RUN), "
                        "one a line, and write nothing")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="[report] %(levelname)s: %(message)s", stream=sys.stderr)
    if args.drift_rows is not None and args.drift_rows < 1:
        p.error(f"--drift-rows must be at least 1, got {args.drift_rows}")
    if args.chosen_configs:
        if len(args.runs) != 1:
            p.error("--chosen-configs takes one RUN")
        try:
            print("\n".join(chosen_configs(args.runs[0])))
        except ReportError as e:
            print(f"report: error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        path = write_report(args.runs, args.out, args.name, args.recompute_drift, args.drift_rows,
                            progress=not args.no_progress, plots=not args.no_plots, downstream_dir=args.downstream,
                            controls=args.controls)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0
