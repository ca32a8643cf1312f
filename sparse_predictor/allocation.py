"""Per-layer MLP budgets: how much each layer keeps, from its measured sensitivity (TEAL's greedy).

    python sparse_predictor/allocate.py --data-path DUMP --checkpoint CKPT --method predicted \
        --predictors DIR --target-keep 0.5 [0.75 ...] [--target bytes] [--grid 1 0.9 ...] [--out DIR]

Layers differ in what sparsity costs them, so one kept fraction for every layer wastes budget.
Two steps:

1. Sensitivity, on training text only (the dump of the training passages): for each layer and
   each kept fraction f of the grid, the relative error of the block's output
   ||mlp_f(h) - mlp(h)||^2 / ||mlp_x + mlp(h)||^2 (--error block, the default: a layer whose
   MLP adds little to the residual stream counts for little; --error mlp divides by
   ||mlp(h)||^2 instead), averaged over a subsample of the dump's rows (evenly
   spaced, --max-rows), h being the layer's MLP input (the layer's own norm of mlp_x, as
   calibration.py computes it). mlp_f is the sparse MLP the runner executes: the mode's torch
   reference (sparse_execution.MODES[method].mlp) on the layer's block set up by
   configure_sparse with that layer's kept fraction; predicted keeps the top K of the layer's
   trained predictor (K = kept_count(f, width)), teal and cats use the calibrated thresholds of f
   (thresholds_{method}.json must hold every fraction of the grid below 1).
2. Allocation (greedy_allocation, pure): every layer starts at 1.0; repeatedly the layer whose
   next step down the grid adds the least error per unit of MLP bytes saved
   (sparse_cost.mlp_bytes_per_token of the mode at that fraction) steps down, until the mean
   kept fraction (--target keep) or the mean MLP bytes per token relative to dense (--target
   bytes) is at or below the target. One run of the greedy serves every target: a lower target
   continues the same sequence of steps, so each layer's fraction is monotone in the target.

Each target becomes allocation_{method}_{target}.json (dejavu_common.allocation_format), written
atomically into --out (default: the predictors' folder, else the thresholds file's), for the
runner's --mlp-keep-file. The bytes count the kept fractions as targets (thresholds reach them
on average); predicted's include its predictor at the weights' own width.

Exit status: 0 written; 1 an error naming the file or flag; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os

import numpy as np
import torch
from tqdm import tqdm

from dejavu_common.allocation_format import METHODS, TARGET_KINDS, AllocationError, allocation_file, new_allocation
from dejavu_common.helpers import DEVICE_CHOICES, checkpoint_config, parse_layers, resolve_device, write_json_atomic
from dejavu_common.thresholds_format import ThresholdsError, read_thresholds, thresholds_file

from .calibration import MLP_INPUT, CalibrationError, checkpoint_family, load_block, mlp_width_of
from .cli import resolve_data_path, setup_logging
from .dump_reader import DumpError, DumpReader, format_layers

log = logging.getLogger("sparse_predictor.allocation")

DEFAULT_GRID = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.25, 0.1)
DEFAULT_MAX_ROWS = 4096
DEFAULT_CHUNK_ROWS = 1024
TARGET_TOLERANCE = 1e-9
FRACTION_TOLERANCE = 1e-9
# what a layer's error is relative to: its block's output (the residual stream after the MLP,
# so a layer whose MLP adds little to the stream counts for little), or its MLP output alone
ERRORS = {"block": "block's output", "mlp": "layer's MLP output"}  # as the thresholds file matches kept fractions


# ---- the greedy (pure) -------------------------------------------------------------------------------
def check_grid(grid) -> list[float]:
    """The grid as descending distinct fractions in (0, 1], starting at 1.0 (added when absent)."""
    values = []
    for value in grid:
        value = float(value)
        if not math.isfinite(value) or not 0 < value <= 1:
            raise AllocationError(f"--grid {value!r}: kept fractions must lie in (0, 1]")
        values.append(value)
    values = sorted(set(values) | {1.0}, reverse=True)
    if len(values) < 2:
        raise AllocationError("--grid: give at least one kept fraction below 1")
    return values


def greedy_allocation(errors, costs, grid, target, kind="keep"):
    """({layer: kept fraction}, reached) for one target.

    errors, costs: {layer: [value at each grid fraction]}, aligned with `grid` (descending, from
    1.0): the relative error of the layer's MLP output and its MLP bytes per token relative to
    dense. Every layer starts at grid[0]; the layer whose next step adds the least error per
    unit of bytes saved steps down (ties: the lower layer index) until the mean kept fraction
    (kind "keep") or the mean relative bytes (kind "bytes") is at or below `target`."""
    return greedy_allocations(errors, costs, grid, [target], kind)[0]


def greedy_allocations(errors, costs, grid, targets, kind="keep"):
    """greedy_allocation for several targets along one sequence of steps (highest target first)."""
    if kind not in TARGET_KINDS:
        raise AllocationError(f"--target {kind!r}: choose one of {', '.join(TARGET_KINDS)}")
    layers = sorted(errors)
    if not layers:
        raise AllocationError("no layers to allocate")
    for layer in layers:
        if len(errors[layer]) != len(grid) or len(costs[layer]) != len(grid):
            raise AllocationError(f"layer {layer}: the sensitivity table does not match the grid of {len(grid)}")
    position = {layer: 0 for layer in layers}

    def measure():
        if kind == "keep":
            return sum(grid[position[layer]] for layer in layers) / len(layers)
        return sum(costs[layer][position[layer]] for layer in layers) / len(layers)

    def step():
        best = None
        for layer in layers:
            index = position[layer]
            if index + 1 >= len(grid):
                continue
            saved = costs[layer][index] - costs[layer][index + 1]
            added = errors[layer][index + 1] - errors[layer][index]
            score = added / saved if saved > 0 else math.inf
            if best is None or score < best[0]:
                best = (score, layer)
        if best is None:
            return False
        position[best[1]] += 1
        return True

    results = {}
    for target in sorted(set(float(t) for t in targets), reverse=True):
        while measure() > target + TARGET_TOLERANCE:
            if not step():
                floor = measure()
                raise AllocationError(
                    f"--target-keep {target:g}: every layer is at the grid's lowest kept fraction {grid[-1]:g} and "
                    f"the mean {'kept fraction' if kind == 'keep' else 'MLP bytes relative to dense'} is still "
                    f"{floor:.4f}; lower the grid (--grid) or raise the target")
        results[target] = ({layer: grid[position[layer]] for layer in layers}, measure())
    return [results[float(target)] for target in targets]


# ---- the sensitivity (a model and a dump) ------------------------------------------------------------
def sample_rows(rows: int, max_rows: int | None) -> np.ndarray:
    """Indices of at most max_rows rows spread evenly over the first `rows` (all when fewer)."""
    if max_rows is None or max_rows >= rows:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, max_rows).round().astype(np.int64))


def as_tensor(array, device):
    return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(device)


def threshold_entries(path, method, grid, layers, hidden, width, checkpoint, data_path, out):
    """{fraction: {layer: thresholds}} for every grid fraction below 1, from the thresholds file."""
    if not os.path.isfile(path):
        raise AllocationError(f"--thresholds {path}: not found (write it with sparse_predictor/calibrate.py "
                              f"--method {method} --keep {' '.join(f'{f:g}' for f in grid if f < 1)})")
    try:
        with open(path, encoding="utf-8") as handle:
            held = [float(key) for key in json.load(handle).get("keeps", {})]
    except (OSError, ValueError, AttributeError) as error:
        raise AllocationError(f"--thresholds {path}: not a readable thresholds file ({error})") from None
    missing = [f for f in grid if f < 1 and not any(abs(f - value) <= FRACTION_TOLERANCE for value in held)]
    if missing:
        fractions = " ".join(f"{f:g}" for f in missing)
        raise AllocationError(
            f"--thresholds {path}: no thresholds for kept fraction(s) {fractions} of the grid (the file has "
            f"{', '.join(f'{v:g}' for v in sorted(held, reverse=True)) or 'none'}); calibrate them with: python "
            f"sparse_predictor/calibrate.py --data-path {data_path} --checkpoint {checkpoint} --method {method} "
            f"--keep {' '.join(f'{f:g}' for f in grid if f < 1)} --out {os.path.dirname(path) or out}")
    try:
        return {f: read_thresholds(path, method, f, layers, hidden, width) for f in grid if f < 1}
    except ThresholdsError as error:
        raise AllocationError(str(error)) from None


def layer_predictor(folder, layer, dataset):
    """(predictor, input mode) of one layer, as sparse execution loads it."""
    from dejavu_llama.modules.sparse_execution import SparseSetupError, load_predictors

    try:
        return load_predictors(folder, "mlp", layer, dataset)
    except (SparseSetupError, ValueError, OSError) as error:
        raise AllocationError(f"--predictors {folder}: {error}") from None


def predictor_rank(predictor):
    """D as the bytes figure counts it (sparse_execution.describe_cost): the first linear's width."""
    linears = [module for module in predictor.modules() if isinstance(module, torch.nn.Linear)]
    return linears[0].out_features if linears else None


