"""Shared training code for MLP and attention predictors: split, data loading, loss, loop.

One layer is trained as follows (trainer_mlp.py / trainer_att.py only say which taps and
label rule to use):

1. The first n valid rows (n from meta.json, capped by --max-rows) are split into training and
   validation rows by a seeded permutation: disjoint, deterministic, the same tokens for every
   layer. (Upstream's split read validation rows with X[-idx], so its validation row 0 was
   training row 0.)
2. Inputs are read once into memory as float32 (split by split); labels are computed chunk by
   chunk into a bool tensor, so the raw float16 labels are never held in memory whole. A target-sparsity
   threshold is calibrated on training rows only. Rows with a non-finite value are dropped and
   counted.
3. Loss: upstream's weighted BCE. Upstream weights positives by (1 - w) and negatives by w with
   w ~ positive rate, i.e. positives count #neg/#pos times as much; here that is
   BCEWithLogits(pos_weight = #neg / #pos) on the training labels, clamped to [1, 1000]: never
   below 1 (recall is the target, so positives are never down-weighted) and at most 1000 (a
   label with almost no positives must not blow up the gradient scale).
4. AdamW; after each epoch the validation metrics are computed, the state with the best
   validation recall is kept (strictly better only, so ties keep the earlier state), and
   training stops after `patience` epochs without improvement. Caveat: recall at threshold 0.5
   rewards over-prediction, so an early epoch that marks many units active can win; precision,
   classifier sparsity and recall_at_matched_k are recorded beside it, and
   --select-metric recall_at_matched_k selects on ranking quality instead (what a top-K sparse
   executor uses).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from . import metrics as M
from .dump_reader import DumpError, DumpReader
from . import label_targets
from .labels import MAX_CALIBRATION_ENTRIES, LabelRule
from .predictor import build_predictor, checkpoint_path, save_predictor

log = logging.getLogger("sparse_predictor")

POS_WEIGHT_MIN, POS_WEIGHT_MAX = 1.0, 1000.0
# Rows converted per step when reading memmaps: bounds the float32 temporaries.
READ_CHUNK_ROWS = 8192
EVAL_BATCH_ROWS = 4096
# Rows of the training split scored with the best state (over-fitting check only).
TRAIN_METRIC_ROWS = 4096
# Kept fractions of the recall-vs-K curve stored with the best state's validation metrics.
CURVE_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7)


@dataclass
class TrainConfig:
    D: int = 1000
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 256
    weight_decay: float = 0.01
    patience: int = 5
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    form: str = "lowrank"   # predictor.PREDICTOR_FORMS


@dataclass
class LayerData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    info: dict = field(default_factory=dict)
    y_val_reference: torch.Tensor | None = None   # the reference label of the validation rows, if asked


@dataclass
class TrainResult:
    model: torch.nn.Module
    val: dict
    train: dict
    pos_weight: float
    best_epoch: int
    epochs_run: int
    history: list


# ---- split ------------------------------------------------------------------------------------
def split_rows(n_rows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted (train, validation) row indices of range(n_rows), from a seeded permutation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if n_rows < 2:
        raise ValueError(f"need at least 2 rows to split into training and validation, got {n_rows}")
    n_val = min(n_rows - 1, max(1, int(round(n_rows * val_fraction))))
    perm = np.random.default_rng(seed).permutation(n_rows)
    # sorted so reads from the memmap stay sequential
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


# ---- data -------------------------------------------------------------------------------------
def read_rows_float32(source: np.ndarray, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 tensor of the given sorted rows of a float16 memmap, mask of rows without NaN/inf)."""
    out = np.empty((rows.size, source.shape[1]), dtype=np.float32)
    finite = np.empty(rows.size, dtype=bool)
    for start in range(0, rows.size, READ_CHUNK_ROWS):
        stop = min(rows.size, start + READ_CHUNK_ROWS)
        out[start:stop] = source[rows[start:stop]]
        finite[start:stop] = np.isfinite(out[start:stop]).all(axis=1)
    return torch.from_numpy(out), torch.from_numpy(finite)


