"""ReLU stand-in for chosen Llama MLPs: the activation control of the predictor study.

    python -m dejavu_study.relu_control --checkpoint CKPT --data-path DUMP --layers 2,7 --out NEW_CKPT \
        [--shift T | --target-zeros 0.9] [--l1 LAMBDA] [--rows N] [--epochs E] [--force]

For each chosen layer, SiLU(gate) * up becomes ReLU(gate - shift) * up, and gate, up and down
(starting from the originals) are fitted so that the layer's MLP reproduces the original MLP's
output on the dump's inputs: h = post_attention_layernorm(mlp_x) for the dump's first --rows
tokens, target = the original MLP(h). The fit is layer-local (each layer sees the original
model's inputs), AdamW on the MSE of the MLP output relative to the target's mean square, on a
seeded split of the rows; the held-out rows are reported. Attention, RoPE and the residual
stream upstream of each layer stay as they are, so only the activation function changes.

Sparser variants: --shift T raises the ReLU's threshold (exact zeros wherever gate <= T);
--target-zeros F sets T per layer to the F quantile of the original gate on the training rows
(so about F of the entries are zero before fitting); --l1 adds LAMBDA * mean(ReLU(gate - T)) to
the loss, which pushes gates under the threshold during the fit.

Output: a converted checkpoint folder (docs/formats.md, "Converted checkpoints") with the fitted
layers' files rewritten (same keys and dtype), every other file copied unchanged, and config.json
gaining `dejavu_mlp_activations` {"<layer>": "relu" | "relu@T"} (dejavu_common.mlp_activations; a
shift is folded into gate_proj.bias instead where the config has mlp_bias), plus
`relu_control.json`: per layer the shift, the zero fraction and the relative error of the plain
swap (original weights) and of the fitted MLP, and the settings. The folder is written beside the
target and renamed into place once complete; an existing --out is an error unless --force.

Exit status: 0 written; 1 an error naming the file, key or flag; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm import tqdm

from dejavu_common.helpers import (DEVICE_CHOICES, CheckpointFolderError, checkpoint_config, format_layers, parse_layers,
                                   resolve_device, write_json_atomic)
from dejavu_common.mlp_activations import CONFIG_KEY, override_name

log = logging.getLogger("relu_control")

RECORD_FILE = "relu_control.json"
RECORD_FORMAT = "dejavu-relu-control"
# torch.quantile refuses more entries than this; the threshold is taken on a seeded subsample
MAX_QUANTILE_ENTRIES = 1 << 24
CHUNK_ROWS = 4096


class ReluControlError(ValueError):
    """An input the ReLU control cannot use (the message names the file, key or flag)."""


class ReluMLP(torch.nn.Module):
    """down(ReLU(gate(h) - shift) * up(h)) with trainable copies of an MLP's three Linears."""

    def __init__(self, gate: torch.nn.Linear, up: torch.nn.Linear, down: torch.nn.Linear, shift: float):
        super().__init__()
        self.gate, self.up, self.down = copy.deepcopy(gate), copy.deepcopy(up), copy.deepcopy(down)
        self.shift = float(shift)

    def gated(self, h: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.gate(h) - self.shift)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gated = self.gated(h)
        return self.down(gated * self.up(h)), gated


# ---- inputs -------------------------------------------------------------------------------------
def read_config(checkpoint: str) -> dict:
    try:
        path, config = checkpoint_config(checkpoint)
    except CheckpointFolderError as error:
        raise ReluControlError(str(error)) from None
    if config.get("model_type") != "llama":
        raise ReluControlError(f"{path}: model_type {config.get('model_type')!r}; the ReLU control replaces the "
                               "SiLU of a gated Llama MLP")
    return config


def check_out(out: str, checkpoint: str, force: bool) -> str:
    out = os.path.abspath(out)
    if out == checkpoint:
        raise ReluControlError(f"--out {out} is the source --checkpoint; choose another folder")
    if os.path.lexists(out) and not force:
        raise ReluControlError(f"--out {out} exists; pass --force to replace it")
    return out