def layer_sensitivity(block, method, layer, h, x, grid, predictor=None, input_mode="same", thresholds=None,
                      chunk=DEFAULT_CHUNK_ROWS, residual=None):
    """[relative error at each grid fraction] of one layer over the rows of h [rows, d].

    x: the predictor's input rows (mlp_x for input mode same, att_x for prev); thresholds:
    {fraction: {layer: entry}} for teal and cats. The block is set up per fraction by
    configure_sparse and runs the mode's torch reference (MODES[method].mlp). The error is the
    squared change of the MLP output over the squared norm of the block's output
    (residual + MLP output) where `residual` (the rows of mlp_x) is given, else of the MLP
    output itself."""
    from dejavu_llama.modules.sparse_execution import MODES, configure_sparse

    mode = MODES[method]
    errors, dense_outputs, norms = [], [], []  # the dense MLP's output per chunk, computed once
    for fraction in grid:
        options = dict(layer_mlp_keep={layer: fraction}, layers={layer}, sparse_attention=False, use_gather=False)
        if method == "predicted":
            options["predictors"] = {("mlp", layer): (predictor, input_mode)}
        elif fraction < 1:
            options["thresholds"] = {layer: thresholds[fraction][layer]}
        configure_sparse([block], method, **options)
        mlp = block.mlp
        total, counted = 0.0, 0
        for index, start in enumerate(range(0, len(h), chunk)):
            part = h[start:start + chunk][None]  # [1, rows, d]: one sequence, as the blocks see a prompt
            block.taps.inputs = {"mlp_x": x[start:start + chunk][None], "att_x": x[start:start + chunk][None]}
            if index == len(dense_outputs):
                dense = mlp.output(mlp.activation(part)).float()
                dense_outputs.append(dense)
                after = dense if residual is None else dense + residual[start:start + chunk][None].float()
                norms.append(after.pow(2).sum(-1))
            dense, reference = dense_outputs[index], norms[index]
            sparse, _ = mode.mlp(mlp, part)
            valid = reference > 0  # a zero output has no relative error
            error = (sparse.float() - dense).pow(2).sum(-1)
            total += float((error[valid] / reference[valid]).sum())
            counted += int(valid.sum())
        errors.append(total / counted if counted else 0.0)
    return errors


