"""Command line shared by main_mlp.py, main_att.py, main_mlp_llama.py and main_att_llama.py.

The four entry points differ only in (kind, family): the kind picks MLP or attention, the family
picks the default label rule. Dimensions and layer counts always come from the dump's meta.json;
--model is a label for the results.

--L takes one layer (upstream), a list "0,3,7", a range "0-29", or "all" (every layer in
meta.json). Several layers run in one process; a layer that fails is logged, recorded in the
metrics file with status "failed", and the others still run. Exit status: 0 when every layer
trained, 1 when any failed or the dump cannot be opened, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from dejavu_common.helpers import DEVICE_CHOICES, keep_argument, parse_layers, repo_root, resolve_device

from .dump_reader import DumpError, DumpReader, format_layers
from .label_targets import GATE_TARGETS, LABEL_TARGETS, check_checkpoint
from .labels import LABEL_RULES
from .metrics import format_metrics
from .predictor import PREDICTOR_FORMS, metrics_path
from .trainer_att import AttentionTask
from .trainer_mlp import MLPTask
from .training import PredictorTask, RunSettings, TrainConfig, train_layer

log = logging.getLogger("sparse_predictor")

REPO_ROOT = repo_root()
TASKS = {"mlp": MLPTask, "att": AttentionTask}
# Labels only (stored with the results); shapes are read from meta.json.
MODEL_PRESETS = ("opt-125m", "opt-1.3b", "opt-6.7b", "opt-30b", "opt-66b", "opt-175b",
                 "llama-1b", "llama-3b", "llama-8b", "smollm2-135m")
SELECT_METRICS = ("recall", "recall_at_matched_k", "f1", "loss")
# CPU default: a few epochs keep all layers of a small model within minutes on 2 cores.
DEFAULT_EPOCHS = {"cuda": 20, "cpu": 10}
DEFAULT_LR = 1e-3
UPSTREAM_D = 1000


def build_parser(kind: str, family: str) -> argparse.ArgumentParser:
    task = TASKS[kind]()
    what = "MLP neurons" if kind == "mlp" else "attention heads"
    p = argparse.ArgumentParser(
        description=f"Train DejaVu sparse predictors for {what} ({family} family) from an activation dump.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"model label for the results (e.g. {', '.join(MODEL_PRESETS[:3])}, llama-3b, "
                        "smollm2-135m); default: meta.json's model")
    p.add_argument("--dataset", default="c4", help="dataset label; prefixes checkpoint names")
    p.add_argument("--L", default="0",
                   help="layer index, list (0,3,7), range (0-29) or 'all'")
    p.add_argument("--D", type=int, default=None,
                   help=f"low-rank width of the predictor (default min({UPSTREAM_D}, hidden_size): the "
                        "predictor's rank cannot exceed hidden_size, so a wider D only costs time)")
    p.add_argument("--predictor-form", choices=PREDICTOR_FORMS, default="lowrank",
                   help="lowrank: Linear(d, D) -> Linear(D, out) (upstream's); linear: Linear(d, out) (full rank, "
                        "--D unused); mlp: Linear(d, D) -> ReLU -> Linear(D, out)")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=None,
                   help=f"max epochs (default {DEFAULT_EPOCHS['cuda']} on cuda, {DEFAULT_EPOCHS['cpu']} on cpu)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--patience", type=int, default=5, help="early stop after this many epochs without better validation")
    p.add_argument("--k", type=keep_argument("--k", counts=False), default=None,
                   help=f"top-k fraction kept per token for --label topk (default {task.default_k})")
    p.add_argument("--label", choices=LABEL_RULES, default=None,
                   help=f"label rule (default {task.default_label(family)}); see labels.py")
    p.add_argument("--threshold", type=float, default=None, help="--label threshold: active when |y| > threshold")
    if kind == "mlp":
        p.add_argument("--label-target", choices=LABEL_TARGETS, default=None,
                       help="Llama MLP training target instead of --label: act-topk (top-k of |SiLU(gate)*up|), "
                            "gate-positive (gate > 0) or gate-topk (top-k of |SiLU(gate)|); the gate targets need "
                            "--checkpoint. Every target is also scored against act-topk (val_act_topk)")
        p.add_argument("--checkpoint", default=None,
                       help="converted checkpoint the dump was collected from (for the gate targets)")
    p.add_argument("--eval-data-path", default=None,
                   help="a second dump of the same model (other documents, e.g. the validation passages): the "
                        "trained predictor is also scored on its rows (metrics line key eval_dump)")
    p.add_argument("--eval-max-rows", type=int, default=None, help="use at most the first N rows of --eval-data-path")
    p.add_argument("--target-sparsity", type=float, default=0.9,
                   help="--label target-sparsity: fraction of training entries made inactive")
    p.add_argument("--input", dest="input_mode", choices=("same", "prev"),
                   default="prev" if kind == "att" else "same",
                   help=("same = att_x_l, prev = att_x_{l-1} (upstream's look-ahead; layer 0 falls back to same)"
                         if kind == "att" else "same = mlp_x_l, prev = att_x_l (before attention)"))
    p.add_argument("--select-metric", choices=SELECT_METRICS, default="recall",
                   help="validation metric for early stopping and keeping the best state")
    p.add_argument("--data-path", default=os.environ.get("DATA_PATH"),
                   help="dump folder (default: $DATA_PATH)")
    p.add_argument("--ckpt-dir", default=os.environ.get("CKPT_DIR"),
                   help="where checkpoints and the metrics file go "
                        "(default: $CKPT_DIR, else sparse_predictor/checkpoints/<dump folder name>)")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--max-rows", type=int, default=None, help="use at most this many valid rows")
    p.add_argument("--train-rows", type=int, default=None,
                   help="train on the first N training rows only; the validation rows stay the same "
                        "(to compare training-set sizes)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--run-id", default=os.environ.get("RUN_ID", ""),
                   help="tag stored with every metrics line (the run scripts summarize by it)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm epoch bars")
    p.add_argument("--list-layers", action="store_true",
                   help="print the layers --L selects (--L all: every layer in meta.json) and exit")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    return p


def resolve_data_path(path: str | None) -> str:
    if not path:
        raise ValueError("no dump folder: pass --data-path or set DATA_PATH")
    # relative paths: the caller's directory first, then the repository root
    if not os.path.exists(path) and not os.path.isabs(path) and os.path.exists(os.path.join(REPO_ROOT, path)):
        path = os.path.join(REPO_ROOT, path)
    return os.path.abspath(path)


def default_ckpt_dir(data_path: str) -> str:
    return os.path.join(REPO_ROOT, "sparse_predictor", "checkpoints", os.path.basename(data_path.rstrip("/")))


def append_jsonl(path: str, entry: dict) -> None:
    """One os.write per line on an O_APPEND file, so parallel writers never interleave lines."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = (json.dumps(entry, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
                        format="[sparse_predictor] %(levelname)s: %(message)s", stream=sys.stderr)


