"""Findings of each run (numbers only, no verdict) and the summary that report.md and the plots are drawn from."""

from __future__ import annotations

import datetime

from dejavu_study.report.depth import drift_vs_depth
from dejavu_study.report.runs import (DRIFT_FIELDS, KINDS, MODES, SELECTED_MODES, TRAINING_FREE_MODES, mean, pearson,
                                      sanitize, slope)

SUMMARY_FORMAT = "dejavu-llama-report"
SUMMARY_VERSION = 1
PERPLEXITY_TOLERANCE_PCT = 5.0  # "holds up": sparse perplexity within this much of dense
RECALL_FLOOR = 0.9  # layers below this are listed (DejaVu reports ~0.95+ recall for OPT)


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
        # where the figures above were measured, and the held-out tokens' figures beside them
        "recall_sources": sorted({r.get("recall_source") or "token_split" for _, r in rows}),
        "rows_other_documents": max((r.get("rows_other_documents") or 0 for _, r in rows), default=0) or None,
        "mean_token_split_recall": mean((r.get("token_split") or {}).get("recall") for _, r in rows),
        "mean_token_split_recall_at_matched_k": mean((r.get("token_split") or {}).get("recall_at_matched_k")
                                                     for _, r in rows),
        # Early stopping: a best epoch at the cap means training stopped while still improving.
        "max_best_epoch": max((r["best_epoch"] for _, r in rows if r.get("best_epoch")), default=None),
        "epoch_cap": max((r["epochs"] for _, r in rows if r.get("epochs")), default=None),
        "layers_best_at_cap": [layer for layer, r in rows if r.get("epochs") and r.get("best_epoch") == r["epochs"]],
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


def depth_findings(layers: list[dict]) -> dict | None:
    """The MLP predictors' recall at matched K (input same) of every layer against its drift and
    its depth, with Spearman's rank correlations (report/depth.py)."""
    recall = {l["layer"]: l["mlp"]["same"]["recall_at_matched_k"] for l in layers if l["mlp"]["same"]}
    drift = {"layers": [{"layer": l["layer"], **l["drift"]} for l in layers if l["drift"]]}
    if not recall or not drift["layers"]:
        return None
    result = drift_vs_depth(recall, drift)
    return result if result["layers"] else None


def perplexity_findings(perplexity: dict) -> dict | None:
    if perplexity["status"] != "ok":
        return None
    points = {}
    for e in perplexity["entries"]:
        if e["mode"] == "dense" or e.get("allocation"):  # oracle against predicted at one kept fraction for every layer
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
            "lowest_keep_within_tolerance": lowest_keep_within_tolerance(
                [e for e in perplexity["entries"] if not e.get("allocation")]),
            "mlp_frontier": mlp_frontier(perplexity["entries"]),
            "where_sparsity_pays": where_sparsity_pays(perplexity["entries"])}


def mlp_frontier(entries: list[dict]) -> dict | None:
    """MLP made sparse alone, every method side by side: per method its points (kept fraction, kept
    fraction reached, MLP bytes per token relative to dense, perplexity change), and per kept
    fraction the best method and its distance from oracle. None without a training-free run."""
    runs = mlp_runs(entries)
    if not any(e["mode"] in TRAINING_FREE_MODES for e in runs):
        return None
    methods = {}
    for e in sorted(runs, key=lambda e: -e["mlp_keep"]):
        methods.setdefault(method_label(e), []).append({
            "keep": e["mlp_keep"], "reached_keep": e.get("reached_keep"),
            "bytes_relative": e.get("mlp_bytes_relative"), "increase_pct": e.get("increase_pct"),
            "speed_ratio": e.get("speed_ratio"), "speed_kind": e.get("speed_kind")})
    runs = [e for e in runs if not e.get("allocation")]  # the budgets compare one kept fraction for every layer
    budgets = []
    for keep in sorted({e["mlp_keep"] for e in runs}, reverse=True):
        at = {mode: p for mode, points in methods.items() for p in points if p["keep"] == keep}
        ranked = sorted((p["increase_pct"], mode) for mode, p in at.items()
                        if mode != "oracle" and p["increase_pct"] is not None)
        oracle = (at.get("oracle") or {}).get("increase_pct")
        best = ranked[0][1] if ranked else None
        budgets.append({"keep": keep, "best": best, "best_increase_pct": ranked[0][0] if ranked else None,
                        "best_bytes_relative": at[best]["bytes_relative"] if best else None,
                        "oracle_increase_pct": oracle,
                        "best_minus_oracle_pp": None if not ranked or oracle is None else ranked[0][0] - oracle,
                        "best_over_oracle": None if not ranked or oracle is None
                        else (1 + ranked[0][0] / 100) / (1 + oracle / 100),  # perplexity ratio
                        "methods": {mode: p["increase_pct"] for mode, p in at.items()}})
    return {"methods": methods, "budgets": budgets}