def layer_costs(method, hidden, width, family, grid, rank=None):
    """[MLP bytes per token relative to dense at each grid fraction] of one layer."""
    from dejavu_llama.modules.sparse_cost import mlp_bytes_per_token

    return [mlp_bytes_per_token(method, hidden, width, fraction, predictor_rank=rank, dtype_bytes=4,
                                family=family)["relative"] for fraction in grid]


def allocate(data_path, checkpoint, method, targets, kind="keep", predictors=None, thresholds=None,
             grid=DEFAULT_GRID, layers_spec="all", max_rows=DEFAULT_MAX_ROWS, out=None, device="cpu",
             chunk_rows=DEFAULT_CHUNK_ROWS, predictor_dataset="c4", progress=True, error="block"):
    """Measure the sensitivity, allocate for each target and write the files; returns [(path, content)]."""
    if method not in METHODS:
        raise AllocationError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if kind not in TARGET_KINDS:
        raise AllocationError(f"--target {kind!r}: choose one of {', '.join(TARGET_KINDS)}")
    targets = [check_target(target, kind) for target in targets]
    if not targets:
        raise AllocationError("--target-keep: give at least one target")
    grid = check_grid(grid)
    if error not in ERRORS:
        raise AllocationError(f"--error {error!r}: choose one of {', '.join(ERRORS)}")
    if max_rows is not None and max_rows < 1:
        raise AllocationError(f"--max-rows must be at least 1, got {max_rows}")
    if chunk_rows < 1:
        raise AllocationError(f"--chunk-rows must be at least 1, got {chunk_rows}")
    if method == "predicted" and not predictors:
        raise AllocationError("--method predicted needs --predictors DIR (the folder of c4_layer{L}.pt)")
    if method != "predicted" and not (thresholds or predictors or out):
        raise AllocationError(f"--method {method} needs --thresholds FILE, or --predictors DIR holding "
                              f"thresholds_{method}.json")

    reader = DumpReader(resolve_data_path(data_path))
    layers = parse_layers(layers_spec, reader.layers, "--L")
    checkpoint = os.path.abspath(checkpoint)
    family = checkpoint_family(checkpoint)
    config_path, config = checkpoint_config(checkpoint)
    if reader.model_type != family:
        raise AllocationError(f"{reader.meta_path}: a dump of a {reader.model_type!r} model, but --checkpoint "
                              f"{checkpoint} is {family!r}")
    if method == "cats" and family != "llama":
        raise AllocationError(f"--method cats needs a gated MLP (Llama); --checkpoint {checkpoint} is {family}")
    predictors = os.path.abspath(predictors) if predictors else None
    out = os.path.abspath(out or predictors or os.path.dirname(os.path.abspath(thresholds)))
    thresholds_path = None
    if method != "predicted":
        thresholds_path = os.path.abspath(thresholds or thresholds_file(predictors or out, method))
    rows = reader.rows_for(layers)
    if rows < 1:
        raise AllocationError(f"{reader.meta_path}: no rows recorded for layers {format_layers(layers)}")
    if not reader.complete:
        log.warning("meta.json says the dump is not complete: measuring on the %d rows it records", rows)
    chosen = sample_rows(rows, max_rows)
    hidden, width = reader.hidden_size, reader.intermediate_size
    entries = None
    if thresholds_path is not None:
        entries = threshold_entries(thresholds_path, method, grid, layers, hidden, width, checkpoint, reader.path,
                                    out)

    errors, costs = {}, {}
    bar = tqdm(total=len(layers) * len(grid), desc=f"sensitivity ({method})", unit="fraction", disable=not progress)
    for layer in layers:
        block = load_block(checkpoint, family, layer, device)
        if (block.config.hidden_size, mlp_width_of(block)) != (hidden, width):
            raise AllocationError(
                f"--checkpoint {checkpoint} (hidden {block.config.hidden_size}, MLP {mlp_width_of(block)}) does not "
                f"match the dump {reader.meta_path} (hidden {hidden}, MLP {width})")
        predictor, input_mode, rank = None, "same", None
        if method == "predicted":
            predictor, input_mode = layer_predictor(predictors, layer, predictor_dataset)
            predictor, rank = predictor.to(device).float(), predictor_rank(predictor)
        with torch.inference_mode():
            mlp_x = as_tensor(reader.mlp_x(layer)[chosen], device)
            h = MLP_INPUT[family](block, mlp_x)
            x = mlp_x if input_mode == "same" else as_tensor(reader.att_x(layer)[chosen], device)
            errors[layer] = layer_sensitivity(block, method, layer, h, x, grid, predictor, input_mode, entries,
                                              chunk_rows, residual=mlp_x if error == "block" else None)
        costs[layer] = layer_costs(method, hidden, width, family, grid, rank)
        bar.update(len(grid))
        del block, h, x, mlp_x
    bar.close()

    model = {"checkpoint": checkpoint, "model_type": config.get("model_type"), "hidden_size": hidden,
             "intermediate_size": width, "num_layers": config.get("num_hidden_layers")}
    source = {"dump": reader.path, "rows": int(len(chosen)), "grid": grid, "error": error, "predictors": predictors,
              "thresholds": thresholds_path}
    sensitivity = {layer: dict(zip(grid, values)) for layer, values in errors.items()}
    cost_table = {layer: dict(zip(grid, values)) for layer, values in costs.items()}
    written = []
    for target, (allocation, reached) in zip(targets, greedy_allocations(errors, costs, grid, targets, kind)):
        index = {layer: grid.index(allocation[layer]) for layer in layers}
        mean_keep = sum(allocation.values()) / len(allocation)
        bytes_relative = sum(costs[layer][index[layer]] for layer in layers) / len(layers)
        data = new_allocation(method, model, {"kind": kind, "value": target, "reached": reached}, source,
                              allocation, sensitivity, cost_table, mean_keep, bytes_relative)
        path = allocation_file(out, method, target, kind)
        write_json_atomic(path, data, indent=1)
        log.info("%s allocation for mean %s %g: mean kept %.4f, MLP bytes %.4f of dense -> %s", method,
                 "kept fraction" if kind == "keep" else "MLP bytes", target, mean_keep, bytes_relative, path)
        written.append((path, data))
    log.info("per-layer kept fractions (error relative to the %s on %d training rows):\n%s", ERRORS[error], len(chosen),
             summary_table(layers, grid, errors, targets, [data for _, data in written]))
    return written