def mlp_rows(reader, block, layer: int, rows: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, target) for the first `rows` tokens: the MLP's input and the original MLP's output."""
    source = reader.mlp_x(layer)
    h_parts, y_parts = [], []
    with torch.no_grad():
        for start in range(0, rows, CHUNK_ROWS):
            x = torch.from_numpy(np.asarray(source[start:min(rows, start + CHUNK_ROWS)], dtype=np.float32)).to(device)
            h = block.post_attention_layernorm(x)
            h_parts.append(h)
            y_parts.append(block.mlp(h))
    h, y = torch.cat(h_parts), torch.cat(y_parts)
    finite = torch.isfinite(h).all(dim=1) & torch.isfinite(y).all(dim=1)
    if not bool(finite.all()):
        log.warning("layer %d: dropped %d rows with non-finite values", layer, int((~finite).sum()))
    return h[finite], y[finite]


def quantile_threshold(values: torch.Tensor, fraction: float, seed: int) -> float:
    flat = values.reshape(-1)
    if flat.numel() > MAX_QUANTILE_ENTRIES:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=generator)[:MAX_QUANTILE_ENTRIES].to(flat.device)]
    return float(torch.quantile(flat.float(), fraction))


# ---- fit ----------------------------------------------------------------------------------------
@torch.no_grad()
def scores(model: ReluMLP, h: torch.Tensor, y: torch.Tensor) -> dict:
    """Relative MSE (mean squared error / mean square of the target) and fraction of exact zeros."""
    err = energy = zeros = entries = 0.0
    for start in range(0, h.shape[0], CHUNK_ROWS):
        out, gated = model(h[start:start + CHUNK_ROWS])
        target = y[start:start + CHUNK_ROWS]
        err += float(((out - target) ** 2).sum())
        energy += float((target ** 2).sum())
        zeros += float((gated == 0).sum())
        entries += gated.numel()
    return {"rel_mse": err / energy if energy > 0 else None, "zero_fraction": zeros / entries if entries else None}


def fit_layer(model: ReluMLP, h_train, y_train, h_val, y_val, *, epochs: int, lr: float, batch_size: int,
              l1: float, seed: int, desc: str, progress: bool) -> list[dict]:
    """AdamW on MSE / mean square of the target (+ l1 * mean gated activation); returns the history."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # stay near the originals
    generator = torch.Generator(device="cpu").manual_seed(seed)
    scale = float((y_train ** 2).mean()) or 1.0
    history = []
    for epoch in tqdm(range(epochs), desc=desc, unit="epoch", leave=False, disable=None if progress else True):
        model.train()
        order = torch.randperm(h_train.shape[0], generator=generator).to(h_train.device)
        total = 0.0
        for start in range(0, order.numel(), batch_size):
            idx = order[start:start + batch_size]
            out, gated = model(h_train[idx])
            loss = ((out - y_train[idx]) ** 2).mean() / scale
            if l1:
                loss = loss + l1 * gated.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
        model.eval()
        history.append({"epoch": epoch + 1, "train_loss": total / h_train.shape[0],
                        **{f"heldout_{k}": v for k, v in scores(model, h_val, y_val).items()}})
    return history


