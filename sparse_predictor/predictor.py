"""The predictor network, its checkpoint names, and saving / loading.

A checkpoint is a plain state dict of `nn.Sequential(Linear(d, D), Linear(D, out))` without
biases (keys "0.weight" [D, d] and "1.weight" [out, D]), the same as upstream DejaVu writes, so
upstream's `load_state_dict(torch.load(path))` keeps working. d, D and out are read back from
the weight shapes; the settings a checkpoint was trained with (label rule, input mode, metrics)
are in the metrics file beside it (see `load_predictor_info`).

This module imports only torch and the standard library so the sparse-execution code can use it
without the training dependencies.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from dejavu_common.helpers import atomic_write

KINDS = ("mlp", "att")
METRICS_FILES = {"mlp": "metrics_mlp.jsonl", "att": "metrics_att.jsonl"}


def build_predictor(d: int, D: int, out: int) -> nn.Sequential:
    """Upstream's low-rank classifier: d -> D -> out logits, no biases."""
    return nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, out, bias=False))


def checkpoint_name(kind: str, layer: int, dataset: str = "c4") -> str:
    """c4_layer{L}.pt (MLP) or c4_att_layer{L}.pt (attention); exact, so layer 1 never matches 10."""
    if kind == "mlp":
        return f"{dataset}_layer{int(layer)}.pt"
    if kind == "att":
        return f"{dataset}_att_layer{int(layer)}.pt"
    raise ValueError(f"unknown predictor kind {kind!r}; known: {', '.join(KINDS)}")


def checkpoint_path(ckpt_dir: str, kind: str, layer: int, dataset: str = "c4") -> str:
    return os.path.join(ckpt_dir, checkpoint_name(kind, layer, dataset))


def metrics_path(ckpt_dir: str, kind: str) -> str:
    return os.path.join(ckpt_dir, METRICS_FILES[kind])


def save_predictor(path: str, model: nn.Module) -> None:
    """Write the state dict atomically: a reader never sees a half-written checkpoint."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(path, "wb") as handle:
        torch.save(state, handle)


def predictor_dims(state_dict: dict) -> tuple[int, int, int]:
    """(d, D, out) from the two weight shapes of a predictor state dict."""
    try:
        first, second = state_dict["0.weight"], state_dict["1.weight"]
    except KeyError as e:
        raise ValueError(f"not a predictor state dict (keys: {sorted(state_dict)[:6]})") from e
    D, d = first.shape
    out, D2 = second.shape
    if D != D2:
        raise ValueError(f"inconsistent predictor weights: 0.weight {tuple(first.shape)}, 1.weight {tuple(second.shape)}")
    return int(d), int(D), int(out)


def load_predictor(path: str, device: str | torch.device = "cpu") -> nn.Sequential:
    """Rebuild a trained predictor from its checkpoint, in eval mode on `device`.

    Accepts this project's checkpoints and upstream's (both plain state dicts). A missing file
    or a file that is not a predictor raises an error naming the path.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"predictor checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # tolerate wrapped checkpoints
        state = state["state_dict"]
    try:
        d, D, out = predictor_dims(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    model = build_predictor(d, D, out)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def load_predictor_info(ckpt_dir: str, kind: str, layer: int) -> dict | None:
    """Settings and metrics of the latest successful training run of (kind, layer) in ckpt_dir.

    Returns the metrics-file line as a dict (keys include "input_mode", "input_source",
    "label_rule", "d", "D", "out", "val"), or None when there is none.
    """
    path = metrics_path(ckpt_dir, kind)
    if not os.path.isfile(path):
        return None
    latest = None
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue  # a torn line from a killed writer must not hide the others
            if entry.get("kind") == kind and entry.get("layer") == layer and entry.get("status") == "ok":
                latest = entry
    return latest