def check_target(target, kind):
    value = float(target)
    if not math.isfinite(value) or value <= 0 or (kind == "keep" and value > 1):
        raise AllocationError(f"--target-keep {target!r}: a mean kept fraction in (0, 1]" if kind == "keep" else
                              f"--target-keep {target!r}: MLP bytes relative to dense, above 0")
    return value


def summary_table(layers, grid, errors, targets, allocations):
    """One line per layer: for each target its kept fraction and the error there."""
    header = ["layer"] + [f"keep@{target:g}  err" for target in targets]
    lines = ["  ".join(f"{cell:>16}" for cell in header)]
    for layer in layers:
        cells = [str(layer)]
        for data in allocations:
            keep = data["layers"][str(layer)]
            cells.append(f"{keep:5.3g}  {errors[layer][grid.index(keep)]:.2e}")
        lines.append("  ".join(f"{cell:>16}" for cell in cells))
    return "\n".join(lines)


# ---- the command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Per-layer MLP kept fractions (predicted, teal, cats) from each layer's sensitivity on an "
                    "activation dump of training text; writes allocation_{method}_{target}.json for the runner's "
                    "--mlp-keep-file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", default=os.environ.get("DATA_PATH"),
                   help="dump folder of the training passages (default: $DATA_PATH); never the validation text")
    p.add_argument("--checkpoint", required=True, help="the converted checkpoint folder the dump was collected from")
    p.add_argument("--method", required=True, choices=METHODS, help="the sparse mode the allocation is for")
    p.add_argument("--predictors", default=None,
                   help="the predictors' folder (predicted: c4_layer{L}.pt; teal, cats: where "
                        "thresholds_{method}.json is looked for); the default output folder")
    p.add_argument("--predictor-dataset", default="c4", help="the label the predictors were trained under")
    p.add_argument("--thresholds", default=None,
                   help="teal, cats: the calibrated thresholds file (default: --predictors/thresholds_{method}.json); "
                        "it must hold every fraction of --grid below 1")
    p.add_argument("--target", choices=TARGET_KINDS, default="keep",
                   help="what --target-keep is: the mean kept fraction over the layers, or the mean MLP bytes per "
                        "token relative to dense")
    p.add_argument("--target-keep", nargs="+", type=float, required=True, help="target value(s), one file each")
    p.add_argument("--grid", nargs="+", type=float, default=list(DEFAULT_GRID),
                   help="the kept fractions a layer can take (1.0 is always included)")
    p.add_argument("--L", default="all", help="layers: index, list (0,3,7), range (0-29) or 'all' (the dump's)")
    p.add_argument("--error", choices=tuple(ERRORS), default="block",
                   help="a layer's error relative to its block's output (the residual stream after the MLP; "
                        "default) or to its MLP output alone")
    p.add_argument("--max-rows", type=int, default=DEFAULT_MAX_ROWS,
                   help="measure on at most N rows (tokens) of the dump, spread evenly over it")
    p.add_argument("--out", default=None, help="output folder (default: --predictors, else the thresholds file's)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="cpu")
    p.add_argument("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, help="rows pushed through the MLP at once")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        device = resolve_device(args.device)
        allocate(args.data_path, args.checkpoint, args.method, args.target_keep, args.target, args.predictors,
                 args.thresholds, args.grid, args.L, args.max_rows, args.out, device, args.chunk_rows,
                 args.predictor_dataset, progress=not args.no_progress, error=args.error)
    except (AllocationError, CalibrationError, DumpError, ValueError, OSError) as error:
        log.error("%s", error)
        return 1
    return 0
