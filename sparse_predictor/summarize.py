"""Per-layer summary table of predictor training runs, read from the metrics files.

    python summarize.py --ckpt-dir DIR [--kind mlp|att|all] [--run-id ID] [--layers "0 1 2"]

Shows the latest line per (kind, layer), optionally only from one run (--run-id, as the run
scripts pass), and flags expected layers (--layers) that have no line as "missing". Exit status
1 when any shown layer failed or is missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from sparse_predictor.predictor import METRICS_FILES

COLUMNS = (("recall", "recall"), ("precision", "prec"), ("f1", "f1"), ("true_sparsity", "true_sp"),
           ("classifier_sparsity", "clf_sp"), ("recall_at_matched_k", "rec@K"))


def read_entries(path: str) -> list[dict]:
    entries = []
    if not os.path.isfile(path):
        return entries
    with open(path) as f:
        for line in f:
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue  # a line torn by a killed writer
    return entries


def latest_per_layer(entries: list[dict], run_id: str | None) -> dict[int, dict]:
    latest = {}
    for entry in entries:
        if run_id and entry.get("run_id") != run_id:
            continue
        latest[int(entry["layer"])] = entry  # later lines win
    return latest


def _fmt(value) -> str:
    return "   -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.3f}"


def format_table(kind: str, latest: dict[int, dict], expected: list[int] | None) -> tuple[str, int]:
    """(table text, number of failed or missing layers)."""
    layers = sorted(set(latest) | set(expected or []))
    head = f"{'layer':>5} {'status':>7} " + " ".join(f"{short:>6}" for _, short in COLUMNS) + \
        f" {'train':>7} {'val':>6} {'input':>12} {'label':>22} {'sec':>6}"
    lines = [f"== {kind} predictors ==", head]
    bad, ok_values = 0, {name: [] for name, _ in COLUMNS}
    for layer in layers:
        e = latest.get(layer)
        if e is None:
            bad += 1
            lines.append(f"{layer:>5} {'missing':>7}  (no metrics line: the process died or never ran this layer)")
            continue
        if e.get("status") != "ok":
            bad += 1
            lines.append(f"{layer:>5} {'FAILED':>7}  {e.get('error', '')}")
            continue
        val = e.get("val", {})
        for name, _ in COLUMNS:
            if val.get(name) is not None:
                ok_values[name].append(val[name])
        rule = e.get("label_rule", {})
        label = rule.get("name", "") + "".join(
            f" {k}={v:.3g}" for k, v in rule.items() if k in ("k", "threshold") and v is not None)
        lines.append(f"{layer:>5} {'ok':>7} " + " ".join(_fmt(val.get(name)) for name, _ in COLUMNS) +
                     f" {e.get('rows_train', 0):>7} {e.get('rows_val', 0):>6} {e.get('input_source', ''):>12}"
                     f" {label:>22} {e.get('seconds', 0):>6.1f}")
    if any(ok_values.values()):
        lines.append(f"{'mean':>5} {'':>7} " + " ".join(
            _fmt(sum(v) / len(v) if v else None) for v in ok_values.values()))
    n_ok = len(layers) - bad
    lines.append(f"{kind}: {n_ok} of {len(layers)} layers ok" + (f", {bad} failed or missing" if bad else ""))
    return "\n".join(lines), bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--kind", choices=("mlp", "att", "all"), default="all")
    p.add_argument("--run-id", default=None, help="only lines from this run")
    p.add_argument("--layers", default=None, help="expected layers, space or comma separated")
    args = p.parse_args(argv)
    expected = [int(t) for t in args.layers.replace(",", " ").split()] if args.layers else None
    kinds = ("mlp", "att") if args.kind == "all" else (args.kind,)
    total_bad, shown = 0, 0
    for kind in kinds:
        latest = latest_per_layer(read_entries(os.path.join(args.ckpt_dir, METRICS_FILES[kind])), args.run_id)
        if not latest and args.kind == "all" and expected is None:
            continue
        text, bad = format_table(kind, latest, expected)
        print(text)
        total_bad += bad
        shown += 1
    if not shown:
        print(f"no metrics in {args.ckpt_dir}", file=sys.stderr)
        return 1
    return 1 if total_bad else 0


if __name__ == "__main__":
    sys.exit(main())
