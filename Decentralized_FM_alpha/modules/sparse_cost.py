"""What each sparse mode pays: MLP weight bytes read per token.

Decoding is bound by reading weights, so the bytes of MLP weights one token needs are the
figure that sparsity can lower. Biases, norms and activations are left out (they are O(d + I),
not O(d * I)).

With d = hidden size, I = intermediate size (OPT: ffn_dim), K = kept neurons = f * I, p_in and
p_down the kept fractions of the MLP's input h and of the input of down (fc2), D the predictor's
rank, b the bytes of one weight:

    mode        Llama (gate, up, down)               OPT (fc1, fc2)
    dense       3 d I b                              2 d I b
    oracle      3 d K b                              2 d K b
    predicted   3 d K b + (d D + D I) b_pred         2 d K b + (d D + D I) b_pred
    teal        (2 I (p_in d) + d (p_down I)) b      (I (p_in d) + d (p_down I)) b
    cats        (d I + 2 d K) b                      refused (OPT has no gate)
    wina        as teal                              as teal

  * oracle is the ideal a selector could reach: choosing the top K of the layer's own
    activation needs the dense activation (gate and up read whole), so a real oracle run does
    not save these bytes; the figure is the bound that predicted mode chases.
  * predicted adds the predictor's two matrices, in the predictor's own dtype (b_pred).
  * teal: a dropped entry of h spares column i of gate and of up (2 I weights); a dropped entry
    of the down input spares column j of down (d weights).
  * cats reads gate whole (it thresholds SiLU(gate(h)), computed densely), then up and down
    only for the kept neurons.
  * wina reads as teal; its column norms (d + I numbers, computed once) are not counted.

Each formula is its mode's weight_count (sparse_execution.MODES): a new mode brings its own.
"""

from __future__ import annotations

MATRICES = {"llama": 3, "opt": 2}  # MLP weight matrices of d x I


def _fractions(mode, kept):
    """{input: fraction} for `mode` (a SparseMode) from a mapping, or one number meaning every input."""
    names, mode = mode.kept_inputs, mode.name
    if isinstance(kept, (int, float)) or kept is None:
        value = 1.0 if kept is None else float(kept)
        kept = {name: value for name in names}
    fractions = {}
    for name in names:
        if name not in kept:
            raise ValueError(f"mode {mode}: kept fraction of {name!r} missing (needs {', '.join(names)})")
        value = float(kept[name])
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"mode {mode}: kept fraction of {name!r} is {value}, not in [0, 1]")
        fractions[name] = value
    return fractions


def mlp_bytes_per_token(mode, hidden, intermediate, kept=None, predictor_rank=None, dtype_bytes=2,
                        family="llama", predictor_dtype_bytes=None):
    """MLP weight bytes one token reads in `mode`, against the dense MLP (formulas: module doc).

    kept: the kept fractions, a mapping with the mode's inputs ("neurons" for oracle,
    predicted and cats; "in" and "down" for teal and wina), or one number for all of them
    (a target); dense needs none. predictor_rank: D, required for predicted.
    Returns {"bytes": ..., "dense_bytes": ..., "relative": bytes / dense_bytes}."""
    from .sparse_execution import MODES  # each mode's weight count and kept inputs

    if mode not in MODES:
        raise ValueError(f"unknown sparse mode {mode!r}; known: {', '.join(MODES)}")
    if family not in MATRICES:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(MATRICES)}")
    if mode == "cats" and family != "llama":
        raise ValueError("cats needs a gated MLP (Llama); OPT has no gate")
    d, inner, b = float(hidden), float(intermediate), float(dtype_bytes)
    fractions = _fractions(MODES[mode], kept)
    matrices = MATRICES[family]
    dense = matrices * d * inner * b
    weights = MODES[mode].weight_count(d, inner, matrices, fractions)
    total = weights * b
    if mode == "predicted":
        if predictor_rank is None:
            raise ValueError("predicted mode: predictor_rank (D) is needed")
        rank = float(predictor_rank)
        total += (d * rank + rank * inner) * float(predictor_dtype_bytes or dtype_bytes)
    return {"bytes": total, "dense_bytes": dense, "relative": total / dense}
