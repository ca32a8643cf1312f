"""Selection maths of the training-free sparse MLPs (TEAL, CATS, WINA) and their calibration.

Pure functions on tensors; the MLPs of MODES (sparse_execution.py) compose them into the sparse
MLP of each mode, and sparse_predictor.calibration runs the calibration on an activation dump.
Nothing here reads files or knows about blocks.

Why each piece exists:
  * A magnitude threshold (TEAL, CATS) drops the entries whose |value| is at or below a fixed
    per-layer number. It costs no predictor, but keeps a *varying* number of entries per token:
    the threshold is calibrated so that the wanted fraction is kept on average.
  * WINA ranks an input entry by |x_i| times the L2 norm of the weight column that reads it,
    i.e. by an upper bound on how much that entry can move the product, and keeps a fixed
    top-K per token. It needs no calibration, only the column norms.
  * top_k_mask is the per-token top-K shared with oracle and predicted modes.

Everything keeps the entries strictly above a threshold (|x| > t): a threshold of None keeps
everything, so a kept fraction of 1.0 is the dense computation exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from dejavu_common.helpers import kept_count


def top_k_mask(scores, k):
    """Boolean mask [..., width] with the k largest scores per row set (all set for k None or >= width)."""
    if k is None or k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    indices = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, indices, True)


def magnitude_mask(values, threshold):
    """|values| > threshold (TEAL's and CATS's rule: entries at or below it are dropped).

    None means no threshold: the caller keeps every entry (and skips the masking, so that a
    kept fraction of 1.0 costs nothing and changes no bit)."""
    if threshold is None:
        return None
    return values.abs() > threshold


def apply_mask(values, mask):
    """values with the dropped entries set to zero; a None mask returns values itself."""
    if mask is None:
        return values
    return values * mask.to(values.dtype)


def column_norms(*weights):
    """L2 norm of input column i over all the given Linear weights [out, in] stacked: [in].

    WINA scores an input entry by the norm of everything that reads it; for Llama's gated MLP
    h is read by gate and up, so their columns are taken together (sqrt of the summed squares).
    Computed in float32 whatever the weights' dtype."""
    total = None
    for weight in weights:
        squares = weight.detach().float().pow(2).sum(dim=0)
        total = squares if total is None else total + squares
    return total.sqrt()


def wina_scores(values, norms):
    """WINA's importance of each input entry: |x_i| * ||W[:, i]||_2 (broadcast over tokens)."""
    return values.float().abs() * norms


def wina_mask(values, norms, k):
    """Per token, the k entries of `values` with the largest WINA scores; None (keep all, no
    masking) where k is None or covers the whole width."""
    if k is None or k >= values.shape[-1]:
        return None
    return top_k_mask(wina_scores(values, norms), k)


def magnitude_thresholds(values, keeps):
    """Calibrated thresholds for several kept fractions from one sample of values.

    For each fraction f in (0, 1] returns (threshold, reached): the threshold is the (1 - f)
    quantile of |values|, taken as the midpoint between the two order statistics around it,
    so that exactly n = kept_count(f, N) of the N sample entries lie strictly above it (fewer
    only where values tie there); the midpoint rather than either neighbour keeps a small
    change of the inputs (float16 dumps, inference in another dtype) from moving an entry
    across. `reached` is the fraction of the sample strictly above the threshold. A fraction
    that keeps all N entries gives (None, 1.0): no threshold, the dense computation.

    One partial sort (numpy's partition at the order statistics needed) serves every fraction.
    `values` may have any shape; entries are pooled (TEAL and CATS use one threshold per layer
    and tensor)."""
    magnitudes = values.detach().reshape(-1).float().abs().cpu().numpy()
    count = magnitudes.size
    if count == 0:
        raise ValueError("no values to calibrate on")
    if not np.isfinite(magnitudes).all():
        raise ValueError("non-finite values in the calibration sample")
    kept_counts = [kept_count(keep, count, "keep") for keep in keeps]
    ranks = sorted({rank for kept in kept_counts if kept < count for rank in (count - kept - 1, count - kept)})
    ordered = np.partition(magnitudes, ranks) if ranks else magnitudes
    results = []
    for kept in kept_counts:
        if kept >= count:
            results.append((None, 1.0))
            continue
        below, above = float(ordered[count - kept - 1]), float(ordered[count - kept])
        threshold = (below + above) / 2
        # the entries kept: strictly above the threshold as the sparse MLP compares (in float32)
        results.append((threshold, int(np.count_nonzero(magnitudes > np.float32(threshold))) / count))
    return results


def kept_fraction(mask):
    """Per-token kept fraction [...] of a boolean mask [..., width]."""
    return mask.sum(dim=-1, dtype=torch.float64) / mask.shape[-1]