def run_layer(reader, checkpoint: str, layer: int, args, device: str) -> tuple[dict, ReluMLP]:
    from sparse_predictor.calibration import CalibrationError, load_block
    from sparse_predictor.training import split_rows

    started = time.perf_counter()
    try:
        block = load_block(checkpoint, "llama", layer, device)
    except CalibrationError as error:
        raise ReluControlError(f"--checkpoint {checkpoint}, layer {layer}: {error}") from None
    rows = reader.rows_for([layer]) if args.rows is None else min(reader.rows_for([layer]), args.rows)
    h, y = mlp_rows(reader, block, layer, rows, device)
    train_idx, val_idx = split_rows(h.shape[0], args.val_fraction, args.seed)
    train_idx, val_idx = torch.from_numpy(train_idx).to(device), torch.from_numpy(val_idx).to(device)
    h_train, y_train, h_val, y_val = h[train_idx], y[train_idx], h[val_idx], y[val_idx]
    gate, up, down, _ = block.mlp.neuron_linears()
    shift = args.shift
    if args.target_zeros is not None:
        with torch.no_grad():
            gates = torch.cat([gate(h_train[s:s + CHUNK_ROWS]) for s in range(0, h_train.shape[0], CHUNK_ROWS)])
        shift = quantile_threshold(gates, args.target_zeros, args.seed)
        if shift < 0:
            log.warning("layer %d: the %g quantile of the gate is %.4f < 0; using shift 0 (plain ReLU)",
                        layer, args.target_zeros, shift)
            shift = 0.0
        del gates
    torch.manual_seed(args.seed)
    model = ReluMLP(gate, up, down, shift).to(device)
    swap = scores(model, h_val, y_val)
    history = fit_layer(model, h_train, y_train, h_val, y_val, epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size, l1=args.l1, seed=args.seed, desc=f"relu layer {layer}",
                        progress=not args.no_progress)
    fitted = scores(model, h_val, y_val)
    record = {
        "layer": layer, "shift": shift, "rows_train": int(h_train.shape[0]), "rows_heldout": int(h_val.shape[0]),
        "relu_swap": {"heldout_rel_mse": swap["rel_mse"], "heldout_zero_fraction": swap["zero_fraction"]},
        "fitted": {"heldout_rel_mse": fitted["rel_mse"], "heldout_zero_fraction": fitted["zero_fraction"],
                   "train_rel_mse": scores(model, h_train[:len(h_val) * 4], y_train[:len(h_val) * 4])["rel_mse"]},
        "history": history, "seconds": round(time.perf_counter() - started, 3),
    }
    log.info("layer %d: shift %.4g; held-out relative error %.4f (plain swap) -> %.4f (fitted); zeros %.3f -> %.3f",
             layer, shift, swap["rel_mse"], fitted["rel_mse"], swap["zero_fraction"], fitted["zero_fraction"])
    return record, model.cpu()


