"""Small synthetic dumps in the exact `dejavu-sp-dump` format, for tests and dry runs.

`write_dump` writes given arrays; `make_dump` builds inputs and labels either with a planted
structure (labels a low-rank function of the inputs: a working predictor must find it) or with
labels drawn independently of the inputs (any predictor must stay at chance).
"""

from __future__ import annotations

import os

import numpy as np

from dejavu_common.dump_format import META_FILE, NUMPY_DTYPE, dump_file, new_meta, tap_widths
from dejavu_common.helpers import write_json_atomic


def write_dump(path: str, arrays: dict[tuple[str, int], np.ndarray], *, model_type: str, capacity: int,
               hidden_size: int, intermediate_size: int, num_heads: int, layers: list[int],
               rows: dict[int, int], model: str = "synthetic") -> dict:
    """Write arrays[(tap, layer)] ([valid rows, width]) into capacity-row memmaps plus meta.json."""
    dims = {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_heads": num_heads}
    meta = new_meta(model, model_type, capacity, dims, len(layers), source="synthetic")
    n_tokens = min(rows.values()) if rows else 0
    meta.update(layers=list(layers), rows={str(l): int(n) for l, n in rows.items()}, tokens=n_tokens,
                complete=True, capacity_reached=n_tokens >= capacity, finished_layers=list(layers))
    widths = tap_widths(meta)
    os.makedirs(path, exist_ok=True)
    for (tap, layer), values in arrays.items():
        mm = np.memmap(dump_file(path, tap, layer), dtype=NUMPY_DTYPE, mode="w+", shape=(capacity, widths[tap]))
        mm[: values.shape[0]] = values.astype(NUMPY_DTYPE)
        mm.flush()
        del mm
    write_json_atomic(os.path.join(path, META_FILE), meta)
    return meta


def make_dump(path: str, *, model_type: str = "llama", structure: str = "planted", rows: int = 2000,
              capacity: int | None = None, hidden_size: int = 32, intermediate_size: int = 64,
              num_heads: int = 8, num_layers: int = 3, rank: int = 4, clusters: int = 24,
              noise: float = 0.1, seed: int = 0) -> dict:
    """A dump whose labels are planted (low-rank in the layer's own input) or independent ("random").

    Inputs: each token is one of `clusters` random centres plus small noise (tokens of a real
    model cluster too); with clusters <= hidden_size every labelling of the centres is linearly
    separable, so a planted label is learnable up to the noise.
    Planted labels, per layer l (s = a rank-`rank` linear score of the input):
        mlp_label_l = s(mlp_x_l), shifted: for OPT about 20% of values are > 0; for Llama all
                      values are positive so |y| ranks units like s does
        att_label_l = exp(s(att_x_{l-1})) (layer 0: att_x_0), positive like head-output norms,
                      so upstream's look-ahead input (--input prev) carries the signal
    Random labels are drawn i.i.d. per entry, independently of every input, with similar marginals.
    """
    if structure not in ("planted", "random"):
        raise ValueError(f"structure must be 'planted' or 'random', got {structure!r}")
    rng = np.random.default_rng(seed)
    capacity = capacity or rows + 16
    d, inter, heads = hidden_size, intermediate_size, num_heads

    def inputs() -> np.ndarray:
        centres = rng.standard_normal((clusters, d))
        return centres[rng.integers(0, clusters, rows)] + noise * rng.standard_normal((rows, d))

    def low_rank_score(x: np.ndarray, width: int) -> np.ndarray:
        s = x @ rng.standard_normal((d, rank)) @ rng.standard_normal((rank, width))
        return s / s.std()

    arrays = {}
    for layer in range(num_layers):
        arrays[("att_x", layer)] = inputs()
        arrays[("mlp_x", layer)] = inputs()
    for layer in range(num_layers):
        if structure == "planted":
            mlp_score = low_rank_score(arrays[("mlp_x", layer)], inter)
            att_score = low_rank_score(arrays[("att_x", max(0, layer - 1))], heads)
        else:
            mlp_score = rng.standard_normal((rows, inter))
            att_score = rng.standard_normal((rows, heads))
        # OPT: about 20% of standard-normal values exceed 0.84; Llama: positive values
        arrays[("mlp_label", layer)] = mlp_score - 0.84 if model_type == "opt" else mlp_score + 5.0
        arrays[("att_label", layer)] = np.exp(att_score)
    return write_dump(path, arrays, model_type=model_type, capacity=capacity, hidden_size=d,
                      intermediate_size=inter, num_heads=heads, layers=list(range(num_layers)),
                      rows={l: rows for l in range(num_layers)}, model=f"synthetic-{model_type}-{structure}")


def make_checkpoint_dump(path: str, checkpoint: str, *, rows: int = 2000, layers: list[int] | None = None,
                         capacity: int | None = None, clusters: int = 0, seed: int = 0) -> dict:
    """A Llama dump whose MLP labels are the real activations of a converted checkpoint's layers.

    mlp_x and att_x are random (Gaussian, or around `clusters` random centres when clusters > 0);
    mlp_label_l = SiLU(gate) * up of layer l's own MLP on mlp_x_l (after its post-attention norm),
    computed from the float16 mlp_x the dump holds, so the gate the label targets recompute from
    the dump is exactly the one behind the labels. att_label is random. Loads torch and the model
    modules, unlike make_dump.
    """
    import json

    import torch

    from sparse_predictor.calibration import load_block

    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    d, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    layers = list(range(config["num_hidden_layers"])) if layers is None else list(layers)
    rng = np.random.default_rng(seed)

    def inputs() -> np.ndarray:
        if clusters:
            centres = rng.standard_normal((clusters, d))
            values = centres[rng.integers(0, clusters, rows)] + 0.3 * rng.standard_normal((rows, d))
        else:
            values = rng.standard_normal((rows, d))
        return values.astype(NUMPY_DTYPE).astype(np.float32)

    arrays = {}
    for layer in layers:
        block = load_block(checkpoint, "llama", layer, "cpu")
        mlp_x = inputs()
        with torch.no_grad():
            act = block.mlp.activation(block.post_attention_layernorm(torch.from_numpy(mlp_x)))
        arrays[("att_x", layer)] = inputs()
        arrays[("mlp_x", layer)] = mlp_x
        arrays[("mlp_label", layer)] = act.numpy()
        arrays[("att_label", layer)] = np.exp(rng.standard_normal((rows, heads)))
    return write_dump(path, arrays, model_type="llama", capacity=capacity or rows + 16, hidden_size=d,
                      intermediate_size=inter, num_heads=heads, layers=layers, rows={l: rows for l in layers},
                      model=f"synthetic-from-{os.path.basename(checkpoint.rstrip('/'))}")
