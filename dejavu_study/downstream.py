"""Downstream accuracy from lm-evaluation-harness results: dense against each sparse run.

The harness writes one `results_<date>.json` per run under its `--output_path` (in a subfolder
named after the model). `read_results(path)` reads every such file under a folder (or one file)
into plain JSON-able rows, one per (run, task, metric):

    {"run": label, "model": "dejavu", "model_args": {...}, "checkpoint": ..., "dense": bool,
     "task": ..., "metric": "acc" (or "exact_match,strip": the filter named when not "none"),
     "value": float, "stderr": float or None, "samples": int or None, "file": ...}

A run's label is its `label` model_arg, else for the `dejavu` model "dense" or the sparse
settings it ran with ("predicted mlp_keep=0.5 att_keep=0.5"), read from what the adapter
recorded in the results (`config.dejavu_flags`: the flags as parsed, environment defaults
included), else from model_args; another harness model (e.g. `hf`) is a dense run labelled by
its model and `pretrained`. A DejaVuLM instance handed to simple_evaluate is known by
what the adapter recorded. `render_table(rows)` renders the markdown table: per task and
metric the dense value, then each sparse run with its difference from dense (same checkpoint
where one was recorded). Neither reads anything but the rows, so the rows can be stored in a
summary and rendered from it later.

    python -m dejavu_study.downstream RESULTS_DIR     prints the table
"""

from __future__ import annotations

import glob
import json
import os
import sys

from dejavu_common.helpers import finite

SPARSE_FLAGS = ("sparse_mode", "mlp_keep", "att_keep", "sparse_layers", "sparse_mlp", "sparse_attention",
                "predictor_dtype", "no_gather", "thresholds", "sparse_path")
NOT_METRICS = ("alias", "name", "sample_len", "sample_count", "samples")


class DownstreamError(ValueError):
    pass


