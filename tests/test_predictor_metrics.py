"""Predictor metrics and label rules against hand-computed cases."""

import math

import numpy as np
import pytest
import torch

from sparse_predictor import metrics as M
from sparse_predictor.labels import LabelRule, calibrate_threshold, topk_count, topk_labels

# Row 2 has no active label. Predicted active means logit >= 0 (sigmoid >= 0.5).
LOGITS = torch.tensor([[2.0, -1.0, 0.5, -3.0],
                       [-2.0, 1.0, -1.0, 3.0],
                       [0.0, 0.3, -0.2, -0.1]])
LABELS = torch.tensor([[1, 0, 0, 1],
                       [0, 1, 1, 1],
                       [0, 0, 0, 0]], dtype=torch.bool)
# predicted active: row0 {0, 2}, row1 {1, 3}, row2 {0, 1} -> 6 of 12
# true positives: row0 {0}, row1 {1, 3} -> 3; true active 5


def test_threshold_metrics_by_hand():
    assert M.recall(LOGITS, LABELS) == pytest.approx(3 / 5)
    assert M.precision(LOGITS, LABELS) == pytest.approx(3 / 6)
    assert M.f1_score(0.5, 0.6) == pytest.approx(2 * 0.5 * 0.6 / 1.1)
    assert M.true_sparsity(LABELS) == pytest.approx(7 / 12)
    assert M.classifier_sparsity(LOGITS) == pytest.approx(6 / 12)


def test_logit_zero_counts_as_active():
    assert M.predicted_active(torch.tensor([[0.0, -1e-9, 1e-9]])).tolist() == [[True, False, True]]


def test_recall_at_matched_k_skips_rows_without_active_label():
    # row0: K=2, top-2 logits are units 0 and 2 -> 1 hit; row1: K=3, units 3, 1, 2 -> 3 hits;
    # row2: K=0, skipped. (1 + 3) / (2 + 3)
    assert M.recall_at_matched_k(LOGITS, LABELS) == pytest.approx(4 / 5)