def run_layers(reader: DumpReader, task: PredictorTask, layers: list[int], settings: RunSettings) -> list[int]:
    """Train each layer; returns the layers that failed. Failures are logged and recorded."""
    out_file = metrics_path(settings.ckpt_dir, task.kind)
    failed = []
    for i, layer in enumerate(layers):
        log.info("%s layer %d (%d/%d): training", task.kind, layer, i + 1, len(layers))
        started = time.perf_counter()
        try:
            entry = train_layer(reader, task, layer, settings)
            log.info("%s layer %d: %s | rows %d/%d | epochs %d (best %d) | %.1fs", task.kind, layer,
                     format_metrics({k: float("nan") if v is None else v for k, v in entry["val"].items()}),
                     entry["rows_train"], entry["rows_val"], entry["epochs_run"], entry["best_epoch"],
                     entry["seconds"])
        except (DumpError, ValueError) as e:  # expected problems: the message says it all
            log.error("%s layer %d failed: %s", task.kind, layer, e)
            log.debug("%s layer %d traceback", task.kind, layer, exc_info=True)
            entry = failure_entry(task, layer, settings, e, started)
        except Exception as e:  # unexpected: keep the traceback, go on with the other layers
            log.exception("%s layer %d failed unexpectedly", task.kind, layer)
            entry = failure_entry(task, layer, settings, e, started)
        if entry["status"] != "ok":
            failed.append(layer)
        append_jsonl(out_file, entry)
    return failed


def failure_entry(task: PredictorTask, layer: int, settings: RunSettings, error: Exception, started: float) -> dict:
    return {"status": "failed", "kind": task.kind, "layer": layer, "model": settings.model,
            "dataset": settings.dataset, "input_mode": settings.input_mode,
            "error": f"{type(error).__name__}: {error}", "seed": settings.train.seed,
            "seconds": round(time.perf_counter() - started, 3), "run_id": settings.run_id}


