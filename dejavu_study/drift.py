"""Residual-stream drift across layers, measured per token from an activation dump.

    python scripts/drift.py DUMP_DIR [--out FILE] [--max-rows N] [--chunk-rows N]

For every layer l of the dump (row r is the same token in every file of every layer):

    cos_next_layer        cos(att_x_l, att_x_{l+1})            how much one whole block turns the stream
    cos_mlp_x             cos(att_x_l, mlp_x_l)                how much attention alone turns it
    rel_change_next_layer |att_x_{l+1} - att_x_l| / |att_x_l|  size of one block's update
    rel_change_mlp_x      |mlp_x_l - att_x_l| / |att_x_l|      size of attention's update

Each is summarised over tokens as mean, std, p10, p50, p90. The last layer has no att_x_{l+1}
in the dump (the final hidden state is not recorded), so its *_next_layer values are null.
These are the quantities that decide whether a predictor fed an earlier layer's input (DejaVu's
look-ahead) can still see the later layer's state.

Files are streamed in row chunks and converted to float32 chunk by chunk, so a 400000 x 3072
dump never sits in memory whole. Tokens whose att_x_l has zero norm (cosine undefined) or
non-finite values are skipped and counted. Output: a JSON file (default DUMP_DIR/drift.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import sys

import numpy as np
from tqdm import tqdm

from dejavu_common.helpers import write_json_atomic
from sparse_predictor.dump_reader import DumpError, DumpReader  # numpy only, no torch

log = logging.getLogger("drift")

DRIFT_FORMAT = "dejavu-llama-drift"
DRIFT_VERSION = 1
METRICS = ("cos_next_layer", "cos_mlp_x", "rel_change_next_layer", "rel_change_mlp_x")
# 4096 rows x 3072 float32 = 48 MiB per array; four arrays live at once.
DEFAULT_CHUNK_ROWS = 4096
# meta.json fields that identify which rows a drift result was computed from (for caching).
FINGERPRINT_KEYS = ("model", "capacity", "hidden_size", "num_layers", "layers", "rows", "tokens", "complete")


def dump_fingerprint(folder: str, meta: dict) -> dict:
    """What a drift result depends on: meta.json's row counts plus the residual files' sizes and mtimes
    (a re-collected dump with the same row counts must not reuse a stale result)."""
    files = {}
    for layer in meta.get("layers", []):
        for tap in ("att_x", "mlp_x"):
            path = os.path.join(folder, f"{tap}_{layer}.mmap")
            if os.path.isfile(path):
                stat = os.stat(path)
                files[f"{tap}_{layer}"] = [stat.st_size, stat.st_mtime_ns]
    return {**{key: meta.get(key) for key in FINGERPRINT_KEYS}, "files": files}


def describe(values: np.ndarray) -> dict | None:
    """mean, std, p10, p50, p90 and count of a 1-D array (None when empty)."""
    if values.size == 0:
        return None
    v = values.astype(np.float64)
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    return {"mean": float(v.mean()), "std": float(v.std()), "p10": float(p10), "p50": float(p50),
            "p90": float(p90), "count": int(v.size)}


def chunk_drift(x: np.ndarray, other: np.ndarray, x_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row cosine of x with other, and |other - x| / |x| (float32 inputs, norms precomputed)."""
    dot = np.einsum("ij,ij->i", x, other)
    other_norm = np.sqrt(np.einsum("ij,ij->i", other, other))
    diff = other - x
    change = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = dot / (x_norm * other_norm)
        rel = change / x_norm
    return cos, rel