def compute_labels(raw_labels: np.ndarray, rows: np.ndarray, rule: LabelRule) -> tuple[torch.Tensor, torch.Tensor]:
    """(bool labels of the given sorted rows, mask of rows without NaN/inf), chunk by chunk.

    The raw float16 labels are never held whole: only one chunk is converted at a time.
    """
    labels = torch.empty((rows.size, raw_labels.shape[1]), dtype=torch.bool)
    finite = torch.empty(rows.size, dtype=torch.bool)
    for start in range(0, rows.size, READ_CHUNK_ROWS):
        stop = min(rows.size, start + READ_CHUNK_ROWS)
        y = torch.from_numpy(np.asarray(raw_labels[rows[start:stop]], dtype=np.float32))
        finite[start:stop] = torch.isfinite(y).all(dim=1)
        labels[start:stop] = rule.apply(torch.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0))
    return labels, finite


def calibration_sample(raw_labels: np.ndarray, train_idx: np.ndarray, seed: int) -> np.ndarray:
    """Training rows of the raw labels, subsampled (seeded) to at most MAX_CALIBRATION_ENTRIES."""
    max_rows = max(1, MAX_CALIBRATION_ENTRIES // max(1, raw_labels.shape[1]))
    rows = train_idx
    if rows.size > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
    return np.asarray(raw_labels[rows], dtype=np.float32)


def load_layer_data(reader: DumpReader, input_tap: tuple[str, int], label_tap: tuple[str, int],
                    rule: LabelRule, val_fraction: float, seed: int,
                    max_rows: int | None = None, train_rows: int | None = None,
                    label_values=None, reference: tuple | None = None) -> LayerData:
    """Read one layer's inputs and labels, split them, and calibrate the label rule on training rows.

    train_rows keeps only the first (earliest) training rows after the split: the validation rows
    stay the same whatever train_rows is, and a smaller training set is a subset of a larger one
    (what a study of predictor quality against training-set size needs).
    label_values replaces the label tap's memmap by computed raw values (label_targets.GateValues);
    reference = (raw values, rule) also labels the validation rows by that rule (y_val_reference)."""
    (x_name, x_layer), (y_name, y_layer) = input_tap, label_tap
    x_src = reader.open(x_name, x_layer)
    y_src = reader.open(y_name, y_layer) if label_values is None else label_values
    available = reader.rows_for(sorted({x_layer, y_layer}))
    n_rows = available if max_rows is None else min(available, max_rows)
    if n_rows < 2:
        raise DumpError(
            f"dump {reader.path} has {available} valid rows for layers {sorted({x_layer, y_layer})} "
            f"(meta.json rows); at least 2 are needed")
    train_idx, val_idx = split_rows(n_rows, val_fraction, seed)
    if train_rows is not None:
        if train_rows < 1:
            raise ValueError(f"--train-rows must be at least 1, got {train_rows}")
        train_idx = train_idx[:train_rows]
    rule.calibrate(calibration_sample(y_src, train_idx, seed), seed)

    parts, dropped, y_reference = [], 0, None
    for split, rows in (("train", train_idx), ("val", val_idx)):
        x, x_ok = read_rows_float32(x_src, rows)
        y, y_ok = compute_labels(y_src, rows, rule)
        keep = x_ok & y_ok
        if reference is not None and split == "val":
            y_reference, ref_ok = compute_labels(reference[0], rows, reference[1])
            keep &= ref_ok
            y_reference = y_reference[keep]
        if not bool(keep.all()):
            dropped += int((~keep).sum())
            x, y = x[keep], y[keep]
        parts.append((x, y))
    if dropped:
        log.warning("layer %d: dropped %d of %d rows with non-finite values in %s_%d or %s_%d",
                    y_layer, dropped, n_rows, x_name, x_layer, y_name, y_layer)
    (x_train, y_train), (x_val, y_val) = parts
    if x_train.shape[0] == 0 or x_val.shape[0] == 0:
        raise DumpError(f"dump {reader.path}: no finite rows left in the training or validation split")
    info = {"rows_available": available, "rows_used": n_rows, "rows_dropped_nonfinite": dropped,
            "rows_train": int(x_train.shape[0]), "rows_val": int(x_val.shape[0])}
    return LayerData(x_train, y_train, x_val, y_val, info, y_reference)


def load_eval_rows(reader: DumpReader, input_tap: tuple[str, int], label_values, rule: LabelRule,
                   max_rows: int | None = None, reference: tuple | None = None) -> dict:
    """All valid rows (or the first max_rows) of another dump, labelled by an already calibrated rule:
    {"x", "y", "y_reference" (or None), "info"}. Rows with non-finite values are dropped and counted."""
    x_name, x_layer = input_tap
    available = reader.rows_for([x_layer])
    n_rows = available if max_rows is None else min(available, max_rows)
    if n_rows < 1:
        raise DumpError(f"evaluation dump {reader.path} has no valid rows for layer {x_layer} (meta.json rows)")
    rows = np.arange(n_rows)
    x, keep = read_rows_float32(reader.open(x_name, x_layer), rows)
    y, y_ok = compute_labels(label_values, rows, rule)
    keep &= y_ok
    y_reference = None
    if reference is not None:
        y_reference, ref_ok = compute_labels(reference[0], rows, reference[1])
        keep &= ref_ok
    dropped = int((~keep).sum())
    if dropped == n_rows:
        raise DumpError(f"evaluation dump {reader.path}: no finite rows for layer {x_layer}")
    return {"x": x[keep], "y": y[keep], "y_reference": None if y_reference is None else y_reference[keep],
            "info": {"data_path": reader.path, "rows_available": available, "rows_used": n_rows,
                     "rows_dropped_nonfinite": dropped, "rows": n_rows - dropped}}


# ---- loss and evaluation ------------------------------------------------------------------------
def positive_weight(labels: torch.Tensor) -> float:
    """#neg / #pos of the training labels, clamped to [POS_WEIGHT_MIN, POS_WEIGHT_MAX]."""
    pos = int(labels.sum().item())
    neg = labels.numel() - pos
    if pos == 0:
        return POS_WEIGHT_MAX
    return float(min(POS_WEIGHT_MAX, max(POS_WEIGHT_MIN, neg / pos)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pos_weight: float,
             device: str, max_rows: int | None = None, curve_fractions: tuple[float, ...] = ()) -> dict:
    """Metrics of `model` on (x, y), accumulated batch by batch (same numbers as all at once).

    With curve_fractions, also "recall_at_k": {fraction: recall of the top ceil(f * width)}.
    """
    model.eval()
    n = x.shape[0] if max_rows is None else min(x.shape[0], max_rows)
    sums = None
    for start in range(0, n, EVAL_BATCH_ROWS):
        stop = min(n, start + EVAL_BATCH_ROWS)
        logits = model(x[start:stop].to(device, non_blocking=True))
        sums = M.add_sums(sums, M.metric_sums(logits.float(), y[start:stop].to(device), pos_weight,
                                              curve_fractions))
    out = M.metrics_from_sums(sums)
    if curve_fractions:
        out["recall_at_k"] = M.recall_curve_from_sums(sums)
    return out


def _score(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def train_predictor(model: torch.nn.Module, data: LayerData, cfg: TrainConfig,
                    select_metric: str = "recall", desc: str = "") -> TrainResult:
    """Train with weighted BCE and AdamW; keep the epoch with the best validation `select_metric`."""
    device = cfg.device
    model.to(device)
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    x_val, y_val = data.x_val.to(device), data.y_val.to(device)
    pos_weight = positive_weight(data.y_train)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    n = x_train.shape[0]
    # lower is better for loss, higher for everything else
    sign = -1.0 if select_metric == "loss" else 1.0

    best_state, best_epoch, best_score = None, 0, -math.inf
    history, stale = [], 0
    # disable=None: bars only on a terminal, so logs of background runs stay readable
    bar = tqdm(range(cfg.epochs), desc=desc or "train", unit="epoch", leave=False,
               disable=None if cfg.progress else True)
    epoch = 0
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        epoch_loss = torch.zeros((), device=device)  # summed on the device: no sync per step
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            logits = model(x_train[idx])
            loss = loss_fn(logits, y_train[idx].float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach() * idx.numel()
        epoch_loss = epoch_loss.item() / n
        val = evaluate(model, x_val, y_val, pos_weight, device)
        history.append({"epoch": epoch + 1, "train_loss": epoch_loss,
                        **{k: M.to_json_number(v) for k, v in val.items()}})
        log.debug("%s epoch %d: train_loss=%.4f %s", desc, epoch + 1, epoch_loss, M.format_metrics(val))
        bar.set_postfix(recall=f"{val['recall']:.3f}", prec=f"{val['precision']:.3f}")
        score = sign * _score(val[select_metric])
        if best_state is None or score > best_score:
            best_state, best_epoch, best_score = copy.deepcopy(model.state_dict()), epoch + 1, score
            stale = 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    bar.close()
    if best_state is None:
        raise ValueError("epochs must be at least 1")
    model.load_state_dict(best_state)
    best_val = evaluate(model, x_val, y_val, pos_weight, device, curve_fractions=CURVE_FRACTIONS)
    train_metrics = evaluate(model, x_train, y_train, pos_weight, device, max_rows=TRAIN_METRIC_ROWS)
    return TrainResult(model=model.cpu().eval(), val=best_val, train=train_metrics, pos_weight=pos_weight,
                       best_epoch=best_epoch, epochs_run=epoch + 1, history=history)


def seed_everything(seed: int) -> None:
    """Same seed, same predictor init and batch order (per layer, independent of other layers)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


def json_metrics(values: dict) -> dict:
    """Metrics (and the nested recall_at_k curve) with NaN written as null."""
    return {k: json_metrics(v) if isinstance(v, dict) else M.to_json_number(v) for k, v in values.items()}


# ---- one layer, end to end ----------------------------------------------------------------------
@dataclass
class RunSettings:
    """Everything one layer's run needs besides the layer index (built by cli.py)."""
    family: str = "llama"             # "opt" or "llama": picks default label rules only
    model: str = ""                   # label for the results; dims always come from meta.json
    dataset: str = "c4"
    ckpt_dir: str = "."
    input_mode: str = "same"          # "same" or "prev"
    label: str | None = None          # a labels.LABEL_RULES name; None: the task's default
    k: float | None = None            # None: the task's default
    threshold: float | None = None
    target_sparsity: float | None = 0.9
    val_fraction: float = 0.1
    max_rows: int | None = None
    train_rows: int | None = None     # first training rows only (validation unchanged)
    select_metric: str = "recall"
    train: TrainConfig = field(default_factory=TrainConfig)
    run_id: str = ""
    label_target: str | None = None   # label_targets.LABEL_TARGETS (MLP only); None: the rule above
    label_checkpoint: str | None = None  # converted checkpoint for the gate targets
    eval_data_path: str | None = None    # a second dump (other documents) to score the predictor on
    eval_max_rows: int | None = None


class PredictorTask:
    """What differs between MLP and attention predictors; subclassed in trainer_mlp / trainer_att."""
    kind = ""            # "mlp" or "att"
    label_tap_name = ""  # dump file holding the raw labels
    default_k = 0.5

    def output_width(self, reader: DumpReader) -> int:
        return reader.width(self.label_tap_name)

    def input_tap(self, layer: int, mode: str) -> tuple[str, int]:
        raise NotImplementedError

    def effective_input_mode(self, layer: int, mode: str) -> str:
        """The mode actually used (differs only where a mode falls back, see trainer_att)."""
        return mode

    def default_label(self, family: str) -> str:
        return "topk"

    def label_rule(self, settings: RunSettings) -> LabelRule:
        """A fresh rule per layer (calibration stores that layer's threshold in it)."""
        k = self.default_k if settings.k is None else settings.k
        return LabelRule(name=settings.label or self.default_label(settings.family), k=k,
                         threshold=settings.threshold, target_sparsity=settings.target_sparsity)


def train_layer(reader: DumpReader, task: PredictorTask, layer: int, settings: RunSettings) -> dict:
    """Train, save and describe the predictor of one layer; returns the metrics-file line."""
    started = time.perf_counter()
    input_tap = task.input_tap(layer, settings.input_mode)
    label_tap = (task.label_tap_name, layer)
    k = task.default_k if settings.k is None else settings.k
    if settings.label_target:
        if task.kind != "mlp":
            raise ValueError(f"--label-target is for MLP predictors only, not {task.kind}")
        label_values, rule, label_source = label_targets.label_plan(
            reader, layer, settings.label_target, k, settings.label_checkpoint)
        reference = (reader.mlp_label(layer), label_targets.reference_rule(k))
    else:
        label_values, rule, label_source = None, task.label_rule(settings), f"{label_tap[0]}_{label_tap[1]}"
        reference = None
    data = load_layer_data(reader, input_tap, label_tap, rule, settings.val_fraction,
                           settings.train.seed, settings.max_rows, settings.train_rows,
                           label_values=label_values, reference=reference)
    d, out = reader.hidden_size, task.output_width(reader)
    cfg = settings.train
    D = None if cfg.form == "linear" else cfg.D
    seed_everything(cfg.seed)
    model = build_predictor(d, D, out, cfg.form)
    result = train_predictor(model, data, cfg, settings.select_metric,
                             desc=f"{task.kind} layer {layer}")
    extra = {}
    if reference is not None:
        extra["val_act_topk"] = json_metrics(evaluate(result.model.to(cfg.device), data.x_val, data.y_val_reference,
                                                      result.pos_weight, cfg.device, curve_fractions=CURVE_FRACTIONS))
    if settings.eval_data_path:
        extra["eval_dump"] = evaluate_other_dump(result, task, layer, settings, input_tap, rule, k, (d, out))
    result.model.cpu().eval()
    ckpt = checkpoint_path(settings.ckpt_dir, task.kind, layer, settings.dataset)
    save_predictor(ckpt, result.model)
    return {
        "status": "ok",
        "kind": task.kind,
        "layer": layer,
        "model": settings.model,
        "model_type": reader.model_type,
        "family": settings.family,
        "dataset": settings.dataset,
        "data_path": reader.path,
        # the mode the predictor was trained with, which the sparse executor must feed it
        "input_mode": task.effective_input_mode(layer, settings.input_mode),
        "input_mode_requested": settings.input_mode,
        "input_source": f"{input_tap[0]}_{input_tap[1]}",
        "label_source": label_source,
        "label_rule": rule.describe(),
        "label_target": settings.label_target,
        "label_checkpoint": settings.label_checkpoint,
        "predictor_form": cfg.form,
        "d": d, "D": D, "out": out,
        "lr": cfg.lr, "epochs": cfg.epochs, "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch, "batch_size": cfg.batch_size,
        "weight_decay": cfg.weight_decay, "patience": cfg.patience,
        "select_metric": settings.select_metric, "pos_weight": result.pos_weight,
        "seed": cfg.seed, "val_fraction": settings.val_fraction, "max_rows": settings.max_rows, "train_rows_requested": settings.train_rows,
        **data.info,
        "val": json_metrics(result.val),
        **extra,
        "train_subset": json_metrics(result.train),
        "history": result.history,
        "checkpoint": ckpt,
        "device": str(cfg.device),
        "seconds": round(time.perf_counter() - started, 3),
        "run_id": settings.run_id,
    }


def evaluate_other_dump(result: TrainResult, task: PredictorTask, layer: int, settings: RunSettings,
                        input_tap: tuple[str, int], rule: LabelRule, k: float, widths: tuple[int, int]) -> dict:
    """Metrics of the trained predictor on the rows of another dump (other documents), with the
    training run's label rule (its calibrated threshold, if any) and, for a label target, also
    against the reference label (top-k of |SiLU(gate) * up|)."""
    other = DumpReader(settings.eval_data_path)
    if (other.hidden_size, task.output_width(other)) != widths:
        raise DumpError(f"evaluation dump {other.meta_path} (--eval-data-path): hidden {other.hidden_size}, "
                        f"{task.label_tap_name} width {task.output_width(other)} do not match the training dump's "
                        f"{widths[0]}, {widths[1]}")
    reference = None
    if settings.label_target:
        label_values, rule, _ = label_targets.label_plan(other, layer, settings.label_target, k,
                                                         settings.label_checkpoint)
        reference = (other.mlp_label(layer), label_targets.reference_rule(k))
    else:
        label_values = other.open(task.label_tap_name, layer)
    rows = load_eval_rows(other, input_tap, label_values, rule, settings.eval_max_rows, reference)
    device = settings.train.device
    model = result.model.to(device)
    out = {**rows["info"], "split": "all rows of the evaluation dump (documents not in the training dump)",
           "metrics": json_metrics(evaluate(model, rows["x"], rows["y"], result.pos_weight, device,
                                            curve_fractions=CURVE_FRACTIONS))}
    if reference is not None:
        out["act_topk"] = json_metrics(evaluate(model, rows["x"], rows["y_reference"], result.pos_weight, device,
                                                curve_fractions=CURVE_FRACTIONS))
    return out
