"""Study report: per-layer predictor recall and sparsity, residual drift, sparse perplexity.

    python scripts/report.py RUN [RUN ...] [--out DIR] [--name NAME]

A study run folder RUN holds
    study.json               what was run (model, data, documents, label rule, random_weights, ...)
    dump/meta.json + .mmap   the activation dump (shapes and token count come from meta.json)
    predictors/same/         metrics_mlp.jsonl, metrics_att.jsonl (+ checkpoints), --input same
    predictors/prev/         the same with --input prev (look-ahead)
    perplexity.jsonl         one line per inference run (dense / oracle / predicted)

Output (default ROOT/reports/<name>; name = the single run's name, else "comparison"):
    summary.json   every number the report uses, written first
    report.md      rendered from summary.json only (render_markdown)
    *.png          recall, sparsity, drift, perplexity and recall-vs-K plots; several runs overlay

Only study.json and dump/meta.json are required; anything else that is missing (prev predictors,
perplexity, deleted .mmap files) is reported as missing. Drift is computed from the dump once
and cached in RUN/dump/drift.json (reused while meta.json is unchanged; --recompute-drift).
"""

from dejavu_study.report.cli import main, write_report
from dejavu_study.report.findings import build_summary
from dejavu_study.report.markdown import render_markdown
from dejavu_study.report.plots import make_plots
from dejavu_study.report.runs import ReportError, load_run

__all__ = ["main", "write_report", "ReportError", "load_run", "build_summary", "render_markdown", "make_plots"]
