"""Per-layer MLP activation overrides of a converted Llama checkpoint (config.json key
`dejavu_mlp_activations`), written by dejavu_study/relu_control.py and read by LlamaMLP.

    "dejavu_mlp_activations": {"2": "relu", "7": "relu@0.3"}

"relu" replaces SiLU(gate) by ReLU(gate) in that layer; "relu@t" by ReLU(gate - t), a threshold
shifted by t >= 0 (used where the config has no mlp_bias to fold -t into). Layers not listed keep
the config's hidden_act. One definition here so that the writer and the model agree.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CONFIG_KEY = "dejavu_mlp_activations"


class ShiftedReLU(nn.Module):
    """ReLU(x - shift): exact zeros wherever x <= shift. No parameters, so checkpoints load strictly."""

    def __init__(self, shift: float):
        super().__init__()
        self.shift = float(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x - self.shift)

    def extra_repr(self) -> str:
        return f"shift={self.shift:g}"


def override_name(shift: float) -> str:
    """The override string of a ReLU with threshold `shift` ("relu" for 0)."""
    return "relu" if shift == 0 else f"relu@{float(shift):g}"


def parse_override(value, where: str = CONFIG_KEY) -> float:
    """The shift of an override string ("relu" -> 0.0, "relu@0.3" -> 0.3); anything else is an error naming `where`."""
    text = str(value)
    if text == "relu":
        return 0.0
    if text.startswith("relu@"):
        try:
            shift = float(text[len("relu@"):])
        except ValueError:
            shift = math.nan
        if math.isfinite(shift) and shift >= 0:
            return shift
    raise ValueError(f"{where}: {value!r} is not an MLP activation override (use 'relu' or 'relu@T' with T >= 0)")


def layer_activation(config, layer_index) -> nn.Module | None:
    """The activation module config.json sets for this layer, or None where it sets none."""
    overrides = getattr(config, CONFIG_KEY, None)
    if not overrides or layer_index is None or str(layer_index) not in overrides:
        return None
    shift = parse_override(overrides[str(layer_index)], f"config.json {CONFIG_KEY}[{str(layer_index)!r}]")
    return nn.ReLU() if shift == 0 else ShiftedReLU(shift)
