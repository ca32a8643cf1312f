"""MLP-neuron predictors: which of the `intermediate_size` neurons of layer l are active.

Inputs (--input):  same = mlp_x_l (residual after attention, what the MLP itself sees)
                   prev = att_x_l (block input, before attention: look-ahead over attention)
Labels:            OPT:   mlp_label_l > 0 (ReLU zeros; upstream's rule)
                   Llama: a rule on |mlp_label_l|, default top-k with k = 0.1 (see labels.py)
Checkpoints:       c4_layer{L}.pt; metrics in metrics_mlp.jsonl.
Training itself is shared (training.py).
"""

from __future__ import annotations

from .training import PredictorTask


class MLPTask(PredictorTask):
    kind = "mlp"
    label_tap_name = "mlp_label"
    default_k = 0.1

    def input_tap(self, layer: int, mode: str) -> tuple[str, int]:
        if mode == "same":
            return ("mlp_x", layer)
        if mode == "prev":
            return ("att_x", layer)
        raise ValueError(f"unknown input mode {mode!r}; known: same, prev")

    def default_label(self, family: str) -> str:
        # ReLU gives exact zeros; SiLU(gate) * up does not, so Llama needs a ranking rule
        return "positive" if family == "opt" else "topk"