def test_top_k_hits_follow_a_rank_by_rank_count_with_ties_to_the_lower_index():
    """Every K read from the one sort (the matched K per row, the curve's K) keeps what ranking
    each row by hand keeps: higher logits first, equal logits by lower index."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(-2, 3, (12, 9), generator=generator).float()  # many ties
    labels = torch.rand(12, 9, generator=generator) < 0.4

    def by_hand(k_of_row):
        hits = total = 0
        for row, k in enumerate(k_of_row):
            k = max(0, min(int(k), 9))
            ranked = sorted(range(9), key=lambda j: (-float(logits[row, j]), j))[:k]
            hits += sum(bool(labels[row, j]) for j in ranked)
            total += k
        return hits, total

    per_row = torch.randint(-1, 11, (12,), generator=generator)
    assert M.topk_hits(logits, labels, per_row) == by_hand(per_row.tolist())
    sums = M.metric_sums(logits, labels, curve_fractions=(0.2, 0.5, 1.0))
    assert (sums["matched_k_hits"], sums["matched_k_total"]) == by_hand(labels.sum(1).tolist())
    for fraction in (0.2, 0.5, 1.0):
        assert sums[f"curve_hits@{fraction}"] == by_hand([M.kept_count(fraction, 9)] * 12)[0]


def test_recall_at_k_clamps_k_to_width():
    assert M.recall_at_k(LOGITS, LABELS, 10) == pytest.approx(1.0)  # K=10 > width 4 -> keeps all
    assert M.recall_at_k(LOGITS, LABELS, 1) == pytest.approx(2 / 5)  # top-1 hits in rows 0 and 1
    assert M.topk_hits(LOGITS, LABELS, 10) == (5, 12)


def test_recall_curve_over_kept_fractions():
    # f=0.25 -> K=1: hits in rows 0 and 1; f=0.5 -> K=2: row0 {0, 2} 1 hit, row1 {3, 1} 2 hits;
    # f=1.0 keeps everything. Denominator: all 5 active units.
    sums = M.metric_sums(LOGITS, LABELS, curve_fractions=(0.25, 0.5, 1.0))
    assert M.recall_curve_from_sums(sums) == pytest.approx({"0.25": 2 / 5, "0.5": 3 / 5, "1.0": 1.0})
    assert M.kept_count(0.05, 9) == 1 and M.kept_count(0.5, 9) == 5


def test_weighted_loss_by_hand():
    pos_weight = 3.0
    total = 0.0
    for z, y in zip(LOGITS.flatten().tolist(), LABELS.flatten().tolist()):
        p = 1 / (1 + math.exp(-z))
        total += -(pos_weight * math.log(p)) if y else -math.log(1 - p)
    assert M.compute_metrics(LOGITS, LABELS, pos_weight)["loss"] == pytest.approx(total / 12, rel=1e-5)


def test_undefined_ratios_are_nan_and_written_as_null():
    no_labels = torch.zeros(2, 3, dtype=torch.bool)
    assert math.isnan(M.recall(LOGITS[:2, :3], no_labels))
    assert math.isnan(M.recall_at_matched_k(LOGITS[:2, :3], no_labels))
    nothing_predicted = -torch.ones(2, 3)
    assert math.isnan(M.precision(nothing_predicted, LABELS[:2, :3]))
    assert math.isnan(M.f1_score(math.nan, 0.5))
    assert M.f1_score(0.0, 0.0) == 0.0
    # precision 0 and recall 0 -> f1 0, not NaN
    m = M.compute_metrics(torch.tensor([[-1.0, 1.0]]), torch.tensor([[True, False]]))
    assert (m["precision"], m["recall"], m["f1"]) == (0.0, 0.0, 0.0)
    assert M.to_json_number(math.nan) is None and M.to_json_number(0.25) == 0.25


def test_batched_sums_equal_one_pass():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=gen)
    labels = torch.rand(50, 7, generator=gen) < 0.3
    labels[3] = False  # a row without active label
    whole = M.compute_metrics(logits, labels, 2.0)
    sums = None
    for start in range(0, 50, 16):
        sums = M.add_sums(sums, M.metric_sums(logits[start:start + 16], labels[start:start + 16], 2.0))
    batched = M.metrics_from_sums(sums)
    for name in M.METRIC_NAMES:
        assert batched[name] == pytest.approx(whole[name], rel=1e-6), name


def test_topk_count_and_labels():
    assert topk_count(0.5, 9) == 5        # ceil(4.5)
    assert topk_count(0.1, 1536) == 154
    assert topk_count(0.3, 10) == 3       # no float round-up to 4
    assert topk_count(1e-6, 10) == 1      # at least one
    assert topk_count(1.0, 7) == 7
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    assert topk_labels(scores, 0.5).tolist() == [[False, True, True, False], [True, True, False, False]]


def test_label_rules():
    y = torch.tensor([[-2.0, 0.0, 0.5, 3.0]])
    assert LabelRule("positive").apply(y).tolist() == [[False, False, True, True]]
    assert LabelRule("threshold", threshold=1.0).apply(y).tolist() == [[True, False, False, True]]
    assert LabelRule("topk", k=0.25).apply(y).tolist() == [[False, False, False, True]]  # by |y|
    assert LabelRule("topk", k=0.5).apply(y).tolist() == [[True, False, False, True]]
    with pytest.raises(ValueError):
        LabelRule("topk", k=0.0)
    with pytest.raises(ValueError):
        LabelRule("threshold")
    with pytest.raises(ValueError):
        LabelRule("target-sparsity", target_sparsity=1.0)
    with pytest.raises(ValueError):
        LabelRule("nonzero")


def test_target_sparsity_is_calibrated_on_the_given_rows():
    values = np.random.default_rng(0).standard_normal((500, 40)).astype(np.float32)
    rule = LabelRule("target-sparsity", target_sparsity=0.8)
    rule.calibrate(values, seed=0)
    labels = rule.apply(torch.from_numpy(values))
    assert M.true_sparsity(labels) == pytest.approx(0.8, abs=0.002)
    described = rule.describe()
    assert described["name"] == "target-sparsity" and described["target_sparsity"] == 0.8
    assert described["threshold"] == pytest.approx(calibrate_threshold(values, 0.8, seed=0))
    assert described["threshold"] > 0
