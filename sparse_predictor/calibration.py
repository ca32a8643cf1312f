"""Calibrate the thresholds of the training-free sparse MLPs (teal, cats) on an activation dump.

    python sparse_predictor/calibrate.py --data-path DUMP --checkpoint CKPT --method teal \
        --keep 0.5 0.25 0.1 [--L all] [--max-rows N] [--out DIR]

Per layer, the dump's `mlp_x` rows (the residual stream entering the MLP half) go through the
layer's own MLP-input norm (Llama: post_attention_layernorm; OPT pre-LN: final_layer_norm;
OPT post-LN: none) and MLP weights, loaded from the converted checkpoint with the project's
loaders, giving h, the MLP's input, for every calibration token. Then, for each kept fraction f:

  teal  t_in   = the (1 - f) quantile of |h|;
        t_down = the (1 - f) quantile of |act|, act being the activation (SiLU(gate)*up; ReLU(fc1))
                 of h with its entries at or below t_in zeroed: the input down (fc2) really
                 receives when teal runs, so the target is reached at inference, not only densely;
  cats  t_gate = the (1 - f) quantile of |SiLU(gate(h))| (Llama only: OPT has no gate).

Thresholds are per layer and pooled over tokens and entries (training_free.magnitude_thresholds:
the midpoint of the two order statistics around the quantile). The result,
thresholds_{method}.json (dejavu_common.thresholds_format), goes atomically into --out, by
default where the predictors go (`$CKPT_DIR`, else sparse_predictor/checkpoints/<dump folder
name>), so that the runner's --sparse-path finds it. An existing file is replaced.

Exit status: 0 written; 1 an error naming the file or flag (dump, checkpoint, values); 2 bad
arguments.
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
import torch

from dejavu_common.helpers import (DEVICE_CHOICES, CheckpointFolderError, KeepError, check_keep, checkpoint_config,
                                   keep_argument, parse_layers, resolve_device, write_json_atomic)
from dejavu_common.thresholds_format import METHODS, REACHED_KEYS, new_thresholds, thresholds_file

from .cli import default_ckpt_dir, resolve_data_path, setup_logging
from .dump_reader import DumpError, DumpReader, format_layers

log = logging.getLogger("sparse_predictor.calibration")

DEFAULT_CHUNK_ROWS = 4096


class CalibrationError(ValueError):
    """A checkpoint or dump that cannot be calibrated as asked (the message names it)."""


# The MLP's input h from the residual stream the dump's mlp_x holds, per family.
MLP_INPUT = {
    "llama": lambda block, x: block.post_attention_layernorm(x),
    "opt": lambda block, x: block.final_layer_norm(x) if block.norm_first else x,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Calibrate per-layer thresholds of the training-free sparse MLPs (teal, cats) on an "
                    "activation dump; writes thresholds_{method}.json for the runner's --sparse-path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", default=os.environ.get("DATA_PATH"), help="dump folder (default: $DATA_PATH)")
    p.add_argument("--checkpoint", required=True, help="the converted checkpoint folder the dump was collected from")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="teal: thresholds on h and on the input of down; cats: on |SiLU(gate(h))| (Llama only); "
                        "wina needs no calibration")
    p.add_argument("--keep", nargs="+", type=keep_argument("--keep"), required=True,
                   help="kept fractions in (0, 1] to calibrate for (the runner's --mlp-keep must be one of them)")
    p.add_argument("--L", default="all", help="layers: index, list (0,3,7), range (0-29) or 'all'")
    p.add_argument("--max-rows", type=int, default=None, help="use at most the first N rows (tokens) of the dump")
    p.add_argument("--out", default=os.environ.get("CKPT_DIR"),
                   help="output folder (default: $CKPT_DIR, else sparse_predictor/checkpoints/<dump folder name>)")
    p.add_argument("--model", default=None, help="model label for the file (default: meta.json's model)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="cpu")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows pushed through the MLP at once")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    return p


def checkpoint_family(checkpoint: str) -> str:
    """'llama' or 'opt' from the converted checkpoint's config.json."""
    try:
        path, config = checkpoint_config(checkpoint)
    except CheckpointFolderError as error:
        raise CalibrationError(str(error)) from None
    model_type = config.get("model_type")
    if model_type not in MLP_INPUT:
        raise CalibrationError(f"{path}: model_type {model_type!r}; calibration knows {', '.join(MLP_INPUT)}")
    return model_type


def load_block(checkpoint: str, family: str, layer: int, device: str):
    from dejavu_llama.modules.common import CheckpointError
    from dejavu_llama.pipeline_parallel.model_registry import load_model_module

    try:
        return load_model_module(family).GPTBlock.from_pretrained(checkpoint, layer_index=layer,
                                                                  dtype=torch.float32, device=device)
    except CheckpointError as error:
        raise CalibrationError(str(error)) from None


def mlp_inputs(reader: DumpReader, block, family: str, layer: int, rows: int, chunk: int, device: str):
    """h [rows, d] (float32): the layer's MLP input for the first `rows` tokens of the dump."""
    source = reader.mlp_x(layer)
    parts = []
    for start in range(0, rows, chunk):
        x = torch.from_numpy(np.asarray(source[start:min(start + chunk, rows)], dtype=np.float32)).to(device)
        parts.append(MLP_INPUT[family](block, x))
    return torch.cat(parts)


def in_chunks(function, h, chunk):
    return torch.cat([function(h[start:start + chunk]) for start in range(0, len(h), chunk)])


