"""The kept fractions a sparse run actually reached, and the MLP bytes they cost (--sparse-stats).

Threshold modes (teal, cats) keep a varying number of entries per token, and predicted mode
without --mlp-keep keeps the classifier's positives; what they cost is what they kept on the
evaluated text, not the target. Every sparse block reports, per call, the mask of each input it
masked (or the fixed fraction it kept); SparseStats sums the per-token kept fraction over the
real tokens (the token mask: left padding does not count), prompt and decoded tokens alike,
and at the end writes, per layer, the mean kept fraction of each input and the MLP weight
bytes per token those fractions cost (sparse_cost.mlp_bytes_per_token).

Inputs are named as in the modes' kept_inputs (sparse_execution.MODES): "neurons" (oracle, predicted, cats, and dense
layers: 1.0), "in" and "down" (teal, wina: the MLP's input h and the input of down / fc2), plus
"heads" where heads are masked (oracle or predicted attention; not part of the bytes figure).

Each rank writes its own layers: with a world of more than one rank, FILE becomes
FILE-stem.rank{r}.ext (stats.json -> stats.rank1.json); merge the ranks' "layers" to see the
whole model. The file is written atomically, and only when the run succeeded.
"""

from __future__ import annotations

import logging
import math
import os

import torch

from dejavu_common.helpers import write_json_atomic

from .sparse_cost import mlp_bytes_per_token
from .training_free import kept_fraction

logger = logging.getLogger(__name__)

FORMAT_NAME = "dejavu-sparse-stats"
FORMAT_VERSION = 1


def stats_path(path, rank=0, world_size=1):
    """FILE for one rank; FILE with .rank{r} before the extension when there are several ranks."""
    if (world_size or 1) <= 1:
        return path
    root, extension = os.path.splitext(path)
    return f"{root}.rank{rank}{extension}"


class SparseStats:
    """Sums of per-token kept fractions over real tokens, per (layer, input)."""

    def __init__(self):
        self.sums = {}  # (layer, input) -> tensor or float: summed per-token kept fraction
        self.counts = {}  # (layer, input) -> tensor or int: real tokens
        self.layers = {}  # layer -> cost description (mode, family, widths, dtype, predictor)

    def describe(self, layer, mode, family, hidden, intermediate, dtype_bytes, predictor_rank=None,
                 predictor_dtype_bytes=None):
        """What the layer's MLP runs, for its bytes figure (set when the stage is configured)."""
        self.layers[layer] = {"mode": mode, "family": family, "hidden": hidden, "intermediate": intermediate,
                              "dtype_bytes": dtype_bytes, "predictor_rank": predictor_rank,
                              "predictor_dtype_bytes": predictor_dtype_bytes}

    def add(self, layer, kept, token_mask, token_shape):
        """One call of a layer: kept {input: bool mask [..., width] | fraction | None (all kept)}
        over tokens of shape token_shape ([B, S]); token_mask [B, S] marks the real ones (None:
        all real). Sums stay tensors on the device until written (no sync per layer)."""
        if token_mask is not None:
            real = token_mask.sum()
        else:
            real = math.prod(token_shape)
        for name, value in kept.items():
            key = (layer, name)
            if isinstance(value, torch.Tensor):
                per_token = kept_fraction(value)
                total = (per_token[token_mask] if token_mask is not None else per_token).sum()
            else:
                total = real * (1.0 if value is None else float(value))
            self.sums[key] = self.sums.get(key, 0) + total
            self.counts[key] = self.counts.get(key, 0) + real

    def summary(self):
        """{layer: {"mode", "tokens", "kept": {input: mean}, bytes...}} and the totals (JSON-able)."""
        layers, total_bytes, total_dense, means = {}, 0.0, 0.0, {}
        for layer in sorted({layer for layer, _ in self.counts} | set(self.layers)):
            names = sorted(name for known, name in self.counts if known == layer)
            counts = {name: int(self.counts[layer, name]) for name in names}
            kept = {name: float(self.sums[layer, name]) / counts[name] for name in names if counts[name]}
            entry = {"tokens": max(counts.values(), default=0), "kept": kept}
            cost = self.layers.get(layer)
            if cost is not None:
                entry["mode"] = cost["mode"]
                if entry["tokens"]:
                    figure = mlp_bytes_per_token(
                        cost["mode"], cost["hidden"], cost["intermediate"], kept, cost["predictor_rank"],
                        cost["dtype_bytes"], cost["family"], cost["predictor_dtype_bytes"])
                    entry.update(bytes_per_token=figure["bytes"], dense_bytes_per_token=figure["dense_bytes"],
                                 bytes_relative=figure["relative"])
                    total_bytes += figure["bytes"]
                    total_dense += figure["dense_bytes"]
            for name, value in kept.items():
                means.setdefault(name, []).append(value)
            layers[str(layer)] = entry
        return {
            "tokens": max((entry["tokens"] for entry in layers.values()), default=0),
            "mean_kept": {name: sum(values) / len(values) for name, values in sorted(means.items())},
            "bytes_per_token": total_bytes,
            "dense_bytes_per_token": total_dense,
            "bytes_relative": total_bytes / total_dense if total_dense else None,
            "layers": layers,
        }

    def write(self, path, header):
        """Atomically write FORMAT_NAME's file: `header` (what was run), then summary()."""
        data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **header, **self.summary()}
        write_json_atomic(path, data, indent=1)
        return data


class StatsWriter:
    """prepare_stage's closer: writes the stats when the run ended well."""

    def __init__(self, stats, path, header):
        self.stats, self.path, self.header = stats, path, header

    def close(self, ok):
        if not ok:
            logger.warning("the run failed: sparse stats not written to %s", self.path)
            return
        data = self.stats.write(self.path, self.header)
        logger.info("sparse stats: %d tokens, kept %s, MLP bytes %.3f of dense -> %s", data["tokens"],
                    {name: round(value, 4) for name, value in data["mean_kept"].items()},
                    data["bytes_relative"] if data["bytes_relative"] is not None else float("nan"), self.path)
