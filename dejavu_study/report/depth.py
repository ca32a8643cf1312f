"""Per-layer predictor recall against residual-stream drift and depth: Spearman's rank
correlations. Shared by the study report (every layer of the demo's dump) and the controls
report (the scaling study's layers)."""

from __future__ import annotations

import math

from dejavu_study.report.runs import pearson

# the drift summary's quantities (dejavu_study/drift.py), each a per-token mean per layer
DRIFT_QUANTITIES = ("cos_mlp_x", "rel_change_mlp_x", "cos_next_layer", "rel_change_next_layer")


def ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their mean rank (what Spearman's coefficient needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        stop = start
        while stop + 1 < len(order) and values[order[stop + 1]] == values[order[start]]:
            stop += 1
        for position in range(start, stop + 1):
            out[order[position]] = (start + stop) / 2 + 1
        start = stop + 1
    return out


def spearman(xs, ys) -> float | None:
    """Spearman's rank correlation of the pairs where both are known; None below 3 pairs or without variance."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None
             and math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return None
    return pearson(ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs]))


def drift_vs_depth(recall_by_layer: dict, drift: dict, quantities=DRIFT_QUANTITIES) -> dict:
    """Per-layer recall at matched K beside the drift summary (dejavu_study/drift.py's drift.json).

    Returns the layers both know, the values, and Spearman's rank correlations: recall against each
    drift quantity (its per-token mean), recall against depth, and each quantity against depth.
    """
    by_layer = {int(e["layer"]): e for e in drift.get("layers", [])}
    layers = sorted(l for l in (int(k) for k in recall_by_layer) if l in by_layer
                    and recall_by_layer.get(l, recall_by_layer.get(str(l))) is not None)
    recall = [recall_by_layer.get(l, recall_by_layer.get(str(l))) for l in layers]
    values = {q: [(by_layer[l].get(q) or {}).get("mean") for l in layers] for q in quantities}
    return {
        "layers": layers, "recall_at_matched_k": recall, "drift_means": values,
        "spearman_recall_vs_depth": spearman(layers, recall),
        "spearman_recall_vs_drift": {q: spearman(recall, values[q]) for q in quantities},
        "spearman_drift_vs_depth": {q: spearman(layers, values[q]) for q in quantities},
    }