def main(kind: str, family: str, argv: list[str] | None = None) -> int:
    args = build_parser(kind, family).parse_args(argv)
    setup_logging(args.log_level)
    if args.threads:
        torch.set_num_threads(args.threads)
    task = TASKS[kind]()
    try:
        reader = DumpReader(resolve_data_path(args.data_path))
        layers = parse_layers(args.L, reader.layers, "--L")
        if args.list_layers:
            print(" ".join(str(l) for l in layers))
            return 0
        device = resolve_device(args.device)
        settings = make_settings(args, task, family, reader, device)
    except (DumpError, ValueError) as e:
        log.error("%s", e)
        return 1
    if not reader.complete:
        log.warning("meta.json says the dump is not complete (a killed or running collection): "
                    "training on the rows it records")
    if reader.model_type != family:
        log.warning("dump model_type is %r but this entry point is for %r: using %r defaults "
                    "(label rule %s)", reader.model_type, family, family, settings.label)
    log.info("%s predictors for %s, layers %s, dump %s (%s rows), checkpoints -> %s", kind, settings.model,
             format_layers(layers), reader.path, reader.rows_for(reader.layers) if reader.layers else 0,
             settings.ckpt_dir)
    failed = run_layers(reader, task, layers, settings)
    if failed:
        log.error("%d of %d layers failed: %s", len(failed), len(layers), " ".join(map(str, failed)))
        return 1
    return 0


def make_settings(args: argparse.Namespace, task: PredictorTask, family: str, reader: DumpReader,
                  device: str) -> RunSettings:
    epochs = args.epochs if args.epochs is not None else DEFAULT_EPOCHS[device]
    D = args.D if args.D is not None else min(UPSTREAM_D, reader.hidden_size)
    for name, value in (("--D", D), ("--batch_size", args.batch_size), ("--epochs", epochs),
                        ("--patience", args.patience)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if args.max_rows is not None and args.max_rows < 2:
        raise ValueError(f"--max-rows must be at least 2, got {args.max_rows}")
    label = args.label or task.default_label(family)
    label_target = getattr(args, "label_target", None)
    label_checkpoint = getattr(args, "checkpoint", None)
    if label_target:
        if args.label:
            raise ValueError(f"--label {args.label} and --label-target {label_target}: give one of them")
        if label_target in GATE_TARGETS:
            label_checkpoint = check_checkpoint(label_checkpoint, reader.hidden_size, reader.intermediate_size,
                                                reader.meta_path)
        label = "topk"
    elif label_checkpoint:
        raise ValueError("--checkpoint is only used with --label-target gate-positive or gate-topk")
    eval_data_path = None
    if args.eval_data_path:
        eval_data_path = resolve_data_path(args.eval_data_path)
        other = DumpReader(eval_data_path)
        if (other.hidden_size, other.intermediate_size, other.num_heads) != (
                reader.hidden_size, reader.intermediate_size, reader.num_heads):
            raise ValueError(f"--eval-data-path {eval_data_path}: a dump of other widths (hidden {other.hidden_size}, "
                             f"MLP {other.intermediate_size}, heads {other.num_heads}) than --data-path "
                             f"{reader.path} ({reader.hidden_size}, {reader.intermediate_size}, {reader.num_heads})")
    if args.eval_max_rows is not None and args.eval_max_rows < 1:
        raise ValueError(f"--eval-max-rows must be at least 1, got {args.eval_max_rows}")
    settings = RunSettings(
        family=family, model=args.model or reader.model or os.path.basename(reader.path),
        dataset=args.dataset, ckpt_dir=os.path.abspath(args.ckpt_dir or default_ckpt_dir(reader.path)),
        input_mode=args.input_mode, label=label, k=args.k, threshold=args.threshold,
        target_sparsity=args.target_sparsity, val_fraction=args.val_fraction, max_rows=args.max_rows,
        train_rows=args.train_rows,
        select_metric=args.select_metric, run_id=args.run_id,
        label_target=label_target, label_checkpoint=label_checkpoint,
        eval_data_path=eval_data_path, eval_max_rows=args.eval_max_rows,
        train=TrainConfig(D=D, lr=args.lr, epochs=epochs, batch_size=args.batch_size,
                          weight_decay=args.weight_decay, patience=args.patience, seed=args.seed,
                          device=device, progress=not args.no_progress, form=args.predictor_form))
    task.label_rule(settings)  # validate the rule's parameters before any layer starts
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    return settings
