"""The predictor network, its checkpoint names, and saving / loading.

Three forms (`--predictor-form`), each a plain state dict of an `nn.Sequential`:

    lowrank  Linear(d, D) -> Linear(D, out), no biases        "0.weight" [D, d], "1.weight" [out, D]
    linear   Linear(d, out), no bias (full rank)               "0.weight" [out, d]
    mlp      Linear(d, D) -> ReLU -> Linear(D, out)            "0.weight" [D, d], "0.bias" [D], "2.weight" [out, D]

`lowrank` is upstream DejaVu's classifier, so upstream's `load_state_dict(torch.load(path))`
keeps working on it. The hidden layer of `mlp` has a bias so that its ReLU units can set their
own thresholds. The form and d, D, out are read back from the keys and weight shapes; the
settings a checkpoint was trained with (label rule, input mode, metrics) are in the metrics file
beside it (see `load_predictor_info`).

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
PREDICTOR_FORMS = ("lowrank", "linear", "mlp")
METRICS_FILES = {"mlp": "metrics_mlp.jsonl", "att": "metrics_att.jsonl"}


def build_predictor(d: int, D: int | None, out: int, form: str = "lowrank") -> nn.Sequential:
    """d -> out logits in the given form (see the module docstring); D is ignored by `linear`."""
    if form == "lowrank":
        return nn.Sequential(nn.Linear(d, D, bias=False), nn.Linear(D, out, bias=False))
    if form == "linear":
        return nn.Sequential(nn.Linear(d, out, bias=False))
    if form == "mlp":
        return nn.Sequential(nn.Linear(d, D, bias=True), nn.ReLU(), nn.Linear(D, out, bias=False))
    raise ValueError(f"unknown predictor form {form!r} (--predictor-form); known: {', '.join(PREDICTOR_FORMS)}")


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


def predictor_form(state_dict: dict) -> str:
    """The form a predictor state dict was saved from, told apart by its keys."""
    keys = set(state_dict)
    if keys == {"0.weight", "1.weight"}:
        return "lowrank"
    if keys == {"0.weight"}:
        return "linear"
    if keys == {"0.weight", "0.bias", "2.weight"}:
        return "mlp"
    raise ValueError(f"not a predictor state dict (keys: {sorted(keys)[:6]}; "
                     f"known forms: {', '.join(PREDICTOR_FORMS)})")


def predictor_shape(state_dict: dict) -> tuple[str, int, int | None, int]:
    """(form, d, D, out) of a predictor state dict; D is None for the full-rank linear form."""
    form = predictor_form(state_dict)
    first = state_dict["0.weight"]
    if form == "linear":
        out, d = first.shape
        return form, int(d), None, int(out)
    second = state_dict["1.weight" if form == "lowrank" else "2.weight"]
    D, d = first.shape
    out, D2 = second.shape
    if D != D2:
        raise ValueError(f"inconsistent {form} predictor weights: first {tuple(first.shape)}, "
                         f"second {tuple(second.shape)}")
    return form, int(d), int(D), int(out)


def predictor_dims(state_dict: dict) -> tuple[int, int, int]:
    """(d, D, out) of a low-rank predictor state dict (upstream's form)."""
    form, d, D, out = predictor_shape(state_dict)
    if form != "lowrank":
        raise ValueError(f"a {form} predictor, not upstream's low-rank form")
    return d, D, out


def load_predictor(path: str, device: str | torch.device = "cpu") -> nn.Sequential:
    """Rebuild a trained predictor from its checkpoint, in eval mode on `device`.

    Accepts this project's checkpoints of every form and upstream's (all plain state dicts); the
    form comes from the keys. A missing file or a file that is not a predictor raises an error
    naming the path.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"predictor checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:  # tolerate wrapped checkpoints
        state = state["state_dict"]
    try:
        form, d, D, out = predictor_shape(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    model = build_predictor(d, D, out, form)
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
