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

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.dirname(os.path.abspath(__file__))
for _path in (ROOT, SCRIPTS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import drift as drift_mod  # noqa: E402
from sparse_predictor.dump_reader import DumpError, DumpReader  # noqa: E402

log = logging.getLogger("report")

SUMMARY_FORMAT = "dejavu-llama-report"
SUMMARY_VERSION = 1
KINDS = ("mlp", "att")
PERPLEXITY_TOLERANCE_PCT = 5.0  # "holds up": sparse perplexity within this much of dense
MODES = ("same", "prev")
# Same names as sparse_predictor.predictor.METRICS_FILES (not imported: that module pulls in torch;
# tests/test_report.py checks they agree).
METRICS_FILES = {"mlp": "metrics_mlp.jsonl", "att": "metrics_att.jsonl"}
PREDICTOR_FIELDS = ("recall", "precision", "f1", "true_sparsity", "classifier_sparsity", "recall_at_matched_k")
RECALL_FLOOR = 0.9  # layers below this are listed (DejaVu reports ~0.95+ recall for OPT)
KIND_TITLES = {"mlp": "MLP neurons", "att": "attention heads"}
INPUT_DESCRIPTIONS = {
    ("mlp", "same"): "mlp_x_l", ("mlp", "prev"): "att_x_l (before attention)",
    ("att", "same"): "att_x_l", ("att", "prev"): "att_x_{l-1} (look-ahead)",
}
DRIFT_FIELDS = ("cos_next_layer", "cos_mlp_x", "rel_change_next_layer", "rel_change_mlp_x")
RANDOM_WEIGHTS_MARK = "random weights — not evidence"


class ReportError(Exception):
    """Bad input the user must fix (missing or unreadable required file)."""


# ---- small helpers ------------------------------------------------------------------------------
def finite(value) -> float | None:
    """A finite float, else None (JSON has no NaN; undefined numbers stay visibly undefined)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def pearson(xs, ys) -> float | None:
    """Correlation of paired values; None with fewer than 3 pairs or no variance."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    mx, my = mean([p[0] for p in pairs]), mean([p[1] for p in pairs])
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    if sxx <= 0 or syy <= 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def slope(xs, ys) -> float | None:
    """Least-squares slope of y over x; None with fewer than 2 points."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if len(pairs) < 2:
        return None
    mx, my = mean([p[0] for p in pairs]), mean([p[1] for p in pairs])
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    return sum((x - mx) * (y - my) for x, y in pairs) / sxx if sxx > 0 else None


def sanitize(obj):
    """Recursively replace NaN / inf floats by None so the summary is strict JSON."""
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "report"


def write_text_atomic(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json_file(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ReportError(f"missing {what}: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ReportError(f"unreadable {what} {path}: {e}") from e
    if not isinstance(data, dict):
        raise ReportError(f"{what} {path} is not a JSON object")
    return data


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """(entries, bad line count); torn or non-object lines are counted, not fatal."""
    entries, bad = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                bad += 1
    return entries, bad


# ---- study.json -----------------------------------------------------------------------------------
STUDY_FIELDS = ("name", "model", "model_type", "checkpoint", "data", "documents", "random_weights",
                "label_rule", "stages", "device", "notes")


def read_study(run_dir: str) -> tuple[dict, list[str]]:
    study = read_json_file(os.path.join(run_dir, "study.json"), "study file")
    warnings = [f"study.json has no '{key}'" for key in ("name", "model", "model_type", "random_weights")
                if key not in study]
    out = {key: study.get(key) for key in STUDY_FIELDS}
    out["name"] = str(study.get("name") or os.path.basename(os.path.abspath(run_dir)))
    rw = study.get("random_weights")
    out["random_weights"] = rw if isinstance(rw, bool) else None  # None: not stated
    return out, warnings


# ---- dump and drift -------------------------------------------------------------------------------
def read_dump(run_dir: str) -> DumpReader:
    meta_path = os.path.join(run_dir, "dump", "meta.json")
    if not os.path.isfile(meta_path):
        raise ReportError(f"missing dump metadata file: {meta_path}")
    try:
        return DumpReader(os.path.join(run_dir, "dump"))
    except DumpError as e:
        raise ReportError(str(e)) from e


def dump_summary(reader: DumpReader) -> dict:
    meta = reader.meta
    rows = [int(v) for v in meta["rows"].values()]
    return {
        "path": reader.path, "model": reader.model, "model_type": reader.model_type,
        "tokens": meta.get("tokens"), "capacity": reader.capacity,
        "complete": bool(meta.get("complete", False)), "capacity_reached": bool(meta.get("capacity_reached", False)),
        "num_layers": reader.num_layers, "layers": sorted(reader.layers),
        "hidden_size": reader.hidden_size, "intermediate_size": reader.intermediate_size,
        "num_heads": reader.num_heads, "rows_min": min(rows) if rows else 0, "rows_max": max(rows) if rows else 0,
        "source": meta.get("source"),
    }


def load_drift(reader: DumpReader, recompute: bool, max_rows: int | None, progress: bool) -> dict:
    """{"status": "ok"|"missing", "source", "layers": {layer: stats}, "reason"}; never raises DumpError."""
    cache = os.path.join(reader.path, "drift.json")
    cached = None if recompute else drift_mod.load_cached(cache, reader.path, reader.meta, max_rows)
    if cached is not None:
        log.info("drift: reusing %s", cache)
        result, source = cached, "cache"
    else:
        try:
            result = drift_mod.compute_drift(reader.path, max_rows=max_rows, progress=progress)
        except DumpError as e:
            log.warning("drift not computed: %s", e)
            return {"status": "missing", "reason": str(e), "layers": {}}
        source = "computed"
        try:
            drift_mod.write_json_atomic(cache, result)
        except OSError as e:  # a read-only dump folder only costs the cache
            log.warning("could not cache drift in %s: %s", cache, e)
    layers = {int(e["layer"]): {k: e.get(k) for k in ("rows", "rows_skipped", "next_layer", *DRIFT_FIELDS)}
              for e in result["layers"]}
    return {"status": "ok", "source": source, "max_rows": max_rows, "cache": cache, "layers": layers}


# ---- predictor metrics ----------------------------------------------------------------------------
def latest_lines(entries: list[dict], kind: str) -> tuple[dict[int, dict], dict[int, dict]]:
    """(latest ok line per layer, latest failed line per layer without any ok line).

    Same rule as sparse_predictor.predictor.load_predictor_info: later "ok" lines win.
    """
    ok, failed = {}, {}
    for entry in entries:
        if entry.get("kind") != kind or not isinstance(entry.get("layer"), int):
            continue
        if entry.get("status") == "ok":
            ok[entry["layer"]] = entry
        else:
            failed[entry["layer"]] = entry
    return ok, {layer: e for layer, e in failed.items() if layer not in ok}


def predictor_record(entry: dict) -> dict:
    """The per-layer numbers and settings the report uses, from one metrics line."""
    val = entry.get("val") or {}
    record = {name: finite(val.get(name)) for name in PREDICTOR_FIELDS}
    ts = record["true_sparsity"]
    # K / width at matched K: the recall@K an uninformed predictor gets (exact for top-k labels)
    record["kept_fraction"] = None if ts is None else 1.0 - ts
    for key in ("input_mode", "input_source", "label_source", "label_rule", "rows_train", "rows_val",
                "best_epoch", "epochs_run", "run_id", "data_path", "model"):
        record[key] = entry.get(key)
    # the folder's mode; input_mode is what was used (attention layer 0 falls back to "same")
    record["input_mode_requested"] = entry.get("input_mode_requested", entry.get("input_mode"))
    curve = val.get("recall_at_k")
    if isinstance(curve, dict) and curve:  # recall of the top ceil(f * width) units, per kept fraction f
        record["recall_curve"] = sorted([float(f), kept_fraction(float(f), entry.get("out")), finite(v)]
                                        for f, v in curve.items())
    return record


def kept_fraction(nominal: float, width) -> float:
    """K / width actually kept for a nominal fraction (K = ceil(f * width), at least 1, as the trainer counts).

    With 4 heads, 0.05 keeps 1 head = 0.25: plotting at 0.05 would put chance above the diagonal.
    """
    if not isinstance(width, int) or width <= 0:
        return nominal
    return max(1, min(width, math.ceil(nominal * width - 1e-9))) / width


def describe_rule(rule) -> str:
    if not isinstance(rule, dict):
        return str(rule) if rule else "?"
    params = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rule.items() if k != "name"]
    return rule.get("name", "?") + (f" ({', '.join(params)})" if params else "")


def read_predictor_set(folder: str, kind: str, mode: str, dump_path: str, layers: list[int]) -> dict:
    path = os.path.join(folder, METRICS_FILES[kind])
    if not os.path.isfile(path):
        return {"status": "missing", "path": path, "layers": {}, "reason": f"no {path}"}
    entries, bad = read_jsonl(path)
    ok, failed = latest_lines(entries, kind)
    records = {layer: predictor_record(e) for layer, e in ok.items()}
    warnings = []
    if bad:
        warnings.append(f"{path}: {bad} unreadable line(s) skipped")
    modes = sorted({str(r["input_mode_requested"]) for r in records.values()})
    if modes and modes != [mode]:
        warnings.append(f"{path}: lines have input mode {', '.join(modes)}, expected {mode}")
    others = sorted({r["data_path"] for r in records.values()
                     if r["data_path"] and os.path.abspath(r["data_path"]) != dump_path})
    if others:
        warnings.append(f"{path}: predictors were trained on another dump path ({', '.join(others)})")
    rules = sorted({describe_rule(r["label_rule"]) for r in records.values()})
    return {
        "status": "ok" if records else "empty", "path": path, "layers": records,
        "layers_ok": sorted(records), "layers_failed": sorted(failed),
        "failures": {layer: failed[layer].get("error", "") for layer in sorted(failed)},
        "layers_missing": [l for l in layers if l not in records and l not in failed],
        "label_rules": rules, "warnings": warnings,
    }


def read_predictors(run_dir: str, dump_path: str, layers: list[int]) -> dict:
    out = {kind: {} for kind in KINDS}
    for mode in MODES:
        folder = os.path.join(run_dir, "predictors", mode)
        for kind in KINDS:
            out[kind][mode] = read_predictor_set(folder, kind, mode, dump_path, layers)
    return out


# ---- perplexity -----------------------------------------------------------------------------------
def keep_key(value) -> float | None:
    return None if value is None else round(float(value), 6)


def read_perplexity(run_dir: str) -> dict:
    path = os.path.join(run_dir, "perplexity.jsonl")
    if not os.path.isfile(path):
        return {"status": "missing", "path": path, "entries": [], "dense": None}
    raw, bad = read_jsonl(path)
    warnings = [f"{path}: {bad} unreadable line(s) skipped"] if bad else []
    latest = {}
    for i, e in enumerate(raw):
        if e.get("mode") not in ("dense", "oracle", "predicted") or "perplexity" not in e:
            warnings.append(f"{path}: entry {i + 1} has no valid mode/perplexity; skipped")
            continue
        key = (e["mode"], keep_key(e.get("mlp_keep")), keep_key(e.get("att_keep")))
        latest[key] = e  # a rerun replaces the earlier line
    dense = [e for (mode, _, _), e in latest.items() if mode == "dense"]
    dense = dense[-1] if dense else None
    dense_ppl = finite(dense["perplexity"]) if dense else None
    entries = []
    for (mode, mlp_keep, att_keep), e in sorted(latest.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2] or 0)):
        ppl = finite(e.get("perplexity"))
        entry = {"mode": mode, "mlp_keep": mlp_keep, "att_keep": att_keep, "perplexity": ppl,
                 "perplexity_raw": None if ppl is not None else str(e.get("perplexity")),
                 "tokens": e.get("tokens"), "result_file": e.get("result_file")}
        if mode != "dense" and dense_ppl and ppl is not None:
            entry["increase"] = ppl - dense_ppl
            entry["increase_pct"] = 100.0 * (ppl / dense_ppl - 1.0)
        entries.append(entry)
        if dense and mode != "dense" and e.get("tokens") != dense.get("tokens"):
            warnings.append(f"{mode} run (mlp_keep={mlp_keep}, att_keep={att_keep}) scored "
                            f"{e.get('tokens')} tokens, the dense run {dense.get('tokens')}: not the same text")
    if dense is None and entries:
        warnings.append(f"{path}: no dense run, so no perplexity increase can be computed")
    return {"status": "ok" if entries else "empty", "path": path, "entries": entries,
            "dense": None if dense is None else {"perplexity": dense_ppl, "tokens": dense.get("tokens")},
            "warnings": warnings}


# ---- findings (numbers only, no verdict) ------------------------------------------------------
def predictor_findings(layers: list[dict], kind: str, mode: str) -> dict | None:
    rows = [(l["layer"], l[kind][mode]) for l in layers if l[kind][mode] is not None]
    if not rows:
        return None
    idx = [layer for layer, _ in rows]
    recall = [r["recall"] for _, r in rows]
    valid = [(layer, v) for layer, v in zip(idx, recall) if v is not None]
    half = len(rows) // 2
    return {
        "layers": len(rows),
        "mean_recall": mean(recall),
        "min_recall": min(valid, key=lambda p: p[1])[1] if valid else None,
        "min_recall_layer": min(valid, key=lambda p: p[1])[0] if valid else None,
        "max_recall": max(v for _, v in valid) if valid else None,
        "mean_precision": mean(r["precision"] for _, r in rows),
        "mean_recall_at_matched_k": mean(r["recall_at_matched_k"] for _, r in rows),
        "mean_kept_fraction": mean(r["kept_fraction"] for _, r in rows),
        "mean_true_sparsity": mean(r["true_sparsity"] for _, r in rows),
        "mean_classifier_sparsity": mean(r["classifier_sparsity"] for _, r in rows),
        "layers_recall_below_floor": [layer for layer, v in valid if v < RECALL_FLOOR],
        "recall_floor": RECALL_FLOOR,
        "recall_slope_per_layer": slope(idx, recall),
        "mean_recall_first_half": mean(recall[:half]) if half else None,
        "mean_recall_second_half": mean(recall[half:]) if half else None,
        "mean_recall_curve": mean_curve([r.get("recall_curve") for _, r in rows]),
        # e.g. attention layer 0 with input prev: no earlier layer, trained on its own input
        "layers_input_fallback": [layer for layer, r in rows
                                  if r.get("input_mode") and r["input_mode"] != r.get("input_mode_requested")],
    }


def mean_curve(curves) -> list | None:
    """[[nominal fraction, K/width, mean recall over the layers that have it], ...] or None."""
    by_fraction = {}
    for curve in curves:
        for nominal, kept, value in curve or []:
            by_fraction.setdefault(nominal, []).append((kept, value))
    return [[f, mean(k for k, _ in v), mean(r for _, r in v)] for f, v in sorted(by_fraction.items())] or None


def lookahead_input_cosine(layer_entry: dict, layers_by_index: dict, kind: str) -> float | None:
    """Mean cosine of the look-ahead input with the same-layer input (the drift the look-ahead must bridge)."""
    layer = layer_entry["layer"]
    if kind == "mlp":  # prev = att_x_l, same = mlp_x_l
        stats = (layer_entry["drift"] or {}).get("cos_mlp_x")
    else:  # prev = att_x_{l-1}, same = att_x_l; layer 0 falls back to same and is left out
        before = layers_by_index.get(layer - 1)
        stats = (before["drift"] or {}).get("cos_next_layer") if before else None
    return stats["mean"] if stats else None


def lookahead_findings(layers: list[dict], kind: str) -> dict | None:
    # layers whose look-ahead input is their own input (attention layer 0) say nothing about look-ahead
    both = [l for l in layers if l[kind]["same"] is not None and l[kind]["prev"] is not None
            and l[kind]["prev"]["input_source"] != l[kind]["same"]["input_source"]]
    if not both:
        return None
    by_index = {l["layer"]: l for l in layers}
    cos = [lookahead_input_cosine(l, by_index, kind) for l in both]
    recall_prev = [l[kind]["prev"]["recall"] for l in both]
    rak_prev = [l[kind]["prev"]["recall_at_matched_k"] for l in both]

    def diffs(field):
        return [None if l[kind]["prev"][field] is None or l[kind]["same"][field] is None
                else l[kind]["prev"][field] - l[kind]["same"][field] for l in both]

    return {
        "layers": len(both),
        "mean_recall_prev_minus_same": mean(diffs("recall")),
        "mean_recall_at_matched_k_prev_minus_same": mean(diffs("recall_at_matched_k")),
        "corr_prev_recall_vs_input_cosine": pearson(cos, recall_prev),
        "corr_prev_recall_at_matched_k_vs_input_cosine": pearson(cos, rak_prev),
        "corr_layers": sum(1 for c, r in zip(cos, recall_prev) if c is not None and r is not None),
    }


def drift_findings(layers: list[dict]) -> dict | None:
    with_drift = [l for l in layers if l["drift"]]
    if not with_drift:
        return None

    def series(field):
        return [(l["layer"], l["drift"][field]["mean"]) for l in with_drift if l["drift"].get(field)]

    out = {}
    for field in DRIFT_FIELDS:
        points = series(field)
        if not points:
            out[field] = None
            continue
        values = [v for _, v in points]
        low = min(points, key=lambda p: p[1])
        high = max(points, key=lambda p: p[1])
        half = len(values) // 2
        out[field] = {"mean": mean(values), "min": low[1], "min_layer": low[0], "max": high[1],
                      "max_layer": high[0], "mean_first_half": mean(values[:half]) if half else None,
                      "mean_second_half": mean(values[half:]) if half else None, "layers": len(values)}
    return out


def perplexity_findings(perplexity: dict) -> dict | None:
    if perplexity["status"] != "ok":
        return None
    points = {}
    for e in perplexity["entries"]:
        if e["mode"] == "dense":
            continue
        key = (e["mlp_keep"], e["att_keep"])
        points.setdefault(key, {})[e["mode"]] = e
    comparisons = []
    for (mlp_keep, att_keep), modes in sorted(points.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1] or 0)):
        oracle, predicted = modes.get("oracle"), modes.get("predicted")
        item = {"mlp_keep": mlp_keep, "att_keep": att_keep}
        for name, e in (("oracle", oracle), ("predicted", predicted)):
            item[f"{name}_run"] = e is not None
            item[f"{name}_raw"] = None if e is None else e.get("perplexity_raw")  # e.g. "inf": diverged
            item[name] = None if e is None else e["perplexity"]
            item[f"{name}_increase_pct"] = None if e is None else e.get("increase_pct")
        if oracle and predicted and oracle["perplexity"] and predicted["perplexity"]:
            item["predicted_over_oracle_pct"] = 100.0 * (predicted["perplexity"] / oracle["perplexity"] - 1.0)
        comparisons.append(item)
    return {"dense": (perplexity["dense"] or {}).get("perplexity"), "at_kept_fraction": comparisons,
            "lowest_keep_within_tolerance": lowest_keep_within_tolerance(perplexity["entries"])}


def lowest_keep_within_tolerance(entries: list[dict]) -> dict:
    """Per component made sparse alone (the other dense) and mode: the lowest kept fraction whose
    perplexity is within PERPLEXITY_TOLERANCE_PCT of dense, and the fractions that were run."""
    out = {}
    for axis, other in (("mlp", "att"), ("att", "mlp")):
        for mode in ("oracle", "predicted"):
            runs = sorted(((e[f"{axis}_keep"], e.get("increase_pct")) for e in entries
                           if e["mode"] == mode and e[f"{axis}_keep"] is not None
                           and (e[f"{other}_keep"] is None or e[f"{other}_keep"] >= 1.0)),
                          key=lambda run: run[0])
            if not runs:
                continue
            within = [keep for keep, pct in runs if pct is not None and pct <= PERPLEXITY_TOLERANCE_PCT + 1e-9]
            out[f"{axis}_{mode}"] = {"lowest_keep": min(within) if within else None,
                                     "kept_fractions": [keep for keep, _ in runs],
                                     "increase_pct": [pct for _, pct in runs]}
    return out


# ---- one run --------------------------------------------------------------------------------------
def per_layer(layers: list[int], dump_rows: dict, predictors: dict, drift: dict) -> list[dict]:
    out = []
    for layer in layers:
        entry = {"layer": layer, "rows": dump_rows.get(str(layer))}
        for kind in KINDS:
            entry[kind] = {mode: predictors[kind][mode]["layers"].get(layer) for mode in MODES}
        entry["drift"] = drift["layers"].get(layer)
        out.append(entry)
    return out


def load_run(run_dir: str, recompute_drift: bool = False, drift_rows: int | None = None,
             progress: bool = True) -> dict:
    """Everything the report says about one study run, as plain JSON-able data."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise ReportError(f"run folder not found: {run_dir}")
    study, warnings = read_study(run_dir)
    reader = read_dump(run_dir)
    dump = dump_summary(reader)
    log.info("run %s: %s, %s tokens, %d layers", study["name"], study.get("model"), dump["tokens"], len(dump["layers"]))
    drift = load_drift(reader, recompute_drift, drift_rows, progress)
    predictors = read_predictors(run_dir, reader.path, dump["layers"])
    perplexity = read_perplexity(run_dir)
    layers = per_layer(dump["layers"], reader.meta["rows"], predictors, drift)

    missing = []
    for kind in KINDS:
        for mode in MODES:
            p = predictors[kind][mode]
            warnings += p.get("warnings", [])
            if p["status"] != "ok":
                missing.append(f"{kind} predictors, input {mode}: {p.get('reason') or 'no ok lines in ' + p['path']}")
                continue
            if p["layers_failed"]:
                missing.append(f"{kind} predictors, input {mode}: training failed for layers {p['layers_failed']}")
            if p["layers_missing"]:
                missing.append(f"{kind} predictors, input {mode}: no metrics for layers {p['layers_missing']}")
    if drift["status"] != "ok":
        missing.append(f"drift: {drift['reason']}")
    if perplexity["status"] != "ok":
        missing.append(f"perplexity: no results ({perplexity['path']} {'missing' if perplexity['status'] == 'missing' else 'has no valid line'})")
    warnings += perplexity.get("warnings", [])
    if study.get("model_type") and study["model_type"] != dump["model_type"]:
        warnings.append(f"study.json model_type {study['model_type']!r} but dump model_type {dump['model_type']!r}")
    if not dump["complete"]:
        warnings.append("the dump is not marked complete (collection stopped early or is still running)")

    findings = {
        "predictors": {kind: {mode: predictor_findings(layers, kind, mode) for mode in MODES} for kind in KINDS},
        "lookahead": {kind: lookahead_findings(layers, kind) for kind in KINDS},
        "drift": drift_findings(layers),
        "perplexity": perplexity_findings(perplexity),
    }
    return {
        "name": study["name"], "path": run_dir, "study": study, "dump": dump,
        "evidence": study["random_weights"] is not True,
        "predictors": {kind: {mode: {k: v for k, v in predictors[kind][mode].items() if k != "layers"}
                              for mode in MODES} for kind in KINDS},
        "drift": {k: v for k, v in drift.items() if k != "layers"},
        "perplexity": perplexity,
        "layers": layers, "findings": findings, "missing": missing, "warnings": warnings,
    }


# ---- summary --------------------------------------------------------------------------------------
def unique_names(runs: list[dict]) -> None:
    seen = {}
    for run in runs:
        base = run["name"]
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            run["name"] = f"{base} ({seen[base]})"


def comparison(runs: list[dict]) -> dict | None:
    """Side-by-side headline numbers of several runs (no verdict: the reader compares)."""
    if len(runs) < 2:
        return None
    rows = []
    for run in runs:
        f = run["findings"]
        row = {"run": run["name"], "evidence": run["evidence"]}
        for kind in KINDS:
            for mode in MODES:
                p = f["predictors"][kind][mode]
                row[f"{kind}_{mode}_mean_recall"] = p["mean_recall"] if p else None
                row[f"{kind}_{mode}_mean_recall_at_matched_k"] = p["mean_recall_at_matched_k"] if p else None
                row[f"{kind}_{mode}_mean_kept_fraction"] = p["mean_kept_fraction"] if p else None
        d = f["drift"] or {}
        for field in DRIFT_FIELDS:
            row[f"mean_{field}"] = (d.get(field) or {}).get("mean")
        rows.append(row)
    return {"rows": rows}


def build_summary(runs: list[dict], name: str) -> dict:
    unique_names(runs)
    return sanitize({
        "format": SUMMARY_FORMAT, "version": SUMMARY_VERSION, "name": name,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recall_floor": RECALL_FLOOR, "runs": runs, "comparison": comparison(runs), "plots": {},
    })


# ---- plots (from the summary only) ----------------------------------------------------------------
def run_label(run: dict) -> str:
    return run["name"] + ("" if run["evidence"] else " [random weights]")


def save_figure(fig, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def same_depth(summary: dict) -> bool:
    return len({len(run["dump"]["layers"]) for run in summary["runs"]}) <= 1


def depth_of(summary: dict, run: dict, layer: int) -> float:
    """The x of a layer: its index, or layer / last layer when the runs' models differ in depth
    (OPT-125m's 12 layers against Llama-3.2-3B's 28 line up by relative depth)."""
    if same_depth(summary):
        return layer
    return layer / max(1, len(run["dump"]["layers"]) - 1)


def depth_label(summary: dict, base: str = "layer") -> str:
    return base if same_depth(summary) else f"relative depth ({base} / last layer)"


def layer_series(summary: dict, run: dict, getter) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for layer in run["layers"]:
        value = getter(layer)
        if value is not None:
            xs.append(depth_of(summary, run, layer["layer"]))
            ys.append(value)
    return xs, ys


def get_pred(kind, mode, field):
    return lambda layer: (layer[kind][mode] or {}).get(field)


def finish_axes(ax, title, xlabel, ylabel, has_data):
    if xlabel.startswith("layer"):
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if has_data:  # below the axes: legends of overlaid runs would hide the curves
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_recall(plt, summary, colors):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    any_data = False
    for ax, kind in zip(axes, KINDS):
        has = False
        for run in summary["runs"]:
            for mode, style in zip(MODES, ("-", "--")):
                xs, ys = layer_series(summary, run, get_pred(kind, mode, "recall"))
                if xs:
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colors[run["name"]],
                            label=f"{run_label(run)} · input {mode}")
                    has = True
        if has:
            ax.axhline(summary["recall_floor"], color="gray", lw=0.8, ls=":")
        finish_axes(ax, f"{KIND_TITLES[kind]}: validation recall", depth_label(summary), "recall (sigmoid ≥ 0.5)", has)
        any_data |= has
    return fig, any_data


def plot_sparsity(plt, summary, colors):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    any_data = False
    for ax, kind in zip(axes, KINDS):
        has = False
        for run in summary["runs"]:
            color = colors[run["name"]]
            mode_with_truth = next((m for m in MODES if layer_series(summary, run, get_pred(kind, m, "true_sparsity"))[0]), None)
            if mode_with_truth:
                xs, ys = layer_series(summary, run, get_pred(kind, mode_with_truth, "true_sparsity"))
                ax.plot(xs, ys, "-", color=color, lw=2, label=f"{run_label(run)} · true")
                has = True
            for mode, marker in zip(MODES, ("o", "s")):
                xs, ys = layer_series(summary, run, get_pred(kind, mode, "classifier_sparsity"))
                if xs:
                    ax.plot(xs, ys, "--", marker=marker, ms=3, color=color,
                            label=f"{run_label(run)} · classifier, input {mode}")
                    has = True
        finish_axes(ax, f"{KIND_TITLES[kind]}: sparsity", depth_label(summary), "fraction inactive", has)
        any_data |= has
    return fig, any_data


def plot_drift(plt, summary, colors):
    panels = (("cos_next_layer", "cos(att_x_l, att_x_l+1)"), ("cos_mlp_x", "cos(att_x_l, mlp_x_l)"),
              ("rel_change_next_layer", "|att_x_l+1 − att_x_l| / |att_x_l|"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    any_data = False
    for ax, (field, title) in zip(axes, panels):
        has = False
        for run in summary["runs"]:
            stats = [(l["layer"], l["drift"][field]) for l in run["layers"] if l["drift"] and l["drift"].get(field)]
            if not stats:
                continue
            xs = [depth_of(summary, run, x) for x, _ in stats]
            color = colors[run["name"]]
            ax.plot(xs, [s["mean"] for _, s in stats], "-", marker="o", ms=3, color=color,
                    label=f"{run_label(run)} (mean, p10–p90)")
            ax.fill_between(xs, [s["p10"] for _, s in stats], [s["p90"] for _, s in stats], color=color, alpha=0.15)
            has = True
        finish_axes(ax, title, depth_label(summary, "layer l"), "per-token value", has)
        any_data |= has
    return fig, any_data


def perplexity_series(run: dict) -> dict:
    """{(mode, axis, other keep): [(keep, ppl)]}; axis "mlp" when mlp_keep is set, else "att"."""
    series = {}
    for e in run["perplexity"]["entries"]:
        if e["mode"] == "dense" or e["perplexity"] is None:
            continue
        if e["mlp_keep"] is not None:
            key, x = (e["mode"], "mlp", e["att_keep"]), e["mlp_keep"]
        elif e["att_keep"] is not None:
            key, x = (e["mode"], "att", None), e["att_keep"]
        else:
            continue
        series.setdefault(key, []).append((x, e["perplexity"]))
    return {k: sorted(v) for k, v in series.items()}


def plot_perplexity(plt, summary, colors):
    all_series = {run["name"]: perplexity_series(run) for run in summary["runs"]}
    axes_used = sorted({axis for s in all_series.values() for (_, axis, _) in s}) or ["mlp"]
    fig, axes = plt.subplots(1, len(axes_used), figsize=(6.5 * len(axes_used), 4.4), squeeze=False)
    any_data, all_values = False, []
    for ax, axis in zip(axes[0], axes_used):
        has = False
        for run in summary["runs"]:
            color = colors[run["name"]]
            dense = (run["perplexity"].get("dense") or {}).get("perplexity")
            if dense is not None:
                ax.axhline(dense, color=color, ls=":", lw=1.2, label=f"{run_label(run)} · dense")
                all_values.append(dense)
                has = True
            for (mode, ax_name, other), points in all_series[run["name"]].items():
                if ax_name != axis:
                    continue
                style, marker = ("-", "o") if mode == "oracle" else ("--", "s")
                suffix = f", att keep {other:g}" if other is not None else ""
                ax.plot([p[0] for p in points], [p[1] for p in points], style, marker=marker, color=color,
                        label=f"{run_label(run)} · {mode}{suffix}")
                all_values += [p[1] for p in points]
                has = True
        if all_values and min(all_values) > 0 and max(all_values) / min(all_values) > 10:
            ax.set_yscale("log")
        finish_axes(ax, f"perplexity vs {'MLP' if axis == 'mlp' else 'attention'} kept fraction",
                    f"{'MLP neurons' if axis == 'mlp' else 'heads'} kept (fraction)", "perplexity", has)
        any_data |= has
    return fig, any_data


def plot_recall_vs_k(plt, summary, colors):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    any_data = False
    for ax, kind in zip(axes, KINDS):
        has = False
        for run in summary["runs"]:
            for mode, marker in zip(MODES, ("o", "s")):
                pts = [(l[kind][mode]["kept_fraction"], l[kind][mode]["recall_at_matched_k"])
                       for l in run["layers"] if l[kind][mode]
                       and l[kind][mode]["kept_fraction"] is not None and l[kind][mode]["recall_at_matched_k"] is not None]
                if pts:
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=18,
                               color=colors[run["name"]], alpha=0.8,
                               label=f"{run_label(run)} · input {mode} (one point per layer)")
                    has = True
                found = run["findings"]["predictors"][kind][mode] or {}
                curve = [p for p in found.get("mean_recall_curve") or [] if p[2] is not None]
                if curve:  # recall of the top ceil(f * width) units, at the K/width actually kept
                    ax.plot([p[1] for p in curve], [p[2] for p in curve], "-" if mode == "same" else "--",
                            color=colors[run["name"]], label=f"{run_label(run)} · input {mode}, top-K at fixed "
                            "kept fraction (mean over layers)")
                    has = True
        ax.plot([0, 1], [0, 1], color="gray", lw=0.8, ls=":", label="chance (recall = K / width)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        finish_axes(ax, f"{KIND_TITLES[kind]}: recall vs K", "K / width (kept fraction)",
                    "recall of the top-K predicted", has)
        any_data |= has
    return fig, any_data


PLOTS = (("recall", "recall.png", plot_recall), ("sparsity", "sparsity.png", plot_sparsity),
         ("drift", "drift.png", plot_drift), ("perplexity", "perplexity.png", plot_perplexity),
         ("recall_vs_k", "recall_vs_k.png", plot_recall_vs_k))


def make_plots(summary: dict, out_dir: str) -> dict:
    """Write the PNGs; returns {plot: file name} for the plots that had data."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    palette = plt.get_cmap("tab10").colors
    colors = {run["name"]: palette[i % len(palette)] for i, run in enumerate(summary["runs"])}
    made = {}
    for key, filename, plot in PLOTS:
        fig, has_data = plot(plt, summary, colors)
        try:
            if has_data:
                save_figure(fig, os.path.join(out_dir, filename))
                made[key] = filename
            else:
                log.info("no data for the %s plot; skipped", key)
        finally:
            plt.close(fig)
    return made


# ---- markdown (from the summary only) -------------------------------------------------------------
def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def fmt_pct(value) -> str:
    if value is None:
        return "–"
    if value >= 900:  # a factor reads better than +2220019.3%
        factor = 1.0 + value / 100.0
        return f"×{factor:.1f}" if factor < 100 else f"×{factor:,.0f}"
    return f"{value:+.1f}%"


def md_headline(run: dict) -> list[str]:
    """The study's answer for one run: how far each component can be cut, oracle and predicted."""
    lines = [f"### {run_heading(run)}", ""]
    f = run["findings"]["perplexity"]
    best = (f or {}).get("lowest_keep_within_tolerance") or {}
    for axis, title, other in (("mlp", "MLP neurons", "attention"), ("att", "Attention heads", "MLP")):
        parts = []
        for mode in ("oracle", "predicted"):
            item = best.get(f"{axis}_{mode}")
            if item is None:
                continue
            tried = ", ".join(f"{k:g} → {fmt_pct(p)}" for k, p in zip(item["kept_fractions"], item["increase_pct"]))
            verdict = (f"down to keep {item['lowest_keep']:g}" if item["lowest_keep"] is not None
                       else "at none of the kept fractions run")
            parts.append(f"{mode} selection stays within {PERPLEXITY_TOLERANCE_PCT:g}% of dense perplexity "
                         f"{verdict} ({tried})")
        if parts:
            lines.append(f"- {title} cut alone ({other} dense): " + "; ".join(parts) + ".")
    for kind in KINDS:
        p = run["findings"]["predictors"][kind]["same"]
        if p is not None and p["mean_recall_at_matched_k"] is not None and p["mean_kept_fraction"] is not None:
            title = KIND_TITLES[kind][0].upper() + KIND_TITLES[kind][1:]
            lines.append(f"- {title}: the predictors' top-K holds "
                         f"{fmt(p['mean_recall_at_matched_k'])} of the truly active units against "
                         f"{fmt(p['mean_kept_fraction'])} by chance (mean over {plural(p['layers'], 'layer')}, "
                         "input same).")
    if len(lines) == 2:
        lines.append("- No sparse perplexity runs with one component cut alone, and no predictor metrics.")
    if not run["evidence"]:
        lines.append(f"- {RANDOM_WEIGHTS_MARK}: these numbers test the tooling only.")
    return lines + [""]


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def fmt_layers(layers) -> str:
    if not layers:
        return "none"
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}–{layers[-1]}"
    return ", ".join(str(l) for l in layers)


def fmt_curve_point(point) -> str:
    nominal, kept, recall = point
    where = f"{nominal:g}" if kept is None or abs(kept - nominal) < 1e-9 else f"{nominal:g} (K/width {kept:.3g})"
    return f"{where} → {fmt(recall)}"


def run_heading(run: dict) -> str:
    return run["name"] + ("" if run["evidence"] else f" (**{RANDOM_WEIGHTS_MARK}**)")


def md_runs_table(summary: dict) -> list[str]:
    lines = ["| run | model | type | data | documents | tokens | label rule | layers | dump complete | weights |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run in summary["runs"]:
        s, d = run["study"], run["dump"]
        weights = {True: f"**{RANDOM_WEIGHTS_MARK}**", False: "trained", None: "not stated"}[s["random_weights"]]
        complete = "yes" if d["complete"] else "**no**"
        if d["capacity_reached"]:
            complete += " (capacity reached)"
        lines.append(f"| {run['name']} | {s.get('model') or '?'} | {s.get('model_type') or d['model_type']} | "
                     f"{s.get('data') or '?'} | {s.get('documents') if s.get('documents') is not None else '?'} | "
                     f"{d['tokens']} | {label_rule_text(run)} | {len(d['layers'])} ({fmt_layers(d['layers'])}) | "
                     f"{complete} | {weights} |")
    return lines


def label_rule_text(run: dict) -> str:
    """study.json's label rule, else the rules recorded in the predictor metrics."""
    if run["study"].get("label_rule"):
        return run["study"]["label_rule"]
    parts = []
    for kind in KINDS:
        rules = sorted({rule for mode in MODES for rule in run["predictors"][kind][mode].get("label_rules") or []})
        if rules:
            parts.append(f"{'MLP' if kind == 'mlp' else 'heads'}: {', '.join(rules)}")
    return "; ".join(parts) or "?"


def md_run_details(run: dict) -> list[str]:
    s, d = run["study"], run["dump"]
    rows = str(d["rows_min"]) if d["rows_min"] == d["rows_max"] else f"{d['rows_min']}–{d['rows_max']}"
    lines = [f"- folder `{run['path']}`; checkpoint `{s.get('checkpoint') or '?'}`; stages {s.get('stages') or '?'}; "
             f"device {s.get('device') or '?'}",
             f"- dims: hidden {d['hidden_size']}, intermediate {d['intermediate_size']}, heads {d['num_heads']}; "
             f"rows per layer {rows} of capacity {d['capacity']}"]
    if s.get("notes"):
        lines.append(f"- notes: {s['notes']}")
    for kind in KINDS:
        for mode in MODES:
            p = run["predictors"][kind][mode]
            if p["status"] == "ok":
                lines.append(f"- {kind} predictors, input {mode} ({INPUT_DESCRIPTIONS[kind, mode]}): "
                             f"{plural(len(p['layers_ok']), 'layer')}; label rule {'; '.join(p['label_rules']) or '?'}")
    return lines


def md_predictor_findings(run: dict) -> list[str]:
    lines = []
    for kind in KINDS:
        for mode in MODES:
            f = run["findings"]["predictors"][kind][mode]
            if f is None:
                lines.append(f"- {KIND_TITLES[kind]}, input {mode}: no predictor metrics.")
                continue
            below = f["layers_recall_below_floor"]
            lines.append(
                f"- {KIND_TITLES[kind]}, input {mode} ({INPUT_DESCRIPTIONS[kind, mode]}), {plural(f['layers'], 'layer')}: "
                f"mean recall {fmt(f['mean_recall'])} (min {fmt(f['min_recall'])} at layer {f['min_recall_layer']}, "
                f"max {fmt(f['max_recall'])}), mean precision {fmt(f['mean_precision'])}; "
                f"recall at matched K {fmt(f['mean_recall_at_matched_k'])} against chance ≈ "
                f"{fmt(f['mean_kept_fraction'])} (K/width); true sparsity {fmt(f['mean_true_sparsity'])}, "
                f"classifier sparsity {fmt(f['mean_classifier_sparsity'])}. "
                f"Layers with recall below {f['recall_floor']}: {fmt_layers(below) if below else 'none'} "
                f"({len(below)} of {f['layers']}). Recall slope {fmt(f['recall_slope_per_layer'], 4)} per layer; "
                f"first half {fmt(f['mean_recall_first_half'])}, second half {fmt(f['mean_recall_second_half'])}."
                + (" Recall of the top-K at kept fraction (mean over layers): "
                   + ", ".join(fmt_curve_point(p) for p in f["mean_recall_curve"]) + "."
                   if f.get("mean_recall_curve") else "")
                + (f" Trained on the layer's own input instead (no earlier layer): layer(s) "
                   f"{fmt_layers(f['layers_input_fallback'])}." if f.get("layers_input_fallback") else ""))
    for kind in KINDS:
        la = run["findings"]["lookahead"][kind]
        if la is None:
            continue
        corr = la["corr_prev_recall_at_matched_k_vs_input_cosine"]
        lines.append(
            f"- Look-ahead, {KIND_TITLES[kind]} ({plural(la['layers'], 'layer')} with both inputs): recall prev − same "
            f"{fmt(la['mean_recall_prev_minus_same'], 3)}, recall at matched K prev − same "
            f"{fmt(la['mean_recall_at_matched_k_prev_minus_same'], 3)}; correlation across "
            f"{plural(la['corr_layers'], 'layer')} of look-ahead recall at matched K with the cosine between the look-ahead "
            f"input and the layer's own input: r = {fmt(corr, 2)}"
            + (" (undefined: too few layers or no variation)" if corr is None else "") + ".")
    return lines


def md_drift_findings(run: dict) -> list[str]:
    f = run["findings"]["drift"]
    if f is None:
        return [f"- Drift: not available ({run['drift'].get('reason', 'no drift data')})."]
    names = {"cos_next_layer": "cosine of att_x_l with att_x_{l+1}", "cos_mlp_x": "cosine of att_x_l with mlp_x_l",
             "rel_change_next_layer": "relative change |att_x_{l+1} − att_x_l| / |att_x_l|",
             "rel_change_mlp_x": "relative change |mlp_x_l − att_x_l| / |att_x_l|"}
    lines = []
    for field in DRIFT_FIELDS:
        d = f.get(field)
        if d is None:
            continue
        lines.append(f"- Drift, {names[field]}: mean over {plural(d['layers'], 'layer')} {fmt(d['mean'])} "
                     f"(min {fmt(d['min'])} at layer {d['min_layer']}, max {fmt(d['max'])} at layer {d['max_layer']}; "
                     f"first half {fmt(d['mean_first_half'])}, second half {fmt(d['mean_second_half'])}).")
    source = run["drift"]
    lines.append(f"- Drift source: {source.get('source')} "
                 f"({'all valid rows' if source.get('max_rows') is None else 'first ' + str(source['max_rows']) + ' rows'}).")
    return lines


def md_perplexity_findings(run: dict) -> list[str]:
    f = run["findings"]["perplexity"]
    if f is None:
        return ["- Perplexity: no results."]
    lines = [f"- Dense perplexity: {fmt(f['dense'], 3)}."]
    for item in f["at_kept_fraction"]:
        where = ", ".join(f"{name} keep {item[key]:g}" for name, key in (("MLP", "mlp_keep"), ("attention", "att_keep"))
                          if item[key] is not None) or "default keep"
        gap = item.get("predicted_over_oracle_pct")
        parts = []
        for name in ("oracle", "predicted"):
            if not item.get(f"{name}_run"):
                parts.append(f"{name} not run")
            elif item[name] is None:
                parts.append(f"{name} {item.get(f'{name}_raw')} (not finite)")
            else:
                parts.append(f"{name} {fmt(item[name], 3)} ({fmt_pct(item[f'{name}_increase_pct'])} vs dense)")
        lines.append(f"- {where}: {', '.join(parts)}" + (f"; predicted is {fmt_pct(gap)} vs oracle" if gap is not None else "") + ".")
    return lines


def md_comparison(summary: dict) -> list[str]:
    comp = summary.get("comparison")
    if not comp:
        return []
    lines = ["## Comparison", "",
             "Means over layers, side by side. Runs marked with random weights are shown for completeness only.", "",
             "| run | MLP recall same | MLP recall prev | MLP rec@K same | att recall same | att recall prev | "
             "att rec@K prev | cos next layer | cos mlp_x | rel change |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in comp["rows"]:
        name = row["run"] + ("" if row["evidence"] else f" ({RANDOM_WEIGHTS_MARK})")
        lines.append(f"| {name} | {fmt(row['mlp_same_mean_recall'])} | {fmt(row['mlp_prev_mean_recall'])} | "
                     f"{fmt(row['mlp_same_mean_recall_at_matched_k'])} | {fmt(row['att_same_mean_recall'])} | "
                     f"{fmt(row['att_prev_mean_recall'])} | {fmt(row['att_prev_mean_recall_at_matched_k'])} | "
                     f"{fmt(row['mean_cos_next_layer'])} | {fmt(row['mean_cos_mlp_x'])} | "
                     f"{fmt(row['mean_rel_change_next_layer'])} |")
    evidence = [r for r in comp["rows"] if r["evidence"]]
    for key, label in (("mlp_same_mean_recall", "mean MLP recall (input same)"),
                       ("att_prev_mean_recall", "mean attention recall (look-ahead input)"),
                       ("mean_cos_next_layer", "mean cosine between consecutive layers")):
        values = [(r["run"], r[key]) for r in evidence if r[key] is not None]
        if len(values) >= 2:
            hi, lo = max(values, key=lambda v: v[1]), min(values, key=lambda v: v[1])
            lines.append(f"- {label}: highest {hi[0]} ({fmt(hi[1])}), lowest {lo[0]} ({fmt(lo[1])}), "
                         f"difference {fmt(hi[1] - lo[1])}.")
    return lines + [""]


def md_layer_table(run: dict) -> list[str]:
    lines = [f"### {run_heading(run)}: per layer", "",
             "| layer | rows | MLP recall same | MLP recall prev | MLP rec@K same | MLP true sp | MLP clf sp same | "
             "att recall same | att recall prev | att rec@K prev | att true sp | cos next | cos mlp_x | rel change |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for l in run["layers"]:
        def p(kind, mode, field):
            return fmt((l[kind][mode] or {}).get(field))

        def true_sp(kind):
            return fmt(next(((l[kind][m] or {}).get("true_sparsity") for m in MODES if l[kind][m]), None))

        def d(field):
            return fmt(((l["drift"] or {}).get(field) or {}).get("mean"))

        lines.append(f"| {l['layer']} | {l['rows']} | {p('mlp', 'same', 'recall')} | {p('mlp', 'prev', 'recall')} | "
                     f"{p('mlp', 'same', 'recall_at_matched_k')} | {true_sp('mlp')} | "
                     f"{p('mlp', 'same', 'classifier_sparsity')} | {p('att', 'same', 'recall')} | "
                     f"{p('att', 'prev', 'recall')} | {p('att', 'prev', 'recall_at_matched_k')} | {true_sp('att')} | "
                     f"{d('cos_next_layer')} | {d('cos_mlp_x')} | {d('rel_change_next_layer')} |")
    return lines + [""]


def md_perplexity_table(run: dict) -> list[str]:
    entries = run["perplexity"]["entries"]
    if not entries:
        return []
    lines = [f"### {run_heading(run)}: perplexity runs", "",
             "| mode | MLP keep | att keep | perplexity | vs dense | tokens | result file |", "|---|---|---|---|---|---|---|"]
    for e in entries:
        ppl = fmt(e["perplexity"]) if e["perplexity"] is not None else f"{e.get('perplexity_raw')} (not finite)"
        keep = lambda v: "–" if v is None else f"{v:g}"  # noqa: E731
        lines.append(f"| {e['mode']} | {keep(e['mlp_keep'])} | {keep(e['att_keep'])} | {ppl} | "
                     f"{fmt_pct(e.get('increase_pct'))} | {e.get('tokens')} | {e.get('result_file') or ''} |")
    return lines + [""]


PLOT_CAPTIONS = {
    "recall": "Validation recall per layer (solid: input same, dashed: input prev; dotted line: recall floor).",
    "sparsity": "True sparsity of the labels (solid) and the classifier's predicted sparsity (dashed).",
    "drift": "Residual-stream drift per layer: mean over tokens with the p10–p90 band.",
    "perplexity": "Perplexity against the kept fraction: dense (dotted), oracle top-K (solid), predicted (dashed).",
    "recall_vs_k": "Recall of the top-K predicted units against K/width: points are recall at matched K "
                   "(one per layer), lines the recall at fixed kept fractions (mean over layers); "
                   "the diagonal is chance.",
}


def render_markdown(summary: dict) -> str:
    """The whole report, from summary.json's contents only."""
    runs = summary["runs"]
    lines = [f"# DejaVu-Llama study report: {summary['name']}", "",
             f"Generated {summary['generated']} by `scripts/report.py` from `summary.json` "
             f"({len(runs)} run{'s' if len(runs) != 1 else ''}).", ""]
    for run in runs:
        if not run["evidence"]:
            lines += [f"> **{run['name']}: {RANDOM_WEIGHTS_MARK}.** Its model has random weights (study.json "
                      "`random_weights: true`); its numbers test the tooling, not the hypothesis.", ""]
    lines += ["## Answer", "",
              f"How far each component can be cut before perplexity rises more than {PERPLEXITY_TOLERANCE_PCT:g}% "
              "over dense, with the layer's own activations choosing what to keep (oracle) and with the trained "
              "predictors choosing (predicted). The gap between the two is the predictors' share; the gap "
              "between oracle and dense is the model's.", ""]
    for run in runs:
        lines += md_headline(run)
    lines += ["## Runs", ""] + md_runs_table(summary) + [""]
    lines += ["Definitions: *recall* = fraction of truly active units the classifier marks active (sigmoid ≥ 0.5); "
              "*recall at matched K* = recall of each token's top-K predicted units with K = its true active count "
              "(chance ≈ K/width); *true sparsity* = fraction of label entries inactive; *classifier sparsity* = "
              "fraction predicted inactive; label rule *topk (k)* = a token's ceil(k × width) largest |activation| "
              "(SiLU(gate)·up or ReLU(fc1) per neuron, output norm per head) are its active units. "
              "Input *same* / *prev*: see each run's predictor lines.", ""]
    lines += ["## Findings", ""]
    for run in runs:
        lines += [f"### {run_heading(run)}", ""] + md_run_details(run)
        lines += md_predictor_findings(run) + md_drift_findings(run) + md_perplexity_findings(run) + [""]
    lines += md_comparison(summary)
    lines += ["## Plots", ""]
    for key, filename, _ in PLOTS:
        if key in summary["plots"]:
            lines += [f"![{key}]({summary['plots'][key]})", "", PLOT_CAPTIONS[key], ""]
        elif summary.get("plots_skipped"):
            lines += [f"- {key}: not drawn (--no-plots).", ""]
        else:
            lines += [f"- {key}: no plot (no data in any run).", ""]
    lines += ["## Per-layer numbers", ""]
    for run in runs:
        lines += md_layer_table(run) + md_perplexity_table(run)
    lines += ["## Missing pieces and warnings", ""]
    for run in runs:
        items = [f"missing: {m}" for m in run["missing"]] + [f"warning: {w}" for w in run["warnings"]]
        lines += [f"- {run['name']}: " + ("nothing missing" if not items else items[0])]
        lines += [f"  - {item}" for item in items[1:]]
    return "\n".join(lines) + "\n"


# ---- command line ---------------------------------------------------------------------------------
def write_report(run_dirs: list[str], out_dir: str | None = None, name: str | None = None,
                 recompute_drift: bool = False, drift_rows: int | None = None, progress: bool = True,
                 plots: bool = True) -> str:
    """Build summary.json, plots and report.md; returns the report.md path. Raises ReportError."""
    runs = [load_run(r, recompute_drift, drift_rows, progress) for r in run_dirs]
    name = name or (runs[0]["name"] if len(runs) == 1 else "comparison")
    out_dir = os.path.abspath(out_dir or os.path.join(ROOT, "reports", safe_name(name)))
    os.makedirs(out_dir, exist_ok=True)
    summary = build_summary(runs, name)
    summary["plots"] = make_plots(summary, out_dir) if plots else {}
    summary["plots_skipped"] = not plots
    summary_path = os.path.join(out_dir, "summary.json")
    write_text_atomic(summary_path, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    with open(summary_path) as f:  # the markdown sees exactly what was written
        written = json.load(f)
    report_path = os.path.join(out_dir, "report.md")
    write_text_atomic(report_path, render_markdown(written))
    return report_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="study run folder(s); several overlay")
    p.add_argument("--out", default=None, help="output folder (default ROOT/reports/<name>)")
    p.add_argument("--name", default=None, help="report name (default: the run's name, or 'comparison')")
    p.add_argument("--recompute-drift", action="store_true", help="ignore RUN/dump/drift.json")
    p.add_argument("--drift-rows", type=int, default=None, help="compute drift on the first N rows only")
    p.add_argument("--no-plots", action="store_true", help="summary.json and report.md only")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="[report] %(levelname)s: %(message)s", stream=sys.stderr)
    if args.drift_rows is not None and args.drift_rows < 1:
        p.error(f"--drift-rows must be at least 1, got {args.drift_rows}")
    try:
        path = write_report(args.runs, args.out, args.name, args.recompute_drift, args.drift_rows,
                            progress=not args.no_progress, plots=not args.no_plots)
    except ReportError as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 1
    print(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
