"""Training targets of Llama MLP predictors other than the dump's activation (`--label-target`).

    act-topk       the top-k of |SiLU(gate) * up| per token (the dump's mlp_label; the default rule)
    gate-positive  gate > 0: the neurons whose SiLU is on its rising side
    gate-topk      the top-k of |SiLU(gate)| per token: the gate alone, without up's magnitude

The dump does not hold the gate pre-activation, so the gate targets compute it per row from the
dump's `mlp_x` and the converted checkpoint's layer file: gate = gate_proj(post_attention_layernorm(mlp_x)),
loaded with the same loaders as the TEAL/CATS calibration (calibration.py). Whatever the
training target, the predictor is also scored against the top-k of |SiLU(gate) * up| (the
reference label, `reference_rule`) so targets compare on one scale.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from dejavu_common.helpers import CheckpointFolderError, checkpoint_config

from .labels import LabelRule

LABEL_TARGETS = ("act-topk", "gate-positive", "gate-topk")
GATE_TARGETS = ("gate-positive", "gate-topk")


class LabelTargetError(ValueError):
    """A label target that cannot be computed as asked (the message names the flag, file or key)."""


class GateValues:
    """Array-like [capacity, intermediate_size] view of one layer's gate, computed on demand.

    Indexing with sorted row indices (or a slice) reads those rows of mlp_x and returns float32
    gate pre-activations (or SiLU of them), so only one chunk of rows is ever computed at a time.
    """

    def __init__(self, mlp_x: np.ndarray, norm: torch.nn.Module, gate: torch.nn.Linear, silu: bool):
        self.mlp_x, self.norm, self.gate, self.silu = mlp_x, norm, gate, silu
        self.shape = (mlp_x.shape[0], gate.out_features)

    def __getitem__(self, rows) -> np.ndarray:
        x = torch.from_numpy(np.asarray(self.mlp_x[rows], dtype=np.float32))
        with torch.no_grad():
            g = self.gate(self.norm(x))
            return (F.silu(g) if self.silu else g).numpy()


def check_checkpoint(checkpoint: str | None, hidden_size: int, intermediate_size: int, dump_meta: str) -> str:
    """The absolute checkpoint folder, after checking it is a Llama checkpoint of the dump's widths."""
    if not checkpoint:
        raise LabelTargetError("--label-target gate-positive / gate-topk needs --checkpoint (the converted "
                               "checkpoint the dump was collected from)")
    checkpoint = os.path.abspath(checkpoint)
    try:
        config_path, config = checkpoint_config(checkpoint)
    except CheckpointFolderError as error:
        raise LabelTargetError(str(error)) from None
    if config.get("model_type") != "llama":
        raise LabelTargetError(f"{config_path}: model_type {config.get('model_type')!r}; the gate targets need "
                               "a Llama checkpoint (a gated MLP)")
    widths = (config.get("hidden_size"), config.get("intermediate_size"))
    if widths != (hidden_size, intermediate_size):
        raise LabelTargetError(f"{config_path}: hidden_size {widths[0]}, intermediate_size {widths[1]} do not match "
                               f"the dump {dump_meta} (hidden {hidden_size}, MLP {intermediate_size})")
    return checkpoint


def gate_values(reader, checkpoint: str, layer: int, silu: bool) -> GateValues:
    """GateValues of `layer` of the dump read by `reader`, with that layer's weights from `checkpoint`."""
    from .calibration import CalibrationError, load_block  # the checkpoint loaders; imported late (heavy)

    checkpoint = check_checkpoint(checkpoint, reader.hidden_size, reader.intermediate_size, reader.meta_path)
    try:
        block = load_block(checkpoint, "llama", layer, "cpu")
    except CalibrationError as error:
        raise LabelTargetError(f"--checkpoint {checkpoint}, layer {layer}: {error}") from None
    gate = block.mlp.neuron_linears()[0]
    if tuple(gate.weight.shape) != (reader.intermediate_size, reader.hidden_size):
        raise LabelTargetError(f"{os.path.join(checkpoint, f'pytorch_{layer}.pt')}: gate_proj.weight "
                               f"{tuple(gate.weight.shape)} does not match the dump {reader.meta_path} "
                               f"([{reader.intermediate_size}, {reader.hidden_size}])")
    return GateValues(reader.mlp_x(layer), block.post_attention_layernorm.eval(), gate.eval(), silu)


def reference_rule(k: float) -> LabelRule:
    """The label every target is also scored against: top-k of |SiLU(gate) * up|."""
    return LabelRule(name="topk", k=k, extra={"target": "act-topk"})


def label_plan(reader, layer: int, target: str, k: float, checkpoint: str | None):
    """(raw values [array-like], label rule, source name) of a label target for one layer."""
    if target == "act-topk":
        return reader.mlp_label(layer), reference_rule(k), f"mlp_label_{layer}"
    if target == "gate-positive":
        return (gate_values(reader, checkpoint, layer, silu=False),
                LabelRule(name="positive", extra={"target": target}), f"gate_{layer} (from mlp_x_{layer})")
    if target == "gate-topk":
        return (gate_values(reader, checkpoint, layer, silu=True),
                LabelRule(name="topk", k=k, extra={"target": target}), f"silu_gate_{layer} (from mlp_x_{layer})")
    raise LabelTargetError(f"--label-target {target!r}; known: {', '.join(LABEL_TARGETS)}")