def read_chunk(source: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.asarray(source[start:stop], dtype=np.float32)


def layer_drift(reader: DumpReader, layer: int, next_layer: int | None, max_rows: int | None,
                chunk_rows: int, bar: tqdm | None = None) -> dict:
    """Drift statistics of one layer, streamed over row chunks."""
    pair = [layer] if next_layer is None else [layer, next_layer]
    n_rows = reader.rows_for(pair)
    if max_rows is not None:
        n_rows = min(n_rows, max_rows)
    att_x, mlp_x = reader.open("att_x", layer), reader.open("mlp_x", layer)
    att_next = reader.open("att_x", next_layer) if next_layer is not None else None

    parts = {name: [] for name in METRICS}
    skipped = 0
    for start in range(0, n_rows, chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        x = read_chunk(att_x, start, stop)
        m = read_chunk(mlp_x, start, stop)
        nxt = read_chunk(att_next, start, stop) if att_next is not None else None
        x_norm = np.sqrt(np.einsum("ij,ij->i", x, x))
        # a zero-norm input has no direction; a non-finite one is a broken row
        ok = np.isfinite(x_norm) & (x_norm > 0) & np.isfinite(m).all(axis=1)
        if nxt is not None:
            ok &= np.isfinite(nxt).all(axis=1)
        skipped += int((~ok).sum())
        x, m, x_norm = x[ok], m[ok], x_norm[ok]
        cos, rel = chunk_drift(x, m, x_norm)
        parts["cos_mlp_x"].append(cos)
        parts["rel_change_mlp_x"].append(rel)
        if nxt is not None:
            cos, rel = chunk_drift(x, nxt[ok], x_norm)
            parts["cos_next_layer"].append(cos)
            parts["rel_change_next_layer"].append(rel)
        if bar is not None:
            bar.update(stop - start)

    result = {"layer": layer, "next_layer": next_layer, "rows": n_rows, "rows_skipped": skipped}
    for name in METRICS:
        values = np.concatenate(parts[name]) if parts[name] else np.empty(0, np.float32)
        result[name] = describe(np.clip(values, -1.0, 1.0) if name.startswith("cos") else values)
    if skipped:
        log.warning("layer %d: skipped %d of %d rows (zero-norm or non-finite att_x/mlp_x)",
                    layer, skipped, n_rows)
    return result


def compute_drift(dump_dir: str, max_rows: int | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                  progress: bool = True) -> dict:
    """Drift of every layer in the dump. Raises DumpError for a missing, short or bad file."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    reader = DumpReader(dump_dir)
    layers = sorted(reader.layers)
    present = set(layers)
    for layer in layers:  # fail on a missing file before any work
        reader.validate([("att_x", layer), ("mlp_x", layer)])
    plan = [(layer, layer + 1 if layer + 1 in present else None) for layer in layers]
    total = sum(min(reader.rows_for([l] if n is None else [l, n]), max_rows or math.inf) for l, n in plan)
    with tqdm(total=int(total), desc="drift", unit="tok", disable=not progress, leave=False) as bar:
        per_layer = [layer_drift(reader, l, n, max_rows, chunk_rows, bar) for l, n in plan]
    return {
        "format": DRIFT_FORMAT,
        "version": DRIFT_VERSION,
        "dump": reader.path,
        "model": reader.model,
        "model_type": reader.model_type,
        "max_rows": max_rows,
        "fingerprint": dump_fingerprint(reader.path, reader.meta),
        "computed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "layers": per_layer,
    }


def load_cached(path: str, folder: str, meta: dict, max_rows: int | None) -> dict | None:
    """A drift file computed from exactly this dump state (same rows, same max_rows), else None."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        return None
    same = (cached.get("format") == DRIFT_FORMAT and cached.get("version") == DRIFT_VERSION
            and cached.get("fingerprint") == dump_fingerprint(folder, meta) and cached.get("max_rows") == max_rows)
    return cached if same else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump", help="dump folder (holds meta.json and the .mmap files)")
    p.add_argument("--out", default=None, help="output JSON (default DUMP/drift.json)")
    p.add_argument("--max-rows", type=int, default=None, help="use at most the first N valid rows")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows read per step")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="[drift] %(levelname)s: %(message)s", stream=sys.stderr)
    if args.max_rows is not None and args.max_rows < 1:
        p.error(f"--max-rows must be at least 1, got {args.max_rows}")
    try:
        result = compute_drift(args.dump, args.max_rows, args.chunk_rows, progress=not args.no_progress)
    except (DumpError, ValueError) as e:
        log.error("%s", e)
        return 1
    out = args.out or os.path.join(args.dump, "drift.json")
    write_json_atomic(out, result)
    for entry in result["layers"]:
        cos_next = entry["cos_next_layer"]
        log.info("layer %3d: cos(next) %s  cos(mlp_x) %.4f  rel change %s", entry["layer"],
                 f"{cos_next['mean']:.4f}" if cos_next else "  -   ", entry["cos_mlp_x"]["mean"] if entry["cos_mlp_x"] else math.nan,
                 f"{entry['rel_change_next_layer']['mean']:.4f}" if entry["rel_change_next_layer"] else "-")
    print(f"drift written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
