"""The calibrated-thresholds file (`dejavu-mlp-thresholds`), defined once for its writer and reader.

`sparse_predictor/calibrate.py` writes `thresholds_{method}.json` (teal or cats) into the
predictors' folder; sparse execution (`--sparse-mode teal|cats`) reads it from `--sparse-path`
or `--thresholds FILE` and takes the entry of exactly the requested `--mlp-keep`.

    {
      "format": "dejavu-mlp-thresholds", "version": 1,
      "method": "teal" | "cats",
      "model": label, "family": "llama" | "opt", "checkpoint": folder, "dump": folder,
      "hidden_size": d, "intermediate_size": I,
      "layers": [calibrated layers], "rows": calibration rows (tokens) used per layer,
      "keeps": {
        "<kept fraction>": {                        # repr of the float: "0.5", "0.25", "0.1"
          "<layer>": {"t_in": t, "t_down": t,       # teal; cats: {"t_gate": t}
                      "reached": {"in": f, "down": f}}   # cats: {"neurons": f}
        }
      }
    }

A threshold is a finite number >= 0: entries with |value| <= t are dropped. null means no
threshold (keep everything): what a kept fraction of 1.0 calibrates to. `reached` is the
fraction of the calibration entries kept (strictly above the threshold).

No torch here; errors are ThresholdsError naming the file and the key.
"""

from __future__ import annotations

import math
import os

from dejavu_common.helpers import read_format_file

FORMAT_NAME = "dejavu-mlp-thresholds"
FORMAT_VERSION = 1
# Per method: the thresholds of a layer entry, and the inputs whose reached fraction it records
# (the same names as the sparse-stats file's "kept").
THRESHOLD_KEYS = {"teal": ("t_in", "t_down"), "cats": ("t_gate",)}
REACHED_KEYS = {"teal": ("in", "down"), "cats": ("neurons",)}
METHODS = tuple(THRESHOLD_KEYS)
REQUIRED_KEYS = ("format", "version", "method", "keeps")
KEEP_TOLERANCE = 1e-9


class ThresholdsError(ValueError):
    """A thresholds file that is missing, malformed, or lacks what was asked (names file and key)."""


def thresholds_file(folder: str, method: str) -> str:
    return os.path.join(folder, f"thresholds_{method}.json")


def keep_key(keep) -> str:
    """The JSON key of a kept fraction: the shortest repr of the float (0.5 -> "0.5")."""
    return repr(float(keep))


def new_thresholds(method, model, family, checkpoint, dump, hidden_size, intermediate_size, layers, rows, keeps):
    """The file's content; `keeps` is {kept fraction: {layer: entry}} as described above."""
    if method not in THRESHOLD_KEYS:
        raise ThresholdsError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "method": method,
        "model": model,
        "family": family,
        "checkpoint": checkpoint,
        "dump": dump,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "layers": sorted(int(layer) for layer in layers),
        "rows": rows,
        "keeps": {keep_key(keep): {str(layer): entry for layer, entry in entries.items()}
                  for keep, entries in keeps.items()},
    }


def check_threshold(value, path, where):
    """A threshold as float (None for null); ThresholdsError naming `path` and `where` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ThresholdsError(f"{path}: {where} = {value!r}: a threshold must be a finite number >= 0 "
                              "(or null: keep everything)")
    return float(value)


def read_thresholds(path, method, keep, layers, hidden_size=None, intermediate_size=None):
    """{layer: {threshold key: float or None}} for kept fraction `keep` and every layer in `layers`.

    Checks the whole structure on the way: the file exists and is JSON, format and version,
    the method, the widths (when given), the fraction and each layer present, each threshold
    a finite number >= 0 or null. Any failure is a ThresholdsError naming `path` and the key."""
    data = read_format_file(path, ThresholdsError, FORMAT_NAME, FORMAT_VERSION, REQUIRED_KEYS,
                            "thresholds file", f"write it with sparse_predictor/calibrate.py --method {method}")
    if data["method"] != method:
        raise ThresholdsError(f"{path}: 'method' is {data['method']!r}, but sparse mode {method} needs "
                              f"{method!r} thresholds")
    for key, expected in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
        if expected is not None and key in data and data[key] != expected:
            raise ThresholdsError(f"{path}: '{key}' is {data[key]!r}, but the model has {expected} "
                                  "(thresholds of another model?)")
    keeps = data["keeps"]
    if not isinstance(keeps, dict):
        raise ThresholdsError(f"{path}: 'keeps' must be an object of kept fractions")
    found = None
    for key in keeps:
        try:
            value = float(key)
        except ValueError:
            raise ThresholdsError(f"{path}: keeps[{key!r}]: the key is not a kept fraction") from None
        if abs(value - float(keep)) <= KEEP_TOLERANCE:
            found = key
    if found is None:
        have = ", ".join(sorted(keeps, key=lambda k: float(k))) or "none"
        raise ThresholdsError(f"{path}: no thresholds for kept fraction {float(keep)!r} (--mlp-keep); the file "
                              f"has {have}")
    entries = keeps[found]
    if not isinstance(entries, dict):
        raise ThresholdsError(f"{path}: keeps[{found!r}] must be an object of layers")
    result = {}
    for layer in layers:
        entry = entries.get(str(layer))
        if entry is None:
            raise ThresholdsError(f"{path}: keeps[{found!r}] has no thresholds for layer {layer} "
                                  f"(calibrated layers: {', '.join(sorted(entries, key=lambda k: (len(k), k))) or 'none'})")
        if not isinstance(entry, dict):
            raise ThresholdsError(f"{path}: keeps[{found!r}][{str(layer)!r}] must be an object")
        values = {}
        for name in THRESHOLD_KEYS[method]:
            where = f"keeps[{found!r}][{str(layer)!r}][{name!r}]"
            if name not in entry:
                raise ThresholdsError(f"{path}: {where} is missing")
            values[name] = check_threshold(entry[name], path, where)
        result[layer] = values
    return result
