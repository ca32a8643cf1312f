"""Attention-head predictors: which of the `num_heads` query heads of layer l matter.

Inputs (--input):  prev = att_x_{l-1} (upstream's look-ahead: predict layer l's heads one layer
                          early so the prediction can overlap with layer l-1's compute).
                          Layer 0 has no previous layer; it falls back to att_x_0 with a warning
                          and its metrics line records input_mode "same" (what the sparse executor
                          must feed it), input_mode_requested "prev", input_source "att_x_0".
                   same = att_x_l (block input of the layer itself)
Labels:            the top ceil(k * num_heads) heads of each token by output norm
                   (att_label_l), default k = 0.5; both families.
Checkpoints:       c4_att_layer{L}.pt; metrics in metrics_att.jsonl.
Training itself is shared (training.py).
"""

from __future__ import annotations

import logging

from .training import PredictorTask

log = logging.getLogger("sparse_predictor")


class AttentionTask(PredictorTask):
    kind = "att"
    label_tap_name = "att_label"
    default_k = 0.5

    def effective_input_mode(self, layer: int, mode: str) -> str:
        return "same" if layer == 0 else mode

    def input_tap(self, layer: int, mode: str) -> tuple[str, int]:
        if mode not in ("same", "prev"):
            raise ValueError(f"unknown input mode {mode!r}; known: same, prev")
        if mode == "prev" and layer == 0:
            log.warning("attention layer 0 has no previous layer: using att_x_0 (input 'same')")
        if self.effective_input_mode(layer, mode) == "prev":
            return ("att_x", layer - 1)
        return ("att_x", layer)