def calibrate_teal(block, h, keeps, chunk):
    """{keep: entry} for one layer: t_in on |h|, then t_down on |act| of the masked h."""
    from dejavu_llama.modules.training_free import apply_mask, magnitude_mask, magnitude_thresholds

    entries = {}
    for keep, (t_in, reached_in) in zip(keeps, magnitude_thresholds(h, keeps)):
        act = in_chunks(lambda part: block.mlp.activation(apply_mask(part, magnitude_mask(part, t_in))), h, chunk)
        (t_down, reached_down), = magnitude_thresholds(act, [keep])
        entries[keep] = {"t_in": t_in, "t_down": t_down, "reached": {"in": reached_in, "down": reached_down}}
    return entries


def calibrate_cats(block, h, keeps, chunk):
    """{keep: entry} for one layer: t_gate on |SiLU(gate(h))|."""
    from dejavu_llama.modules.training_free import magnitude_thresholds

    gate, up, _, act_fn = block.mlp.neuron_linears()
    if up is None:
        raise CalibrationError("--method cats needs a gated MLP (Llama); this checkpoint's MLP has no gate "
                               "(OPT): use --method teal")
    gated = in_chunks(lambda part: act_fn(gate(part)), h, chunk)
    return {keep: {"t_gate": threshold, "reached": {"neurons": reached}}
            for keep, (threshold, reached) in zip(keeps, magnitude_thresholds(gated, keeps))}


CALIBRATORS = {"teal": calibrate_teal, "cats": calibrate_cats}


def calibrate(data_path: str, checkpoint: str, method: str, keeps, layers_spec="all", max_rows=None, out=None,
              model=None, device="cpu", chunk_rows=DEFAULT_CHUNK_ROWS) -> tuple[str, dict]:
    """Calibrate and write thresholds_{method}.json; returns (path, content)."""
    if method not in CALIBRATORS:
        raise CalibrationError(f"--method {method!r}: choose one of {', '.join(CALIBRATORS)}")
    keeps = [check_fraction(keep) for keep in keeps]
    if max_rows is not None and max_rows < 1:
        raise CalibrationError(f"--max-rows must be at least 1, got {max_rows}")
    if chunk_rows < 1:
        raise CalibrationError(f"--chunk-rows must be at least 1, got {chunk_rows}")
    reader = DumpReader(resolve_data_path(data_path))
    layers = parse_layers(layers_spec, reader.layers, "--L")
    checkpoint = os.path.abspath(checkpoint)
    family = checkpoint_family(checkpoint)
    if reader.model_type != family:
        raise CalibrationError(f"{reader.meta_path}: a dump of a {reader.model_type!r} model, but --checkpoint "
                               f"{checkpoint} is {family!r}")
    if method == "cats" and family != "llama":
        raise CalibrationError(f"--method cats needs a gated MLP (Llama); --checkpoint {checkpoint} is {family} "
                               "(fc1/ReLU, no gate): use --method teal")
    rows = reader.rows_for(layers)
    if max_rows is not None:
        rows = min(rows, max_rows)
    if rows < 1:
        raise CalibrationError(f"{reader.meta_path}: no rows recorded for layers {format_layers(layers)}")
    if not reader.complete:
        log.warning("meta.json says the dump is not complete: calibrating on the %d rows it records", rows)
    out = os.path.abspath(out or default_ckpt_dir(reader.path))
    keeps_out = {keep: {} for keep in keeps}
    for position, layer in enumerate(layers):
        block = load_block(checkpoint, family, layer, device)
        if (block.config.hidden_size, mlp_width_of(block)) != (reader.hidden_size, reader.intermediate_size):
            raise CalibrationError(
                f"--checkpoint {checkpoint} (hidden {block.config.hidden_size}, MLP {mlp_width_of(block)}) does not "
                f"match the dump {reader.meta_path} (hidden {reader.hidden_size}, MLP {reader.intermediate_size})")
        with torch.inference_mode():
            h = mlp_inputs(reader, block, family, layer, rows, chunk_rows, device)
            entries = CALIBRATORS[method](block, h, keeps, chunk_rows)
        for keep, entry in entries.items():
            keeps_out[keep][layer] = entry
        log.info("layer %d (%d/%d): %s", layer, position + 1, len(layers), "; ".join(
            f"keep {keep:g}: " + ", ".join(f"{name} {entry['reached'][name]:.4f}" for name in REACHED_KEYS[method])
            for keep, entry in entries.items()))
        del block, h
    data = new_thresholds(method, model or reader.model or os.path.basename(checkpoint), family, checkpoint,
                          reader.path, reader.hidden_size, reader.intermediate_size, layers, rows, keeps_out)
    path = thresholds_file(out, method)
    write_json_atomic(path, data, indent=1)
    log.info("%s thresholds for layers %s, kept fractions %s, on %d rows -> %s", method, format_layers(layers),
             ", ".join(f"{keep:g}" for keep in keeps), rows, path)
    return path, data


def mlp_width_of(block) -> int:
    config = block.config
    return getattr(config, "intermediate_size", None) or config.ffn_dim


def check_fraction(keep) -> float:
    try:
        value = check_keep(keep, "--keep")
    except KeepError as error:
        raise CalibrationError(str(error)) from None
    if value > 1:
        raise CalibrationError(f"--keep {keep:g}: a kept fraction in (0, 1] (thresholds keep a fraction of "
                               "entries, not a count)")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        device = resolve_device(args.device)
        calibrate(args.data_path, args.checkpoint, args.method, args.keep, args.L, args.max_rows, args.out,
                  args.model, device, args.chunk_rows)
    except (CalibrationError, DumpError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0
