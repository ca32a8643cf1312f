"""Reader for activation dumps in the `dejavu-sp-dump` format (dejavu_common.dump_format; docs/formats.md).

N is the capacity; only the first rows[str(l)] rows of layer l are valid. Shapes and row counts
always come from meta.json. Any missing, short or mismatched file raises DumpError naming it.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from dejavu_common.helpers import format_layers
from dejavu_common.dump_format import META_FILE, NUMPY_DTYPE, TAPS, DumpError, check_meta, dump_file, tap_widths

__all__ = ["DumpError", "DumpReader", "TAPS", "format_layers"]


class DumpReader:
    """Read-only access to one dump folder; validates every file it opens against meta.json."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.meta_path = os.path.join(self.path, META_FILE)
        self.meta = self._read_meta()
        meta = self.meta
        self.model = str(meta.get("model", ""))
        self.model_type = str(meta["model_type"])
        self.capacity = int(meta["capacity"])
        self.hidden_size = int(meta["hidden_size"])
        self.intermediate_size = int(meta["intermediate_size"])
        self.num_heads = int(meta["num_heads"])
        self.num_layers = int(meta["num_layers"])
        self.layers = [int(l) for l in meta["layers"]]
        self.complete = bool(meta.get("complete", False))
        self._rows = self._parse_rows(meta["rows"])
        self._open: dict[tuple[str, int], np.memmap] = {}

    # ---- meta.json -------------------------------------------------------------------------
    def _read_meta(self) -> dict:
        if not os.path.isdir(self.path):
            raise DumpError(f"dump folder not found: {self.path}")
        if not os.path.isfile(self.meta_path):
            raise DumpError(f"missing dump metadata file: {self.meta_path}")
        try:
            with open(self.meta_path) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise DumpError(f"unreadable dump metadata file {self.meta_path}: {e}") from e
        return check_meta(meta, self.meta_path)

    def _parse_rows(self, rows: dict) -> dict[int, int]:
        parsed = {}
        for key, value in rows.items():
            n = int(value)
            if n < 0 or n > self.capacity:
                raise DumpError(
                    f"dump metadata file {self.meta_path}: rows[{key!r}]={n} outside [0, capacity={self.capacity}]")
            parsed[int(key)] = n
        return parsed

    # ---- row counts --------------------------------------------------------------------------
    def rows_for(self, layers: Iterable[int]) -> int:
        """Valid rows shared by all given layers (the min; a killed run may leave them uneven)."""
        layers = list(layers)
        if not layers:
            raise ValueError("rows_for needs at least one layer")
        for layer in layers:
            self._check_layer(layer)
        return min(self._rows.get(layer, 0) for layer in layers)

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise DumpError(
                f"layer {layer} is not in dump {self.path} (meta.json layers: {format_layers(self.layers)})")

    # ---- files -------------------------------------------------------------------------------
    def width(self, tap: str) -> int:
        return tap_widths(self.meta)[tap]

    def file_path(self, tap: str, layer: int) -> str:
        return dump_file(self.path, tap, layer)

    def open(self, tap: str, layer: int) -> np.memmap:
        """The whole [capacity, width] memmap of one tap, read-only, after checking its size."""
        key = (tap, layer)
        if key not in self._open:
            self._check_layer(layer)
            path = self.file_path(tap, layer)
            width = self.width(tap)
            expected = self.capacity * width * 2  # float16
            if not os.path.isfile(path):
                raise DumpError(f"missing dump file: {path}")
            size = os.path.getsize(path)
            if size < expected:
                raise DumpError(
                    f"short dump file: {path} has {size} bytes, expected {expected} "
                    f"(capacity {self.capacity} x width {width} x 2 bytes)")
            if size != expected:
                raise DumpError(
                    f"mismatched dump file: {path} has {size} bytes, expected {expected} "
                    f"(capacity {self.capacity} x width {width} x 2 bytes); meta.json disagrees with the file")
            if expected == 0:
                raise DumpError(f"empty dump file: {path} (capacity or width is 0 in meta.json)")
            self._open[key] = np.memmap(path, dtype=NUMPY_DTYPE, mode="r", shape=(self.capacity, width))
        return self._open[key]

    def validate(self, taps_by_layer: Iterable[tuple[str, int]]) -> None:
        """Open (and so check) each (tap, layer) now, to fail before any training starts."""
        for tap, layer in taps_by_layer:
            self.open(tap, layer)

    def att_x(self, layer: int) -> np.memmap:
        return self.open("att_x", layer)

    def mlp_x(self, layer: int) -> np.memmap:
        return self.open("mlp_x", layer)

    def mlp_label(self, layer: int) -> np.memmap:
        return self.open("mlp_label", layer)

    def att_label(self, layer: int) -> np.memmap:
        return self.open("att_label", layer)