def mlp_runs(entries: list[dict]) -> list[dict]:
    """The runs with the MLP made sparse alone (attention dense)."""
    return [e for e in entries if e["mlp_keep"] is not None and (e["att_keep"] is None or e["att_keep"] >= 1.0)
            and e["mode"] != "dense"]


def method_label(entry: dict) -> str:
    """A frontier line's name: the mode, and "allocated" for per-layer kept fractions."""
    return f"{entry['mode']} allocated" if entry.get("allocation") else entry["mode"]


PERPLEXITY_BUDGETS_PCT = (1.0, 3.0, 10.0)


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the polyline through (x, y) points (sorted by x here); None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[0][1] if len(points) == 1 and points[0][0] == x else None


def where_sparsity_pays(entries: list[dict]) -> dict | None:
    """At each perplexity budget (PERPLEXITY_BUDGETS_PCT, % over dense): the fastest configuration
    that a decoder can run (a mode with kernels of its own; not a bound like oracle, not masks)
    among the MLP-only runs within it, its decode speed against dense, and how far its perplexity
    change is from oracle's at the same MLP bytes (oracle's points interpolated). None without
    decode-speed measurements."""
    runs = [e for e in mlp_runs(entries) if e.get("increase_pct") is not None]
    if not any(e.get("speed_ratio") is not None for e in runs):
        return None
    oracle = [(e["mlp_bytes_relative"], e["increase_pct"]) for e in runs
              if e["mode"] == "oracle" and not e.get("allocation") and e.get("mlp_bytes_relative") is not None]
    candidates = [e for e in runs if e.get("speed_kind") == "kernel" and e.get("speed_ratio") is not None]
    budgets = []
    for budget in PERPLEXITY_BUDGETS_PCT:
        within = [e for e in candidates if e["increase_pct"] <= budget + 1e-9]
        best = max(within, key=lambda e: e["speed_ratio"], default=None)
        item = {"budget_pct": budget, "configurations_within": len(within)}
        if best is not None:
            at_oracle = (interpolate(oracle, best["mlp_bytes_relative"])
                         if oracle and best.get("mlp_bytes_relative") is not None else None)
            item.update(method=method_label(best), mode=best["mode"], keep=best["mlp_keep"],
                        allocation=best.get("allocation"), result_file=best.get("result_file"), speed_ratio=best["speed_ratio"],
                        speed_ratios=best.get("speed_ratios"),
                        increase_pct=best["increase_pct"], bytes_relative=best.get("mlp_bytes_relative"),
                        oracle_increase_pct_at_bytes=at_oracle,
                        minus_oracle_pp=None if at_oracle is None else best["increase_pct"] - at_oracle,
                        faster_than_dense=best["speed_ratio"] > 1.0)
        budgets.append(item)
    return {"budgets": budgets, "candidates": len(candidates)}


def lowest_keep_within_tolerance(entries: list[dict]) -> dict:
    """Per component made sparse alone (the other dense) and mode: the lowest kept fraction whose
    perplexity is within PERPLEXITY_TOLERANCE_PCT of dense, and the fractions that were run."""
    out = {}
    for axis, other in (("mlp", "att"), ("att", "mlp")):
        for mode in (*SELECTED_MODES, *TRAINING_FREE_MODES):
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


def run_findings(run: dict) -> dict:
    """The findings of one run loaded by runs.load_run."""
    layers = run["layers"]
    return {
        "predictors": {kind: {mode: predictor_findings(layers, kind, mode) for mode in MODES} for kind in KINDS},
        "lookahead": {kind: lookahead_findings(layers, kind) for kind in KINDS},
        "drift": drift_findings(layers),
        "depth": depth_findings(layers),
        "perplexity": perplexity_findings(run["perplexity"]),
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
    """The summary of runs from runs.load_run (each gets its findings here); strict JSON."""
    unique_names(runs)
    for run in runs:
        run["findings"] = run_findings(run)
    return sanitize({
        "format": SUMMARY_FORMAT, "version": SUMMARY_VERSION, "name": name,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "recall_floor": RECALL_FLOOR, "runs": runs, "comparison": comparison(runs), "plots": {},
    })
