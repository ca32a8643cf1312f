"""The per-layer MLP budget file (`dejavu-mlp-allocation`), defined once for its writer and reader.

`sparse_predictor/allocate.py` writes `allocation_{method}_{target}.json` beside the predictors:
the kept fraction of each layer's MLP, chosen greedily from each layer's measured sensitivity
on training text so that the layers together reach a target. Sparse execution reads it
(`--mlp-keep-file FILE`, model_arg `mlp_keep_file`) into SparseConfig.layer_mlp_keep.

    {
      "format": "dejavu-mlp-allocation", "version": 1,
      "method": "predicted" | "teal" | "cats",
      "model": {"checkpoint": folder, "model_type": "llama" | "opt", "hidden_size": d,
                "intermediate_size": I, "num_layers": layers of the whole model},
      "target": {"kind": "keep" | "bytes", "value": t, "reached": what the allocation reaches},
      "source": {"dump": folder, "rows": rows used per layer, "grid": [kept fractions tried],
                 "error": "block" | "mlp", "predictors": folder | null, "thresholds": file | null},
      "layers": {"<layer>": kept fraction},
      "mean_keep": mean of "layers", "bytes_relative": MLP bytes per token relative to dense,
      "sensitivity": {"<layer>": {"<kept fraction>": relative error (source.error)}},
      "cost": {"<layer>": {"<kept fraction>": MLP bytes per token relative to dense}}
    }

Kept fractions as keys are written as the shortest repr of the float ("0.5"), as in the
thresholds file. No torch here; errors are AllocationError naming the file and the key.
"""

from __future__ import annotations

import math
import os

from dejavu_common.helpers import read_format_file

FORMAT_NAME = "dejavu-mlp-allocation"
FORMAT_VERSION = 1
METHODS = ("predicted", "teal", "cats")
TARGET_KINDS = ("keep", "bytes")
REQUIRED_KEYS = ("format", "version", "method", "model", "target", "layers")
MODEL_KEYS = ("hidden_size", "intermediate_size", "num_layers")


class AllocationError(ValueError):
    """An allocation file that is missing, malformed, or does not fit the run (names file and key)."""


def keep_key(keep) -> str:
    """The JSON key of a kept fraction: the shortest repr of the float (0.5 -> "0.5")."""
    return repr(float(keep))


def allocation_file(folder: str, method: str, target: float, kind: str = "keep") -> str:
    """allocation_{method}_{target}.json; a bytes target is marked: allocation_{method}_bytes{target}.json."""
    label = f"{float(target):g}" if kind == "keep" else f"bytes{float(target):g}"
    return os.path.join(folder, f"allocation_{method}_{label}.json")


def new_allocation(method, model, target, source, layers, sensitivity, cost, mean_keep, bytes_relative):
    """The file's content. model: {"checkpoint", "model_type", "hidden_size", "intermediate_size",
    "num_layers"}; target: {"kind", "value", "reached"}; source: {"dump", "rows", "grid",
    "predictors", "thresholds"}; layers {layer: fraction}; sensitivity and cost
    {layer: {fraction: value}}."""
    if method not in METHODS:
        raise AllocationError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if target.get("kind") not in TARGET_KINDS:
        raise AllocationError(f"unknown target kind {target.get('kind')!r}; known: {', '.join(TARGET_KINDS)}")
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "method": method,
        "model": dict(model),
        "target": dict(target),
        "source": dict(source),
        "layers": {str(layer): float(keep) for layer, keep in sorted(layers.items())},
        "mean_keep": mean_keep,
        "bytes_relative": bytes_relative,
        "sensitivity": _table(sensitivity),
        "cost": _table(cost),
    }


def _table(table):
    return {str(layer): {keep_key(keep): value for keep, value in row.items()} for layer, row in sorted(table.items())}


def check_fraction(value, path, where):
    """A kept fraction in (0, 1] as float; AllocationError naming `path` and `where` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise AllocationError(f"{path}: {where} = {value!r}: a kept fraction must be a number in (0, 1]")
    return float(value)


def load_allocation(path):
    """The file's content after checking format, version and the structure of "layers"."""
    data = read_format_file(path, AllocationError, FORMAT_NAME, FORMAT_VERSION, REQUIRED_KEYS,
                            "allocation file", "write it with sparse_predictor/allocate.py")
    if not isinstance(data["model"], dict):
        raise AllocationError(f"{path}: 'model' must be an object")
    if not isinstance(data["layers"], dict):
        raise AllocationError(f"{path}: 'layers' must be an object of {{layer: kept fraction}}")
    for layer, keep in data["layers"].items():
        try:
            int(layer)
        except ValueError:
            raise AllocationError(f"{path}: layers[{layer!r}]: the key is not a layer index") from None
        check_fraction(keep, path, f"layers[{layer!r}]")
    return data


def read_allocation(path, method, layers, hidden_size=None, intermediate_size=None, num_layers=None,
                    model_type=None):
    """{layer: kept fraction} for every layer in `layers` (the run's sparse layers), from the file."""
    return allocation_layers(load_allocation(path), path, method, layers, hidden_size, intermediate_size,
                             num_layers, model_type)


def allocation_layers(data, path, method, layers, hidden_size=None, intermediate_size=None, num_layers=None,
                      model_type=None):
    """{layer: kept fraction} for every layer in `layers` of a loaded file (load_allocation).

    Checks, naming `path` and the key: the method is the run's sparse mode; the model's widths,
    layer count and model_type are the run's (each where given); every layer of `layers` has a
    value (load_allocation checked that each value is in (0, 1])."""
    if data["method"] != method:
        raise AllocationError(f"{path}: 'method' is {data['method']!r}, but the run's sparse mode is {method!r} "
                              f"(allocate for it: sparse_predictor/allocate.py --method {method})")
    model = data["model"]
    expected = {"hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_layers": num_layers,
                "model_type": model_type}
    for key in MODEL_KEYS:
        if expected[key] is not None and key not in model:
            raise AllocationError(f"{path}: model[{key!r}] is missing")
    for key, value in expected.items():
        if value is not None and key in model and model[key] != value:
            raise AllocationError(f"{path}: model[{key!r}] is {model[key]!r}, but the model run has {value!r} "
                                  "(an allocation of another model?)")
    result = {}
    for layer in sorted(layers):
        if str(layer) not in data["layers"]:
            have = ", ".join(sorted(data["layers"], key=int)) or "none"
            raise AllocationError(f"{path}: layers has no kept fraction for layer {layer}, a sparse layer of the run "
                                  f"(the file has layers {have}; --sparse-layers picks the sparse ones)")
        result[layer] = float(data["layers"][str(layer)])
    return result


def target_keep(data):
    """The kept fraction a run reports as its target: the target of a keep allocation, else the
    allocation's mean kept fraction."""
    target = data.get("target") or {}
    if target.get("kind") == "keep" and isinstance(target.get("value"), (int, float)):
        return float(target["value"])
    values = [float(keep) for keep in data["layers"].values()]
    return sum(values) / len(values) if values else None
