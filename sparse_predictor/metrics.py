"""Predictor metrics: pure functions on tensors.

Inputs are `logits` [rows, width] (float, before sigmoid) and `labels` [rows, width] (bool or
0/1). A unit is predicted active when sigmoid(logit) >= 0.5, i.e. logit >= 0.

Definitions (all micro-averaged over every entry, as upstream DejaVu's recall is):
    recall               TP / (TP + FN)        fraction of truly active units the classifier keeps
    precision            TP / (TP + FP)
    f1                   2 P R / (P + R)
    true_sparsity        fraction of label entries that are inactive
    classifier_sparsity  fraction of entries predicted inactive (threshold 0.5)
    recall_at_k          (curve) per row take the K = ceil(f * width) highest logits; hits over
                         all true active units, for kept fractions f (rows without label add 0)
    recall_at_matched_k  per row take the K highest logits, K = that row's true active count;
                         sum of hits over rows / sum of K over rows. This is the recall a top-K
                         sparse executor gets if it is told the right K; at matched K it also
                         equals precision. A predictor with no information scores K / width.
    loss                 mean weighted BCE-with-logits (upstream's weighting, see training.py)

Edge cases (chosen so a metric never looks better than the data supports):
    - Rows with no active label add nothing to recall's TP + FN and have K = 0, so they are
      skipped by recall_at_matched_k; they still count for precision and both sparsities.
    - A ratio whose denominator is 0 (no active label anywhere, no predicted active unit
      anywhere) is undefined and returned as NaN, never as 0 or 1. f1 is NaN when precision
      or recall is NaN, and 0 when both are 0. `to_json_number` writes NaN as null.
    - recall_at_k with an explicit K larger than the width is clamped to the width.

For batched evaluation, `metric_sums` returns additive counts and `metrics_from_sums` turns
summed counts into the metrics above, giving the same numbers as one call on all rows.
"""

from __future__ import annotations

import math

import torch

from dejavu_common.helpers import kept_count
import torch.nn.functional as F

METRIC_NAMES = ("recall", "precision", "f1", "true_sparsity", "classifier_sparsity",
                "recall_at_matched_k", "loss")


def predicted_active(logits: torch.Tensor) -> torch.Tensor:
    """sigmoid(logits) >= 0.5, computed on the logit so float rounding cannot flip it."""
    return logits >= 0


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else math.nan


def _as_bool(labels: torch.Tensor) -> torch.Tensor:
    return labels if labels.dtype == torch.bool else labels > 0.5


def recall(logits: torch.Tensor, labels: torch.Tensor) -> float:
    y, p = _as_bool(labels), predicted_active(logits)
    return _ratio((y & p).sum().item(), y.sum().item())


def precision(logits: torch.Tensor, labels: torch.Tensor) -> float:
    y, p = _as_bool(labels), predicted_active(logits)
    return _ratio((y & p).sum().item(), p.sum().item())


def f1_score(precision_value: float, recall_value: float) -> float:
    if math.isnan(precision_value) or math.isnan(recall_value):
        return math.nan
    if precision_value + recall_value == 0:
        return 0.0
    return 2 * precision_value * recall_value / (precision_value + recall_value)


def true_sparsity(labels: torch.Tensor) -> float:
    y = _as_bool(labels)
    return _ratio((~y).sum().item(), y.numel())


def classifier_sparsity(logits: torch.Tensor) -> float:
    p = predicted_active(logits)
    return _ratio((~p).sum().item(), p.numel())