def results_files(path: str) -> list[str]:
    """The harness's results files under `path` (a folder, searched recursively), or `path` itself."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DownstreamError(f"no lm-eval results at {path}: not a file or folder")
    files = sorted(glob.glob(os.path.join(path, "**", "results_*.json"), recursive=True))
    if not files:
        raise DownstreamError(f"no results_*.json under {path} (lm_eval --output_path writes them)")
    return files


def parse_model_args(model_args) -> dict:
    """model_args as the harness recorded them: a dict (command line) or 'k=v,k=v' (Python API)."""
    if isinstance(model_args, dict):
        return dict(model_args)
    if not model_args:
        return {}
    parts, current, quote, depth = [], "", None, 0
    for char in str(model_args):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    args = {}
    for part in filter(None, (p.strip() for p in parts)):
        key, _, value = part.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        args[key.strip()] = value
    return args


def _fmt_keep(value):
    number = finite(value)
    return f"{number:g}" if number is not None else str(value)


def run_settings(config: dict) -> dict:
    """(model, model_args, checkpoint, dense, sparse settings, label) of one results file's config.
    A run of the adapter is known by its name "dejavu" or, when an instance was passed to
    simple_evaluate (no name, no model_args), by what the adapter recorded (config.dejavu_*)."""
    model = str(config.get("model") or "?")
    args = parse_model_args(config.get("model_args"))
    if model != "dejavu" and "dejavu_model_type" not in config:
        checkpoint = args.get("pretrained") or config.get("model_name")
        return {"model": model, "model_args": args, "checkpoint": checkpoint, "dense": True, "sparse": {},
                "label": args.get("label")}
    flags = config.get("dejavu_flags") or {}
    sparse = {name: flags.get(name, args.get(name)) for name in SPARSE_FLAGS if name in flags or name in args}
    model_type = str(config.get("dejavu_model_type") or args.get("model_type") or "llama")
    dense = "sparse" not in model_type or (sparse.get("sparse_mode") or "predicted") == "dense"
    checkpoint = config.get("dejavu_checkpoint") or args.get("checkpoint")
    return {"model": "dejavu", "model_args": args, "checkpoint": checkpoint, "dense": dense, "sparse": sparse,
            "model_type": model_type, "label": args.get("label") or config.get("dejavu_label")}


def run_label(settings: dict) -> str:
    if settings.get("label"):
        return str(settings["label"])
    if settings["model"] != "dejavu":
        return " ".join(str(part) for part in (settings["model"], settings.get("checkpoint")) if part)
    if settings["dense"]:
        return "dense"
    sparse = settings["sparse"]
    mode = sparse.get("sparse_mode") or "predicted"
    parts = [str(mode)]
    mlp_on, att_on = str(sparse.get("sparse_mlp", "on")) != "off", str(sparse.get("sparse_attention", "on")) != "off"
    if mlp_on and sparse.get("mlp_keep") is not None:
        parts.append(f"mlp_keep={_fmt_keep(sparse['mlp_keep'])}")
    if att_on and sparse.get("att_keep") is not None:
        parts.append(f"att_keep={_fmt_keep(sparse['att_keep'])}")
    if not mlp_on:
        parts.append("MLP dense")
    if not att_on:
        parts.append("heads dense")
    if sparse.get("sparse_layers") not in (None, "all"):
        parts.append(f"layers {sparse['sparse_layers']}")
    if sparse.get("predictor_dtype") not in (None, "float32"):
        parts.append(f"predictors {sparse['predictor_dtype']}")
    return " ".join(parts)


def rows_of_file(path: str) -> list[dict]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DownstreamError(f"{path}: not a readable results file ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise DownstreamError(f"{path}: no 'results' object (not an lm-eval results file)")
    settings = run_settings(data.get("config") or {})
    label = run_label(settings)
    samples = data.get("n-samples") or {}
    rows = []
    for task, metrics in sorted(data["results"].items()):
        if not isinstance(metrics, dict):
            continue
        count = samples.get(task, {}).get("effective") if isinstance(samples.get(task), dict) else None
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if name in NOT_METRICS or name.endswith("_stderr") or finite(value) is None:
                continue
            filter_name = filter_name or "none"
            rows.append({
                "run": label, "model": settings["model"], "model_args": settings["model_args"],
                "checkpoint": settings["checkpoint"], "dense": settings["dense"], "task": task,
                "metric": name if filter_name == "none" else f"{name},{filter_name}",
                "value": finite(value), "stderr": finite(metrics.get(f"{name}_stderr,{filter_name}")),
                "samples": count, "file": os.path.abspath(path), "date": data.get("date"),
            })
    return rows


def read_results(path: str) -> list[dict]:
    """Rows of every results file under `path`, runs in file order; a label seen twice gets ' (2)', ..."""
    rows, seen = [], {}
    for file in results_files(path):
        file_rows = rows_of_file(file)
        if not file_rows:
            continue
        label = file_rows[0]["run"]
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            for row in file_rows:
                row["run"] = f"{label} ({seen[label]})"
        rows += file_rows
    return rows


def dense_baseline(rows: list[dict], row: dict):
    """The dense row a sparse row is compared with: same task and metric, the same checkpoint where
    both recorded one, the adapter's own dense runs first."""
    candidates = [r for r in rows if r["dense"] and r["task"] == row["task"] and r["metric"] == row["metric"]]
    same = [r for r in candidates if r["checkpoint"] and r["checkpoint"] == row["checkpoint"]]
    pool = same or candidates
    pool.sort(key=lambda r: r["model"] != "dejavu")
    return pool[0] if pool else None


def _value(value, stderr=None):
    if value is None:
        return "–"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def render_table(rows: list[dict]) -> str:
    """Markdown: per task and metric the dense value, then each sparse run with its difference from
    dense ("–" where no dense run of that task and metric exists)."""
    if not rows:
        return "No downstream (lm-evaluation-harness) results.\n"
    lines = ["| task | metric | run | value ± stderr | Δ vs dense |", "|---|---|---|---|---|"]
    keys = []
    for row in rows:
        if (row["task"], row["metric"]) not in keys:
            keys.append((row["task"], row["metric"]))
    for task, metric in sorted(keys):
        group = [r for r in rows if r["task"] == task and r["metric"] == metric]
        group.sort(key=lambda r: (not r["dense"], r["run"]))
        for row in group:
            delta = "–"
            if not row["dense"]:
                base = dense_baseline(rows, row)
                if base is not None:
                    delta = f"{row['value'] - base['value']:+.4f}"
            else:
                delta = "(dense)"
            lines.append(f"| {task} | {metric} | {row['run']} | {_value(row['value'], row['stderr'])} | {delta} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        print(render_table(read_results(argv[0])), end="")
    except DownstreamError as error:
        print(f"downstream: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
