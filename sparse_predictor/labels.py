"""Label rules: which MLP neurons / attention heads count as "active" for a token.

    positive          y > 0                   OPT MLP (ReLU gives exact zeros), upstream's rule
    topk              the ceil(k * width) largest |y| of each token
    threshold         |y| > t
    target-sparsity   |y| > t, with t calibrated on the training rows so that the requested
                      fraction of training entries is inactive

Why Llama needs a rule other than upstream's: SiLU(gate) * up is almost never exactly zero, so
`|y| > 0` marks essentially every neuron active (true sparsity ~0) and `y > 0` marks about half
active by sign alone, which says nothing about which neurons matter. The Llama default is
top-k with k = 0.1 (90% of neurons inactive per token): that is the sparsity level DejaVu
reports for OPT's ReLU MLPs, so OPT and Llama predictors are compared at a like-for-like
sparsity, and the per-token top-k matches what the sparse executor keeps (its TOPK).

Attention heads always use top-k on the head-output norm (upstream's rule), default k = 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dejavu_common.helpers import kept_count


LABEL_RULES = ("positive", "topk", "threshold", "target-sparsity")
# torch.quantile refuses inputs above 2**24 entries; larger training sets are subsampled.
MAX_CALIBRATION_ENTRIES = 1 << 24


@dataclass
class LabelRule:
    name: str
    k: float | None = None                  # topk: fraction kept per token
    threshold: float | None = None          # threshold: fixed; target-sparsity: calibrated
    target_sparsity: float | None = None    # target-sparsity: requested inactive fraction
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in LABEL_RULES:
            raise ValueError(f"unknown label rule {self.name!r}; known: {', '.join(LABEL_RULES)}")
        if self.name == "topk" and (self.k is None or not 0 < self.k <= 1):
            raise ValueError(f"label rule topk needs --k in (0, 1], got {self.k}")
        if self.name == "threshold" and (self.threshold is None or self.threshold < 0):
            raise ValueError("label rule threshold needs --threshold >= 0 (compared with |y|)")
        if self.name == "target-sparsity" and (
                self.target_sparsity is None or not 0 <= self.target_sparsity < 1):
            raise ValueError(f"label rule target-sparsity needs 0 <= target < 1, got {self.target_sparsity}")

    def needs_calibration(self) -> bool:
        return self.name == "target-sparsity"

    def calibrate(self, train_values: np.ndarray, seed: int) -> None:
        """Set the threshold from the training rows only (validation rows never leak in)."""
        if self.needs_calibration():
            self.threshold = calibrate_threshold(train_values, self.target_sparsity, seed)

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """Bool labels [rows, width] from raw values y [rows, width]."""
        if self.name == "positive":
            return y > 0
        if self.name == "topk":
            return topk_labels(y.abs(), self.k)
        if self.threshold is None:
            raise RuntimeError("label rule target-sparsity used before calibrate()")
        return y.abs() > self.threshold

    def describe(self) -> dict:
        """The rule and its parameters, for the metrics file."""
        out = {"name": self.name}
        if self.name == "topk":
            out["k"] = self.k
        if self.name in ("threshold", "target-sparsity"):
            out["threshold"] = self.threshold
        if self.name == "target-sparsity":
            out["target_sparsity"] = self.target_sparsity
        out.update(self.extra)
        return out


def topk_count(k: float, width: int) -> int:
    """Units kept per token for fraction k (dejavu_common.helpers.kept_count: ceil(k * width), at least 1)."""
    return kept_count(k, width, "--k")


def topk_labels(scores: torch.Tensor, k: float) -> torch.Tensor:
    """Mark the topk_count(k, width) highest scores of each row (ties resolved by sort order)."""
    rows, width = scores.shape
    count = topk_count(k, width)
    idx = torch.topk(scores, count, dim=1, sorted=False).indices
    labels = torch.zeros(rows, width, dtype=torch.bool, device=scores.device)
    labels.scatter_(1, idx, True)
    return labels


def calibrate_threshold(values: np.ndarray, target_sparsity: float, seed: int) -> float:
    """Threshold t on |values| such that a fraction target_sparsity of entries has |v| <= t.

    Subsamples (seeded) when there are more than MAX_CALIBRATION_ENTRIES entries.
    """
    flat = np.abs(np.asarray(values, dtype=np.float32).reshape(-1))
    flat = flat[np.isfinite(flat)]  # rows with non-finite values are dropped from training anyway
    if flat.size == 0:
        raise ValueError("cannot calibrate a threshold on zero training entries")
    if flat.size > MAX_CALIBRATION_ENTRIES:
        rng = np.random.default_rng(seed)
        flat = flat[rng.choice(flat.size, MAX_CALIBRATION_ENTRIES, replace=False)]
    return float(np.quantile(flat, target_sparsity))