def ranked_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows, width] int: entry (r, j) = how many of row r's j + 1 highest logits are true active.
    One stable sort (ties resolve the same way every time) serves every K read from it."""
    ranked_labels = _as_bool(labels).gather(1, torch.sort(logits, dim=1, descending=True, stable=True).indices)
    return ranked_labels.cumsum(dim=1, dtype=torch.int32)


def hits_at(ranked: torch.Tensor, k: torch.Tensor | int) -> tuple[int, int]:
    """(hits, total K) of ranked_hits' rows when each keeps its k highest; k per row or scalar,
    clamped to [0, width]."""
    rows, width = ranked.shape
    k = torch.as_tensor(k, device=ranked.device).long().clamp(0, width).expand(rows)
    if rows == 0 or width == 0:
        return 0, 0
    hits = ranked.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return int(hits[k > 0].sum().item()), int(k.sum().item())


def topk_hits(logits: torch.Tensor, labels: torch.Tensor, k: torch.Tensor | int) -> tuple[int, int]:
    """(hits, total K) when each row keeps its k highest logits; k per row or scalar, clamped to [0, width]."""
    return hits_at(ranked_hits(logits, labels), k)


def recall_at_k(logits: torch.Tensor, labels: torch.Tensor, k: torch.Tensor | int) -> float:
    """Recall of the true active units among each row's top-k logits (k clamped to the width).

    Only rows with at least one active label count; NaN if there are none.
    """
    y = _as_bool(labels)
    rows_with_label = y.any(dim=1)
    k = torch.as_tensor(k, device=logits.device).long().expand(y.shape[0])
    hits, _ = topk_hits(logits[rows_with_label], y[rows_with_label], k[rows_with_label])
    return _ratio(hits, y[rows_with_label].sum().item())


def recall_at_matched_k(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-K recall with K = each row's own true active count (rows with K = 0 skipped)."""
    y = _as_bool(labels)
    hits, total = topk_hits(logits, y, y.sum(dim=1))
    return _ratio(hits, total)


def weighted_bce_sum(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> float:
    """Sum over entries of BCE-with-logits with positives weighted by pos_weight."""
    target = _as_bool(labels).to(logits.dtype)
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight, reduction="sum").item()


def metric_sums(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float = 1.0,
                curve_fractions: tuple[float, ...] = ()) -> dict:
    """Additive counts for one batch; sum them over batches, then call metrics_from_sums.

    curve_fractions: also count top-K hits with K = kept_count(f, width) for each f, for the
    recall-vs-kept-fraction curve (what a top-K sparse executor keeps at that budget).
    """
    y, p = _as_bool(labels), predicted_active(logits)
    ranked = ranked_hits(logits, y)
    hits, k_total = hits_at(ranked, y.sum(dim=1))
    sums = {
        "entries": y.numel(),
        "true_active": int(y.sum().item()),
        "pred_active": int(p.sum().item()),
        "true_positive": int((y & p).sum().item()),
        "matched_k_hits": hits,
        "matched_k_total": k_total,
        "loss_sum": weighted_bce_sum(logits, y, pos_weight),
    }
    for f in curve_fractions:
        sums[f"curve_hits@{f}"] = hits_at(ranked, kept_count(f, y.shape[1]))[0]
    return sums


def add_sums(total: dict | None, batch: dict) -> dict:
    if total is None:
        return dict(batch)
    return {key: total[key] + batch[key] for key in total}


def metrics_from_sums(s: dict) -> dict:
    r = _ratio(s["true_positive"], s["true_active"])
    p = _ratio(s["true_positive"], s["pred_active"])
    return {
        "recall": r,
        "precision": p,
        "f1": f1_score(p, r),
        "true_sparsity": _ratio(s["entries"] - s["true_active"], s["entries"]),
        "classifier_sparsity": _ratio(s["entries"] - s["pred_active"], s["entries"]),
        "recall_at_matched_k": _ratio(s["matched_k_hits"], s["matched_k_total"]),
        "loss": _ratio(s["loss_sum"], s["entries"]),
    }


def recall_curve_from_sums(s: dict) -> dict:
    """{kept fraction: recall of the top-K units} for the fractions metric_sums counted."""
    prefix = "curve_hits@"
    return {key[len(prefix):]: _ratio(v, s["true_active"]) for key, v in s.items() if key.startswith(prefix)}


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float = 1.0) -> dict:
    """All metrics of METRIC_NAMES for one set of rows."""
    return metrics_from_sums(metric_sums(logits, labels, pos_weight))


def to_json_number(value: float) -> float | None:
    """NaN / inf are not JSON; undefined metrics are written as null."""
    return None if value is None or not math.isfinite(value) else float(value)


def format_metrics(m: dict) -> str:
    short = {"recall": "recall", "precision": "prec", "f1": "f1", "true_sparsity": "true_sp",
             "classifier_sparsity": "clf_sp", "recall_at_matched_k": "rec@K", "loss": "loss"}
    return " ".join(f"{short[k]}={m[k]:.4f}" for k in METRIC_NAMES if k in m)
