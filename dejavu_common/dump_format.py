"""The activation-dump format (`dejavu-sp-dump`), defined once for its writer and its readers.

A dump folder holds, per layer l, raw float16 np.memmap files without a header (upstream DejaVu's
format, readable by its trainer) and one meta.json:

    att_x_{l}.mmap      [N, hidden_size]        block input (residual stream) of layer l
    mlp_x_{l}.mmap      [N, hidden_size]        residual after attention of layer l
    mlp_label_{l}.mmap  [N, intermediate_size]  raw MLP activation (SiLU(gate) * up, or ReLU(fc1))
    att_label_{l}.mmap  [N, num_heads]          L2 norm of each attention head's output

N is the capacity; only the first meta["rows"][str(l)] rows of layer l are valid, and row r is the
same token in every file of every layer. Shapes and row counts come from meta.json only. The
writer is dejavu_llama.modules.activation_dump, the reader sparse_predictor.dump_reader; docs/
formats.md describes the fields.
"""

from __future__ import annotations

import os

import numpy as np

FORMAT_NAME = "dejavu-sp-dump"
FORMAT_VERSION = 1
DTYPE = "float16"
NUMPY_DTYPE = np.float16
TAPS = ("att_x", "mlp_x", "mlp_label", "att_label")
META_FILE = "meta.json"
REQUIRED_META_KEYS = (
    "format", "version", "model_type", "dtype", "capacity", "hidden_size",
    "intermediate_size", "num_heads", "num_layers", "layers", "rows",
)
FLOAT16_MAX = float(np.finfo(np.float16).max)


class DumpError(RuntimeError):
    """A dump folder that cannot be written or read as asked (the message names the file)."""


def dump_file(folder: str, tap: str, layer: int) -> str:
    if tap not in TAPS:
        raise ValueError(f"unknown tap {tap!r}; known: {', '.join(TAPS)}")
    return os.path.join(folder, f"{tap}_{layer}.mmap")


def dims_of(config) -> dict:
    """The widths a model config gives the files (Llama's intermediate_size, OPT's ffn_dim)."""
    return {
        "hidden_size": config.hidden_size,
        "intermediate_size": getattr(config, "intermediate_size", None) or config.ffn_dim,
        "num_heads": config.num_attention_heads,
    }


def tap_widths(meta: dict) -> dict:
    """Columns of each tap's file, from meta.json."""
    return {
        "att_x": int(meta["hidden_size"]),
        "mlp_x": int(meta["hidden_size"]),
        "mlp_label": int(meta["intermediate_size"]),
        "att_label": int(meta["num_heads"]),
    }


def new_meta(model: str, model_type: str, capacity: int, dims: dict, num_layers: int, source: str,
             layers=None) -> dict:
    """meta.json of an empty dump of `layers` (default: every layer of the model's `num_layers`)."""
    layers = list(range(num_layers)) if layers is None else sorted(layers)
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "model": model,
        "model_type": model_type.split("-")[0],
        "dtype": DTYPE,
        "capacity": capacity,
        **dims,
        "num_layers": num_layers,
        "layers": layers,
        "rows": {str(layer): 0 for layer in layers},
        "tokens": 0,
        "source": source,
        "complete": False,
        "capacity_reached": False,
        "finished_layers": [],
    }


def check_meta(meta, path: str) -> dict:
    """meta.json's content, checked against the format; DumpError naming `path` and the key."""
    if not isinstance(meta, dict):
        raise DumpError(f"dump metadata file {path} is not a JSON object")
    missing = [k for k in REQUIRED_META_KEYS if k not in meta]
    if missing:
        raise DumpError(f"dump metadata file {path} lacks keys: {', '.join(missing)}")
    if meta["format"] != FORMAT_NAME or int(meta["version"]) != FORMAT_VERSION:
        raise DumpError(f"dump metadata file {path}: format {meta['format']!r} version {meta['version']!r}, "
                        f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}")
    if meta["dtype"] != DTYPE:
        raise DumpError(f"dump metadata file {path}: dtype {meta['dtype']!r}, expected {DTYPE!r}")
    for key in ("capacity", "hidden_size", "intermediate_size", "num_heads", "num_layers"):
        if not isinstance(meta[key], int) or meta[key] < 0:
            raise DumpError(f"dump metadata file {path}: {key} must be a non-negative integer")
    if not isinstance(meta["rows"], dict):
        raise DumpError(f"dump metadata file {path}: 'rows' must be an object")
    return meta