# ---- output -------------------------------------------------------------------------------------
def fitted_layer_state(path: str, model: ReluMLP, fold_shift: bool) -> dict:
    """The layer file's state dict with the MLP's three weights (and biases) replaced, in the file's dtype."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for name, linear in (("gate_proj", model.gate), ("up_proj", model.up), ("down_proj", model.down)):
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            value = getattr(linear, part)
            if (key in state) != (value is not None):
                raise ReluControlError(f"{path}: key {key} {'missing' if value is not None else 'unexpected'}")
            if value is None:
                continue
            value = value.detach()
            if key == "gate_proj.bias" and fold_shift:
                value = value - model.shift  # ReLU(W h + b - t) = ReLU(W h + (b - t))
            state[key] = value.to(state[key].dtype).contiguous()
    return state


def write_checkpoint(checkpoint: str, out: str, config: dict, models: dict[int, ReluMLP], record: dict,
                     force: bool) -> None:
    """Stage the whole folder beside `out`, then rename it into place."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.")
    try:
        fold = bool(config.get("mlp_bias", False))
        overrides = dict(config.get(CONFIG_KEY) or {})
        for name in sorted(os.listdir(checkpoint)):
            source = os.path.join(checkpoint, name)
            if name in ("config.json", RECORD_FILE) or not os.path.isfile(source):
                continue
            if name not in {f"pytorch_{layer}.pt" for layer in models}:
                shutil.copy2(source, os.path.join(staging, name))
        for layer, model in models.items():
            name = f"pytorch_{layer}.pt"
            torch.save(fitted_layer_state(os.path.join(checkpoint, name), model, fold), os.path.join(staging, name))
            overrides[str(layer)] = override_name(0.0 if fold else model.shift)
        config = {**config, CONFIG_KEY: dict(sorted(overrides.items(), key=lambda item: int(item[0])))}
        write_json_atomic(os.path.join(staging, "config.json"), config, indent=2)
        write_json_atomic(os.path.join(staging, RECORD_FILE), {**record, "overrides": config[CONFIG_KEY],
                                                               "shift_folded_into_gate_bias": fold})
        if os.path.lexists(out):
            if not force:
                raise ReluControlError(f"--out {out} exists; pass --force to replace it")
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.old.")
            os.rename(out, os.path.join(old, "previous"))
            os.rename(staging, out)
            shutil.rmtree(old)
        else:
            os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run(args) -> dict:
    from sparse_predictor.dump_reader import DumpReader

    checkpoint = os.path.abspath(args.checkpoint)
    config = read_config(checkpoint)
    out = check_out(args.out, checkpoint, args.force)
    reader = DumpReader(args.data_path)
    layers = parse_layers(args.layers, reader.layers, "--layers")
    if (config.get("hidden_size"), config.get("intermediate_size")) != (reader.hidden_size, reader.intermediate_size):
        raise ReluControlError(f"{os.path.join(checkpoint, 'config.json')}: hidden_size {config.get('hidden_size')}, "
                               f"intermediate_size {config.get('intermediate_size')} do not match the dump "
                               f"{reader.meta_path} ({reader.hidden_size}, {reader.intermediate_size})")
    device = resolve_device(args.device)
    records, models = [], {}
    for layer in layers:
        entry, model = run_layer(reader, checkpoint, layer, args, device)
        records.append(entry)
        models[layer] = model
    record = {
        "format": RECORD_FORMAT, "version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_checkpoint": checkpoint, "dump": reader.path, "layers": layers,
        "settings": {"shift": args.shift, "target_zeros": args.target_zeros, "l1": args.l1, "rows": args.rows,
                     "val_fraction": args.val_fraction, "epochs": args.epochs, "lr": args.lr,
                     "batch_size": args.batch_size, "seed": args.seed, "device": device},
        "per_layer": {str(r["layer"]): r for r in records},
    }
    write_checkpoint(checkpoint, out, config, models, record, args.force)
    log.info("ReLU in layers %s -> %s", format_layers(layers), out)
    return record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="converted Llama checkpoint folder the dump was collected from")
    p.add_argument("--data-path", required=True, help="activation dump of that checkpoint (its mlp_x rows)")
    p.add_argument("--layers", required=True, help="layers to switch to ReLU: index, list (2,7), range or 'all'")
    p.add_argument("--out", required=True, help="new converted checkpoint folder")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    sparser = p.add_mutually_exclusive_group()
    sparser.add_argument("--shift", type=float, default=0.0, help="ReLU threshold T: ReLU(gate - T)")
    sparser.add_argument("--target-zeros", type=float, default=None,
                         help="set T per layer to this quantile of the original gate (e.g. 0.9)")
    p.add_argument("--l1", type=float, default=0.0, help="weight of mean(ReLU(gate - T)) in the loss")
    p.add_argument("--rows", type=int, default=50000, help="first N dump rows (tokens) per layer")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out part of the rows")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    return p


def check_args(args) -> None:
    if args.shift < 0:
        raise ReluControlError(f"--shift must be >= 0, got {args.shift}")
    if args.target_zeros is not None and not 0 < args.target_zeros < 1:
        raise ReluControlError(f"--target-zeros must be in (0, 1), got {args.target_zeros}")
    if args.l1 < 0:
        raise ReluControlError(f"--l1 must be >= 0, got {args.l1}")
    for flag, value in (("--rows", args.rows), ("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ReluControlError(f"{flag} must be at least 1, got {value}")
    if not 0 < args.val_fraction < 1:
        raise ReluControlError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")


def main(argv: list[str] | None = None) -> int:
    from sparse_predictor.dump_reader import DumpError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="[relu_control] %(levelname)s: %(message)s", stream=sys.stderr)
    try:
        check_args(args)
        run(args)
    except (ReluControlError, DumpError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
