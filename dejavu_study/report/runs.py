"""Reading one study run folder into plain JSON-able data, and the small numeric helpers the report shares.

Nothing here judges the numbers: findings.py derives the findings from what load_run returns.
"""

from __future__ import annotations

import json
import logging
import math
import os

from dejavu_common.helpers import finite, kept_count, write_json_atomic
from dejavu_study import drift as drift_mod
from sparse_predictor.dump_reader import DumpError, DumpReader

log = logging.getLogger(__name__)

KINDS = ("mlp", "att")
KIND_TITLES = {"mlp": "MLP neurons", "att": "attention heads"}
MODES = ("same", "prev")
# Same names as sparse_predictor.predictor.METRICS_FILES (not imported: that module pulls in torch;
# tests/test_report.py checks they agree).
METRICS_FILES = {"mlp": "metrics_mlp.jsonl", "att": "metrics_att.jsonl"}
PREDICTOR_FIELDS = ("recall", "precision", "f1", "true_sparsity", "classifier_sparsity", "recall_at_matched_k")
DRIFT_FIELDS = ("cos_next_layer", "cos_mlp_x", "rel_change_next_layer", "rel_change_mlp_x")
# Sparse modes of the runner (dejavu_llama.modules.sparse_execution.MODES; not imported: torch).
SELECTED_MODES = ("oracle", "predicted")
TRAINING_FREE_MODES = ("teal", "cats", "wina")
PERPLEXITY_MODES = ("dense", *SELECTED_MODES, *TRAINING_FREE_MODES)


class ReportError(Exception):
    """Bad input the user must fix (missing or unreadable required file)."""


# ---- small helpers ------------------------------------------------------------------------------
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
            write_json_atomic(cache, result)
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
    """The per-layer numbers and settings the report uses, from one metrics line.

    The figures come from the rows of the evaluation dump (documents the predictor never saw:
    --eval-data-path) where the line has them, else from the held-out tokens of the training
    dump (which share passages with the training rows); `recall_source` says which, and
    `token_split` keeps the held-out-token figures beside them."""
    token_split = entry.get("val") or {}
    other = ((entry.get("eval_dump") or {}).get("metrics")) or {}
    val = other or token_split
    record = {name: finite(val.get(name)) for name in PREDICTOR_FIELDS}
    record["recall_source"] = "other_documents" if other else "token_split"
    record["rows_other_documents"] = (entry.get("eval_dump") or {}).get("rows") if other else None
    record["token_split"] = {name: finite(token_split.get(name)) for name in ("recall", "recall_at_matched_k")}
    ts = record["true_sparsity"]
    # K / width at matched K: the recall@K an uninformed predictor gets (exact for top-k labels)
    record["kept_fraction"] = None if ts is None else 1.0 - ts
    for key in ("input_mode", "input_source", "label_source", "label_rule", "rows_train", "rows_val",
                "best_epoch", "epochs_run", "epochs", "run_id", "data_path", "model"):
        record[key] = entry.get(key)
    # the folder's mode; input_mode is what was used (attention layer 0 falls back to "same")
    record["input_mode_requested"] = entry.get("input_mode_requested", entry.get("input_mode"))
    curve = val.get("recall_at_k")
    if isinstance(curve, dict) and curve:  # recall of the top ceil(f * width) units, per kept fraction f
        record["recall_curve"] = sorted([float(f), kept_fraction(float(f), entry.get("out")), finite(v)]
                                        for f, v in curve.items())
    return record


def kept_fraction(nominal: float, width) -> float:
    """K / width actually kept for a nominal fraction, K counted as the trainer counts it (kept_count).

    With 4 heads, 0.05 keeps 1 head = 0.25: plotting at 0.05 would put chance above the diagonal.
    """
    if not isinstance(width, int) or width <= 0:
        return nominal
    return kept_count(nominal, width) / width


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
        if e.get("mode") not in PERPLEXITY_MODES or "perplexity" not in e:
            warnings.append(f"{path}: entry {i + 1} has no valid mode/perplexity; skipped")
            continue
        key = (e["mode"], keep_key(e.get("mlp_keep")), keep_key(e.get("att_keep")), bool(e.get("allocation")))
        latest[key] = e  # a rerun replaces the earlier line
    dense = [e for (mode, _, _, _), e in latest.items() if mode == "dense"]
    dense = dense[-1] if dense else None
    dense_ppl = finite(dense["perplexity"]) if dense else None
    entries = []
    for (mode, mlp_keep, att_keep, _), e in sorted(latest.items(),
                                                   key=lambda kv: (kv[0][0], kv[0][1] or 0, kv[0][2] or 0, kv[0][3])):
        ppl = finite(e.get("perplexity"))
        entry = {"mode": mode, "mlp_keep": mlp_keep, "att_keep": att_keep, "perplexity": ppl,
                 "perplexity_raw": None if ppl is not None else str(e.get("perplexity")),
                 "tokens": e.get("tokens"), "result_file": e.get("result_file"),
                 "allocation": e.get("allocation")}  # a per-layer allocation file (None: one kept fraction)
        # From the run's --sparse-stats, where recorded: the kept fraction reached, per masked input
        # ({"neurons": f} or {"in": f, "down": f}), and the MLP bytes per token relative to dense.
        reached = e.get("reached_keep")
        if isinstance(reached, dict):
            reached = {name: finite(v) for name, v in reached.items() if finite(v) is not None} or None
        if reached is not None:
            entry["reached_keep"] = reached if isinstance(reached, dict) else finite(reached)
        if finite(e.get("mlp_bytes_relative")) is not None:
            entry["mlp_bytes_relative"] = finite(e["mlp_bytes_relative"])
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


def read_decode_speed(run_dir: str, entries: list[dict]) -> tuple[dict | None, list[str]]:
    """The run's decode_speed.json (dejavu_study.decode_speed) without its rows, after giving each
    perplexity entry its configuration's speed against dense (speed_ratio, speed_rate, speed_kind)."""
    path = os.path.join(run_dir, "decode_speed.json")
    if not os.path.isfile(path):
        return None, []
    try:
        figures = read_json_file(path, "decode speed")
    except ReportError as error:
        return None, [str(error)]
    by_file = {os.path.realpath(row["result_file"]): row for row in figures.get("configs", [])
               if isinstance(row, dict) and row.get("result_file")}
    for entry in entries:
        row = by_file.get(os.path.realpath(entry["result_file"])) if entry.get("result_file") else None
        if row is not None:
            ratios = [finite(r) for r in row.get("ratios") or []]
            entry.update(speed_ratio=finite(row.get("ratio")), speed_rate=finite(row.get("rate")),
                         speed_kind=row.get("kind"), speed_ratios=[r for r in ratios if r is not None] or None)
    return {k: v for k, v in figures.items() if k != "configs"}, []


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
    """Everything read from one study run, as plain JSON-able data.

    "findings" stays None here: findings.build_summary fills it in (findings.py builds on this module).
    """
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
    decode_speed, speed_warnings = read_decode_speed(run_dir, perplexity["entries"])
    warnings += speed_warnings
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

    return {
        "name": study["name"], "path": run_dir, "study": study, "dump": dump,
        "evidence": study["random_weights"] is not True,
        "predictors": {kind: {mode: {k: v for k, v in predictors[kind][mode].items() if k != "layers"}
                              for mode in MODES} for kind in KINDS},
        "drift": {k: v for k, v in drift.items() if k != "layers"},
        "perplexity": perplexity, "decode_speed": decode_speed,
        "layers": layers, "findings": None, "missing": missing, "warnings": warnings,
    }
