"""Sparse execution (the *-ml-att-sparse model types): keep some MLP inputs/neurons and heads.

Per token and per sparse layer, what is kept is chosen by one of the modes of MODES:
  predicted: the trained predictors (top-K of their scores; with no K, the classifier's
             own decision, probability >= 0.5), MLP neurons and heads,
  oracle:    the layer's own activations (top-K |SiLU(gate)*up| or ReLU(fc1); top-K head norms),
  dense:     nothing dropped (every layer dense; a control run),
and three training-free baselines, MLP only (attention stays dense), selection maths in
training_free.py:
  teal:      calibrated magnitude thresholds on the MLP's input h and on the input of down (fc2),
  cats:      a calibrated threshold on |SiLU(gate(h))| (Llama only: OPT has no gate),
  wina:      per token the top-K inputs of h and of down by |x_i| * ||W[:, i]||_2.
"Does sparsity exist" (oracle) and "can it be predicted" (predicted) are so measured apart,
and the baselines show what selection without a trained predictor reaches.

A mode is one object of MODES (SparseMode): its MLP in torch ops, its set-up, its weight layout,
its byte cost and its layer call on the cpu backend. What a run is sparse in is one
SparseConfig (sparse_config.py), built at the command's edge. apply_sparse (configure_sparse
for keyword callers) puts two pieces into each block of a stage, without subclassing it: a
SparseMLP in place of block.mlp (the MLP of the layer's mode, on the dense MLP's own weights) and
a SparseTaps at block.taps (it keeps the predictors' inputs and zeroes the heads not kept). The
decode backends run these blocks as they are; the cpu backend (decode/cpu.py) asks the block's
SparseMLP how its mode runs in the C layer call (kernel_layer).

When every sequence feeds one token (decoding) predicted mode gathers the kept rows of gate/up
(fc1) and columns of down (fc2) and computes only those; everywhere else the dropped entries
are masked (set to zero). Both give the same numbers. Heads are always masked after attention.
The kept fractions a run reached and their cost in MLP bytes: --sparse-stats (sparse_stats.py).
"""

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from dejavu_common.allocation_format import AllocationError, allocation_layers, load_allocation, target_keep
from dejavu_common.helpers import KeepError, LayerSpecError, kept_count, parse_layers
from dejavu_common.thresholds_format import ThresholdsError, read_thresholds, thresholds_file

from . import sparse_config
from .common import DenseMLP
from .decode import cpu_training_free, cuda_sparse
from .decode.cpu import ATTENTION_HALF_THEN_MLP
from .decode.plan import active_plan
from .decode.sparse_gather import (gathered_mlp, gathered_mlp_torch, is_packed, pack_mlp_neurons, predicted_gathered_mlp,
                                   round_predictor, unpack_mlp)
from .sparse_config import PREDICTOR_DTYPES, SparseConfig, SparseConfigError  # noqa: F401 (PREDICTOR_DTYPES: re-exported)
from .sparse_stats import SparseStats, StatsWriter, stats_path
from .training_free import apply_mask, column_norms, magnitude_mask, top_k_mask, wina_mask

logger = logging.getLogger(__name__)

class SparseSetupError(RuntimeError):
    pass


def count_or_none(keep, width):
    """K for a kept fraction or count (dejavu_common.helpers.kept_count); None keeps no fixed K."""
    return None if keep is None else kept_count(keep, width)


class SparseTaps:
    """block.taps under sparse execution (configure_sparse): at att_x and mlp_x it keeps the step's
    inputs the predictors read (att_x also as the next layer's look-ahead input), at head_out it
    zeroes the heads not kept. Plain attributes: written per layer per token."""

    def __init__(self, block, previous, stats):
        self.layer_index = block.layer_index
        self.num_heads = block.config.num_attention_heads
        self.previous = previous  # the previous block's SparseTaps (look-ahead input), or None
        self.stats = stats  # the SparseStats that counts what is kept (--sparse-stats), or None
        self.mode = "dense"
        self.att_keep = None
        self.att_predictor = None
        self.att_input = "same"
        self.use_gather = True  # predicted heads: a decoding step on CUDA reads the kept heads only
        self.inputs, self.token_mask, self.last_att_x = {}, None, None

    def __call__(self, name, value, token_mask):
        if name == "att_x":
            self.begin(value, token_mask)
        elif name == "mlp_x":
            self.inputs["mlp_x"] = value
        elif name == "head_out" and self.sparse_heads:
            keep = self.head_mask(value)
            self.record({"heads": keep}, token_mask, value.shape[:2])
            return value * keep[..., None].to(value.dtype)
        return value

    def begin(self, x, token_mask):
        """A step starts: x is the layer's input (att_x), token_mask its real tokens (None: all)."""
        self.inputs = {"att_x": x}
        self.token_mask, self.last_att_x = token_mask, x

    @property
    def sparse_heads(self):
        if self.mode == "oracle":
            return self.att_keep is not None
        return self.mode == "predicted" and self.att_predictor is not None

    def head_mask(self, heads):
        """[B, S, H] boolean: heads kept per token."""
        if self.mode == "oracle":
            return top_k_mask(heads.float().norm(dim=-1), count_or_none(self.att_keep, self.num_heads))
        return self.predicted_head_mask()

    def predicted_head_mask(self):
        """[B, S, H] boolean: the attention predictor's top K (or positives) per token."""
        x = self.inputs["att_x"] if self.att_input == "same" else self.previous.last_att_x
        return select(self.att_predictor, x, self.att_keep, self.num_heads)

    def attention_step(self, block, h, layer_past, mask, token_mask):
        """The block's attention through the running plan's kernel for the mode's heads
        (SparseMode.head_kernels): (output, present), or None (then the block's own attention
        runs and head_out masks)."""
        plan = active_plan()
        kernel = None if plan is None or not self.sparse_heads else MODES[self.mode].head_kernels.get(plan.name)
        return None if kernel is None else kernel(plan, self, block, h, layer_past, mask, token_mask)

    def record(self, kept, token_mask, token_shape):
        """Count what one call kept (--sparse-stats); nothing when no stats are collected."""
        if self.stats is not None:
            self.stats.add(self.layer_index, kept, token_mask, token_shape)

    def configuration(self):
        """What a captured CUDA graph bakes in of the heads (decode/stages.py)."""
        return self.mode, self.att_keep, id(self.att_predictor), self.use_gather


class SparseMLP(nn.Module):
    """block.mlp under sparse execution: the MLP of the layer's mode (MODES) on the dense MLP's
    weights. Its submodules are the dense MLP's own (the same modules, under the same names), so
    the block's state dict and weights stay what they were, and a weight changed through either
    is changed for both. It runs the running plan's kernel for its mode (SparseMode.kernels),
    else the mode's torch ops."""

    def __init__(self, dense, taps):
        super().__init__()
        for name, child in dense.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "dense", dense)  # not a submodule: its children are already ours
        self.taps, self.layer_index = taps, taps.layer_index
        self.width = dense.neuron_linears()[0].out_features  # I: intermediate_size / ffn_dim
        self.mode = "dense"  # the MODES entry this MLP runs
        self.keep = None  # --mlp-keep: a kept fraction or count (None: no fixed K)
        self.predictor, self.input_mode = None, "same"  # predicted: the predictor and what it reads
        self.predictor_rounded = None  # the dtype its weights were rounded to (--predictor-dtype float16/bfloat16)
        self.use_gather = True  # predicted: gather the kept neurons when decoding (else mask)
        self.thresholds = None  # teal: {"t_in", "t_down"}; cats: {"t_gate"}
        self.wina_norms = self.wina_counts = None  # wina: column norms and K of h and of down's input

    def activation(self, h):
        return self.dense.activation(h)

    def output(self, act):
        return self.dense.output(act)

    def neuron_linears(self):
        return self.dense.neuron_linears()

    def __setattr__(self, name, value):
        if name == "predictor":  # a plain attribute: no weight of the block, and the submodules are shared
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def kept(self):
        """K: the neurons kept per token (None: no fixed K)."""
        return count_or_none(self.keep, self.width)

    def predictor_input(self):
        """What the MLP predictor reads: the MLP's residual input (same) or the layer's (prev)."""
        return self.taps.inputs["mlp_x" if self.input_mode == "same" else "att_x"]

    def configuration(self):
        """What a captured CUDA graph bakes in of the MLP (decode/stages.py)."""
        return self.mode, self.keep, id(self.predictor), self.use_gather

    def kernel_layer(self, plan, family, view_of):
        """How the cpu backend's layer call runs this MLP (SparseMode.kernel_layer)."""
        return MODES[self.mode].kernel_layer(plan, self, family, view_of)

    def forward(self, h):
        mode, plan = MODES[self.mode], active_plan()
        kernel = None if plan is None else mode.kernels.get(plan.name)
        found = None if kernel is None else kernel(plan, self, h)
        output, kept = mode.mlp(self, h) if found is None else found
        self.taps.record(kept, self.taps.token_mask, h.shape[:-1])
        return output


def predictor_scores(predictor, x):
    """The predictor's float32 scores of x (its logits per unit)."""
    return predictor(x.to(next(predictor.parameters()).dtype)).float()


def predicted_neurons(mlp, k):
    """[B, K]: the MLP predictor's top K per row of a decoding step, in weight order."""
    scores = predictor_scores(mlp.predictor, mlp.predictor_input())[:, 0]
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def select(predictor, x, keep, width):
    """Boolean [..., width]: the top K of the predictor's scores, or its positives without K."""
    scores = predictor_scores(predictor, x)
    k = count_or_none(keep, width)
    return (scores > 0) if k is None else top_k_mask(scores, k)


# ---- the modes ---------------------------------------------------------------------------------------------
# A mode is one object: its MLP in torch ops (the reference every kernel is tested against), its set-up,
# the weight layout its kernels read, its cost in MLP weights read per token (sparse_cost.py), and how
# the cpu backend's layer call runs it (kernel_layer). Adding a mode is adding one class to MODES.
class SparseMode:
    name = None
    mlp_only = False  # a training-free baseline: attention dense, mlp_keep a fraction, required
    calibrated = False  # reads a thresholds file (sparse_predictor/calibrate.py)
    realisable = True  # False: it chooses from what it would save computing (a bound, not a method)
    layout = None  # how its set-up lays the MLP out for its kernels (lay_out); None: the checkpoint's rows
    kept_inputs = ()  # what its kept fractions are of (the keys of the stats file's "kept")
    kernels = {}  # backend name -> kernel(plan, mlp, h) -> (output, kept), or None where it does not apply
    head_kernels = {}  # backend name -> kernel(plan, taps, block, h, layer_past, mask, token_mask) -> (output,
    #                    present) or None: the heads' attention step

    def mlp(self, mlp, h):
        """(output, {input: kept mask | fraction | None (all)}) of the layer's SparseMLP on h."""
        raise NotImplementedError

    def setup(self, blocks, options):
        """Once per stage, for the blocks whose MLP or heads run this mode."""

    def weight_count(self, d, inner, matrices, kept):
        """MLP weights of d x I read per token ({input: kept fraction}; matrices: Llama 3, OPT 2)."""
        raise NotImplementedError

    def decodes_in_kernels(self):
        """Whether some backend runs this MLP through kernels of its own (else masks in torch ops)."""
        return bool(self.kernels) or type(self).kernel_layer is not SparseMode.kernel_layer

    def kernel_layer(self, plan, mlp, family, view_of):
        """How the cpu backend's decoder-layer call runs this MLP (decode/cpu.py): (run(lib, view, step,
        scale) -> status, kept() -> what --sparse-stats counts) for the whole layer in one call,
        ATTENTION_HALF_THEN_MLP for the attention half in one call and this MLP after it, or None
        for the block's forward. view_of() builds the layer's kernel view (None: the kernels
        cannot read its weights)."""
        return None


def _neurons(d, inner, matrices, kept):
    return matrices * d * kept["neurons"] * inner


def _input_columns(d, inner, matrices, kept):
    return (matrices - 1) * inner * kept["in"] * d + d * kept["down"] * inner


class DenseMode(SparseMode):
    name = "dense"

    def mlp(self, mlp, h):
        return mlp.output(mlp.activation(h)), {"neurons": None}

    def weight_count(self, d, inner, matrices, kept):
        return matrices * d * inner

    def kernel_layer(self, plan, mlp, family, view_of):
        view = view_of()
        if view is None or not view.has_mlp:
            return None
        return (lambda lib, view, step, scale: family.layer(lib, view, step, scale)), (lambda: {"neurons": None})


class OracleMode(SparseMode):
    """The top K of the layer's own activation: the bound a selector chases (it needs the dense
    activation, so it saves no bytes when run)."""

    name, kept_inputs, realisable = "oracle", ("neurons",), False

    def mlp(self, mlp, h):
        act = mlp.activation(h)
        keep = top_k_mask(act.float().abs(), mlp.kept)
        return mlp.output(act * keep.to(act.dtype)), {"neurons": keep}

    def weight_count(self, d, inner, matrices, kept):
        return _neurons(d, inner, matrices, kept)


class PredictedMode(SparseMode):
    """DejaVu: the predictor's top K of its scores (no K: its positives); decoding gathers the
    kept rows of gate/up (fc1) and columns of down (fc2), elsewhere the rest is masked."""

    name, layout, kept_inputs = "predicted", "neurons", ("neurons",)

    def mlp(self, mlp, h):
        width, k = mlp.width, mlp.kept
        if mlp.use_gather and h.shape[1] == 1 and k is not None:
            neurons = predicted_neurons(mlp, k)
            return gathered_mlp_torch(h, neurons, *mlp.neuron_linears()), {"neurons": k / width}
        keep = select(mlp.predictor, mlp.predictor_input(), mlp.keep, width)
        act = mlp.activation(h)
        return mlp.output(act * keep.to(act.dtype)), {"neurons": keep}

    def setup(self, blocks, options):
        setup_predicted(blocks, options)

    def weight_count(self, d, inner, matrices, kept):
        return _neurons(d, inner, matrices, kept)

    @staticmethod
    def cpu_mlp(plan, mlp, h):
        """Decoding: predictor, top-k and the gathered MLP in one C call per row (or the top-k
        in torch and the gathered MLP in C)."""
        k = mlp.kept
        if not (mlp.use_gather and h.shape[1] == 1 and k is not None):
            return None
        first, second, output, act_fn = mlp.neuron_linears()
        out = predicted_gathered_mlp(plan, h, mlp.predictor_input(), mlp.predictor, k, first, second, output, act_fn,
                                     mlp.predictor_rounded)
        if out is None:
            out = gathered_mlp(plan, h, predicted_neurons(mlp, k), first, second, output, act_fn)
        return out, {"neurons": k / mlp.width}

    @staticmethod
    def cuda_mlp(plan, mlp, h):
        """Decoding on CUDA: the Triton kernels (decode/cuda_sparse.py)."""
        k = mlp.kept
        if not (mlp.use_gather and h.shape[1] == 1 and k is not None):
            return None
        out = cuda_sparse.predicted_mlp(h, mlp.predictor_input(), mlp.predictor, k, *mlp.neuron_linears(),
                                        predictor_scores)
        return None if out is None else (out, {"neurons": k / mlp.width})

    @staticmethod
    def cuda_heads(plan, taps, block, h, layer_past, mask, token_mask):
        """A decoding step's attention reading only the kept heads' q rows and o columns
        (decode/cuda_sparse.py), at a fixed K; what it keeps is recorded as head_out records it."""
        if taps.att_keep is None or not taps.use_gather or not cuda_sparse.heads_usable(block, h):
            return None
        keep = taps.predicted_head_mask()  # [B, 1, H]
        taps.record({"heads": keep}, token_mask, h.shape[:2])
        return cuda_sparse.sparse_heads_attention(block, h, layer_past, mask, keep,
                                                  kept_count(taps.att_keep, taps.num_heads))

    def kernel_layer(self, plan, mlp, family, view_of):
        k = mlp.kept
        if not mlp.use_gather or k is None:
            return None  # the classifier's positives, or --no-gather: the masked MLP in torch ops
        view = view_of()
        if view is None:
            return None
        predicted = view.predicted
        if predicted is None:
            return ATTENTION_HALF_THEN_MLP
        if not 1 <= k <= predicted.rows:
            raise ValueError(f"layer {mlp.layer_index}: cannot keep {k} of {predicted.rows} MLP neurons")
        from_input, width = mlp.input_mode != "same", mlp.width
        return ((lambda lib, view, step, scale: family.predicted_layer(lib, view, step, scale, k, from_input)),
                (lambda: {"neurons": k / width}))


class TealMode(SparseMode):
    """TEAL: entries of h at or below t_in are zeroed before gate and up (fc1), entries of the
    activation at or below t_down before down (fc2). One float32 CPU token in the C kernel, which
    reads only the kept columns (decode/cpu_training_free.py); elsewhere masked in torch ops."""

    name, mlp_only, calibrated, layout, kept_inputs = "teal", True, True, "teal", ("in", "down")

    def mlp(self, mlp, h):
        thresholds = mlp.thresholds
        keep_in = magnitude_mask(h, thresholds["t_in"])
        act = mlp.activation(apply_mask(h, keep_in))
        keep_down = magnitude_mask(act, thresholds["t_down"])
        return mlp.output(apply_mask(act, keep_down)), {"in": keep_in, "down": keep_down}

    def setup(self, blocks, options):
        setup_thresholds(blocks, options)

    def weight_count(self, d, inner, matrices, kept):
        return _input_columns(d, inner, matrices, kept)

    @staticmethod
    def cpu_mlp(plan, mlp, h):
        """One token through the C kernel, which reads only the kept columns."""
        if not (mlp.use_gather and h.shape[:2] == (1, 1)):
            return None
        thresholds = mlp.thresholds
        found = cpu_training_free.teal_mlp(plan, h, *mlp.neuron_linears(), thresholds["t_in"], thresholds["t_down"])
        if found is None:
            return None
        out, kept_in, kept_down = found
        return out, {"in": kept_in / h.shape[-1], "down": kept_down / mlp.width}

    def kernel_layer(self, plan, mlp, family, view_of):
        if not mlp.use_gather or view_of() is None:
            return None
        linears = mlp.neuron_linears()
        weights = cpu_training_free.teal_weights(plan, *linears) if family.teal_layer is not None else None
        if weights is None:
            return ATTENTION_HALF_THEN_MLP
        t_in, t_down = (cpu_training_free.threshold(mlp.thresholds[name]) for name in ("t_in", "t_down"))
        counts, d, width = torch.zeros(2, dtype=torch.int64), linears[0].in_features, mlp.width
        return ((lambda lib, view, step, scale: family.teal_layer(lib, view, step, scale, weights, t_in, t_down,
                                                                  counts)),
                (lambda: {"in": int(counts[0]) / d, "down": int(counts[1]) / width}))


class CatsMode(SparseMode):
    """CATS: SiLU(gate(h)) computed densely; neurons whose |SiLU(gate)| is at or below t_gate are
    dropped. One float32 CPU token in the C kernel, which reads the kept neurons' up and down only
    (decode/cpu_training_free.py); elsewhere masked in torch ops. Llama only (OPT has no gate)."""

    name, mlp_only, calibrated, layout, kept_inputs = "cats", True, True, "neurons", ("neurons",)

    def mlp(self, mlp, h):
        gate, up, _, act_fn = mlp.neuron_linears()
        gated = act_fn(gate(h))
        keep = magnitude_mask(gated, mlp.thresholds["t_gate"])
        return mlp.output(apply_mask(gated * up(h), keep)), {"neurons": keep}

    def setup(self, blocks, options):
        for mlp in sparse_mlps(blocks):
            if mlp.neuron_linears()[1] is None:
                raise SparseSetupError(
                    f"sparse mode cats needs a gated MLP (Llama's gate and up); layer {mlp.layer_index} of this "
                    "model has fc1/activation/fc2 (OPT) and no gate to threshold: use teal or wina")
        setup_thresholds(blocks, options)

    def weight_count(self, d, inner, matrices, kept):
        return d * inner + 2 * d * kept["neurons"] * inner  # gate whole, then up and down of the kept

    @staticmethod
    def cpu_mlp(plan, mlp, h):
        """One token through the C kernel, which reads the kept neurons' up and down only."""
        if not (mlp.use_gather and h.shape[:2] == (1, 1)):
            return None
        found = cpu_training_free.cats_mlp(plan, h, *mlp.neuron_linears(), mlp.thresholds["t_gate"])
        return None if found is None else (found[0], {"neurons": found[1] / mlp.width})

    def kernel_layer(self, plan, mlp, family, view_of):
        if not mlp.use_gather or view_of() is None:
            return None
        weights = cpu_training_free.cats_weights(plan, *mlp.neuron_linears()) if family.cats_layer is not None else None
        if weights is None:
            return ATTENTION_HALF_THEN_MLP
        t_gate, counts, width = cpu_training_free.threshold(mlp.thresholds["t_gate"]), torch.zeros(1, dtype=torch.int64), mlp.width
        return ((lambda lib, view, step, scale: family.cats_layer(lib, view, step, scale, weights, t_gate, counts)),
                (lambda: {"neurons": int(counts[0]) / width}))


class WinaMode(SparseMode):
    """WINA: per token the top-K entries of h by |h_i| * ||[gate; up][:, i]|| (OPT: fc1), and of the
    activation by |act_j| * ||down[:, j]|| (fc2), K = kept_count(mlp_keep, width). Masks only."""

    name, mlp_only, kept_inputs = "wina", True, ("in", "down")

    def mlp(self, mlp, h):
        (in_norms, down_norms), (k_in, k_down) = mlp.wina_norms, mlp.wina_counts
        keep_in = wina_mask(h, in_norms, k_in)
        act = mlp.activation(apply_mask(h, keep_in))
        keep_down = wina_mask(act, down_norms, k_down)
        return mlp.output(apply_mask(act, keep_down)), {"in": keep_in, "down": keep_down}

    def setup(self, blocks, options):
        """The column norms each input is scored against, and K per input (no file needed)."""
        for mlp in sparse_mlps(blocks):
            first, second, output, _ = mlp.neuron_linears()
            readers = [first.weight] if second is None else [first.weight, second.weight]
            mlp.wina_norms = (column_norms(*readers), column_norms(output.weight))
            mlp.wina_counts = (kept_count(mlp.keep, first.in_features, "--mlp-keep"),
                               kept_count(mlp.keep, mlp.width, "--mlp-keep"))

    def weight_count(self, d, inner, matrices, kept):
        return _input_columns(d, inner, matrices, kept)


PredictedMode.kernels = {"cpu": PredictedMode.cpu_mlp, "cuda": PredictedMode.cuda_mlp}
PredictedMode.head_kernels = {"cuda": PredictedMode.cuda_heads}
TealMode.kernels = {"cpu": TealMode.cpu_mlp}
CatsMode.kernels = {"cpu": CatsMode.cpu_mlp}
MODES = {mode.name: mode for mode in (PredictedMode(), OracleMode(), DenseMode(), TealMode(), CatsMode(), WinaMode())}
SPARSE_MODES = tuple(MODES)
TRAINING_FREE_MODES = tuple(name for name, mode in MODES.items() if mode.mlp_only)


# ---- set-up, once per stage -----------------------------------------------------------------------
def lay_out(mlp, layout):
    """Lay the MLP's weights out as the decoding kernels of a mode read them (same values, shapes
    and state-dict keys; nothing to do where they already lie so, read from their strides):
      None     each weight row-major as the checkpoint has it (the dense layer kernel's);
      neurons  a kept neuron's gate, up and down weights as one run of memory (CPU:
               pack_mlp_neurons; predicted, cats), or its down column as one row (CUDA);
      teal     gate and up by input column, down by neuron (cpu_training_free.lay_out_teal)."""
    first, second, output, _ = mlp.neuron_linears()
    if layout is None:
        unpack_mlp(first, second, output)
    elif layout == "teal":
        cpu_training_free.lay_out_teal(first, second, output)
    elif not is_packed(first, second, output):
        pack_mlp_neurons(first, second, output) or cuda_sparse.lay_out_for_gather(output)


def sparse_mlps(blocks):
    return [block.mlp for block in blocks if block.mlp.mode != "dense"]


def setup_predicted(blocks, options):
    """Attach each layer's predictors (from options.predictors, else the sparse_path files)."""
    predictors, config = options.predictors, options.config
    for block in blocks:
        mlp, taps = block.mlp, block.taps
        for kind, enabled in (("mlp", config.sparse_mlp), ("att", config.sparse_attention)):
            if not enabled:
                continue
            key = (kind, block.layer_index)
            if key not in predictors:
                if not config.sparse_path:
                    raise SparseSetupError("predicted mode needs --sparse-path (or $SPRARSE_PATH)")
                predictors[key] = load_predictors(config.sparse_path, kind, block.layer_index,
                                                   config.predictor_dataset)
            module, input_mode = predictors[key]
            module = module.to(next(block.parameters()).device)
            rounded = None if config.predictor_dtype == "float32" else getattr(torch, config.predictor_dtype)
            if rounded is not None and not round_predictor(module, rounded):
                raise SparseSetupError(f"layer {block.layer_index}: the {kind} predictor has a weight outside "
                                       f"{config.predictor_dtype}'s range; use --predictor-dtype bfloat16 or float32")
            if kind == "mlp":
                mlp.predictor, mlp.input_mode, mlp.predictor_rounded = module, input_mode, rounded
                if config.use_gather:
                    lay_out(mlp, "neurons")
                continue
            if input_mode == "prev" and taps.previous is None:
                raise SparseSetupError(
                    f"layer {block.layer_index}: its attention predictor reads the previous layer's "
                    "input, which is not on this stage; train it with --input same or move the stage split"
                )
            taps.att_predictor, taps.att_input = module, input_mode
            if config.use_gather:
                cuda_sparse.lay_out_o_proj(block)  # CUDA only: o_proj (OPT: out_proj) transposed, for kept heads
        if mlp.predictor is None:
            mlp.mode = "dense"


KEEP_ALL = {"t_in": None, "t_down": None, "t_gate": None}  # no threshold: every entry kept, nothing masked


def thresholds_path(mode, thresholds, sparse_path):
    """The thresholds file a teal / cats run reads: --thresholds, else --sparse-path/thresholds_{mode}.json."""
    if thresholds:
        return os.fspath(thresholds)
    return thresholds_file(sparse_path, mode) if sparse_path else None


def setup_thresholds(blocks, options):
    """teal / cats: each layer's calibrated thresholds for exactly its kept fraction. A kept
    fraction of 1.0 needs no file: no threshold, the dense MLP's numbers."""
    config, mlps = options.config, sparse_mlps(blocks)
    mode = config.mode
    thresholds = {}
    by_keep = {}
    for mlp in mlps:
        by_keep.setdefault(float(mlp.keep), []).append(mlp)
    for keep, group in by_keep.items():
        layers = [mlp.layer_index for mlp in group]
        if keep >= 1.0:
            thresholds.update({layer: None for layer in layers})
        elif options.thresholds is not None:  # given in-process, e.g. by tests
            thresholds.update(options.thresholds)
        else:
            path = thresholds_path(mode, config.thresholds, config.sparse_path)
            if path is None:
                raise SparseSetupError(f"sparse mode {mode} needs calibrated thresholds: --thresholds FILE, or "
                                       f"--sparse-path DIR holding thresholds_{mode}.json (sparse_predictor/calibrate.py)")
            try:
                thresholds.update(read_thresholds(path, mode, keep, layers, blocks[0].config.hidden_size,
                                                  group[0].width))
            except ThresholdsError as error:
                raise SparseSetupError(str(error)) from None
    for mlp in mlps:
        if mlp.layer_index not in thresholds:
            raise SparseSetupError(f"sparse mode {mode}: no thresholds for layer {mlp.layer_index}")
        mlp.thresholds = {**KEEP_ALL, **(thresholds[mlp.layer_index] or {})}
        if config.use_gather:
            lay_out(mlp, MODES[mode].layout)


def add_arguments(parser):
    """The runner's flags (sparse_config.add_arguments); settings_from_args makes them a SparseConfig."""
    sparse_config.add_arguments(parser, SPARSE_MODES)


def settings_from_args(args, environ):
    """The run's SparseConfig from its flags and upstream's environment names (the runner's edge)."""
    try:
        return known_mode(sparse_config.from_args(args, environ), "--sparse-mode ($SPARSE_MODE)")
    except SparseConfigError as error:
        raise SparseSetupError(str(error)) from None


def settings_from_values(values):
    """The SparseConfig of the lm-eval adapter's model_args."""
    try:
        return known_mode(sparse_config.from_values(values), "model_args: sparse_mode")
    except SparseConfigError as error:
        raise SparseSetupError(str(error)) from None


def known_mode(config, flag):
    if config.mode not in MODES:
        raise SparseSetupError(f"{flag} {config.mode!r}: known modes are {', '.join(SPARSE_MODES)}")
    return config


def load_predictors(folder, kind, layer, dataset="c4"):
    """(predictor, input mode) for one layer, from the predictor package's files: the names it
    writes (sparse_predictor.predictor.checkpoint_name) under the label it was trained with."""
    from sparse_predictor.predictor import checkpoint_name, load_predictor, load_predictor_info

    path = os.path.join(folder, checkpoint_name(kind, layer, dataset))
    if not os.path.isfile(path):
        raise SparseSetupError(f"predictor file not found: {path}{other_labels(folder, kind, layer)}")
    info = load_predictor_info(folder, kind, layer)
    if info is None:  # e.g. upstream's checkpoints, which carry no metrics file
        logger.warning("%s: no metrics line records its input mode; assuming 'same'", path)
        info = {}
    return load_predictor(path), info.get("input_mode", "same")


def other_labels(folder, kind, layer):
    """A hint naming the labels the folder does hold this layer's predictor under ('' if none)."""
    from sparse_predictor.predictor import checkpoint_name

    suffix = checkpoint_name(kind, layer, "")  # "_layer{L}.pt" / "_att_layer{L}.pt"
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return ""
    labels = [name[:-len(suffix)] for name in names if name.endswith(suffix) and len(name) > len(suffix)]
    if kind == "mlp":  # "{label}_att_layer{L}.pt" ends with "_layer{L}.pt" too
        labels = [label for label in labels if not label.endswith("_att")]
    if not labels:
        return ""
    return f" (the folder has it under {', '.join(repr(label) for label in labels)}: pass --predictor-dataset)"


@dataclass
class SetupOptions:
    config: SparseConfig
    predictors: dict  # {(kind, layer): (module, input mode)} given in-process, else read from sparse_path
    thresholds: Optional[dict] = None  # {layer: thresholds} given in-process, else read from files


def check_mode_flags(config, keeps):
    """What the training-free modes refuse: heads, a count, no kept fraction (keeps: the sparse
    layers' MLP kept values)."""
    mode = config.mode
    if not MODES[mode].mlp_only:
        return
    if config.att_keep is not None:
        raise SparseSetupError(f"--att-keep ($ATTN_TOPK_1): sparse mode {mode} is MLP-only (attention stays dense); "
                               "drop --att-keep")
    if not config.sparse_mlp:
        return
    for keep in keeps:
        if keep is None:
            raise SparseSetupError(f"sparse mode {mode} needs --mlp-keep ($TOPK): the kept fraction to reach")
        if float(keep) > 1:
            raise SparseSetupError(f"--mlp-keep {keep:g}: sparse mode {mode} takes a kept fraction in (0, 1], "
                                   "not a count (it masks inputs of different widths)")


def configure_sparse(blocks, mode, sparse_path=None, mlp_keep=None, att_keep=None, layers=None,
                     sparse_mlp=True, sparse_attention=True, use_gather=True, predictors=None,
                     predictor_dtype="float32", thresholds=None, stats=None, predictor_dataset="c4",
                     layer_mlp_keep=None, mlp_keep_file=None):
    """apply_sparse with a SparseConfig made of these keywords (in-process callers: tests,
    benchmarks). `layers`: a set of layer indices (None: all); `thresholds`: a file path, or
    {layer: {"t_in", "t_down"} / {"t_gate"}} given in-process."""
    if mode not in MODES:
        raise SparseSetupError(f"unknown sparse mode {mode!r}; known: {', '.join(SPARSE_MODES)}")
    given_thresholds = thresholds if isinstance(thresholds, dict) else None
    try:
        config = SparseConfig(
            mode=mode, mlp_keep=mlp_keep, att_keep=att_keep,
            layers="all" if layers is None else (",".join(str(layer) for layer in sorted(layers)) or "none"),
            layer_mlp_keep=dict(layer_mlp_keep or {}),
            mlp_keep_file=None if mlp_keep_file is None else os.fspath(mlp_keep_file),
            sparse_mlp=sparse_mlp, sparse_attention=sparse_attention,
            sparse_path=None if sparse_path is None else os.fspath(sparse_path), predictor_dataset=predictor_dataset,
            thresholds=None if thresholds is None or given_thresholds is not None else os.fspath(thresholds),
            predictor_dtype=predictor_dtype, use_gather=use_gather)
    except SparseConfigError as error:
        raise SparseSetupError(str(error)) from None
    return apply_sparse(blocks, config, predictors=predictors, thresholds=given_thresholds, stats=stats,
                        layers=None if layers is None else set(layers))


def apply_sparse(blocks, config, predictors=None, thresholds=None, stats=None, layers=None):
    """Set up a stage's blocks for `config` (a SparseConfig): a SparseMLP at block.mlp and a
    SparseTaps at block.taps in each. `predictors` {(kind, layer): (module, input mode)} and
    `thresholds` {layer: ...} override files; `stats`: a SparseStats the blocks report what they
    keep to (None: no counting); `layers`: the sparse layers when already resolved (else
    config.layers against the model's depth). Returns the blocks."""
    if config.mode not in MODES:
        raise SparseSetupError(f"unknown sparse mode {config.mode!r}; known: {', '.join(SPARSE_MODES)}")
    mode = MODES[config.mode]
    if layers is None:
        layers = sparse_layers(config, blocks[0].config.num_hidden_layers) if blocks else set()
    if blocks:
        config = with_allocation(config, blocks[0].config, layers)
    options = SetupOptions(config, dict(predictors or {}), thresholds)
    sparse_blocks, previous = [], None
    for block in blocks:
        taps = SparseTaps(block, previous, stats)
        block.taps, previous = taps, taps
        mlp = block.mlp = SparseMLP(dense_mlp_of(block), taps)
        mlp.use_gather = taps.use_gather = config.use_gather
        if block.layer_index not in layers:
            continue  # a dense layer: its taps still keep the look-ahead input
        taps.mode = config.mode
        mlp.mode = config.mode if config.sparse_mlp else "dense"
        mlp_keep = config.mlp_keep_of(block.layer_index)
        for flag, keep, width in (("--mlp-keep", mlp_keep, mlp.width), ("--att-keep", config.att_keep, taps.num_heads)):
            try:
                if keep is not None:
                    kept_count(keep, width, flag)  # a count above the width is refused here, not per token
            except KeepError as error:
                raise SparseSetupError(f"layer {block.layer_index}: {error}") from None
        mlp.keep = mlp_keep if config.sparse_mlp else None
        taps.att_keep = config.att_keep if config.sparse_attention else None
        sparse_blocks.append(block)
    check_mode_flags(config, [block.mlp.keep for block in sparse_blocks] or [config.mlp_keep])
    for block in blocks:
        if MODES[block.mlp.mode].layout is None:
            lay_out(block.mlp, None)  # a dense MLP (or masks in torch ops): the checkpoint's rows
    mode.setup(sparse_blocks, options)
    if stats is not None:
        for block in blocks:
            describe_cost(stats, block)
    return blocks


def with_allocation(config, model_config, layers):
    """`config` with layer_mlp_keep filled from its allocation file (mlp_keep_file) for the sparse
    `layers`, checked against the model (widths, layer count, model_type) and the mode; mlp_keep,
    when not given, becomes the file's target (reported only: every sparse layer has its own)."""
    path = config.mlp_keep_file
    if not path:
        return config
    if not config.sparse_mlp:
        logger.warning("--mlp-keep-file %s is ignored: --sparse-mlp off", path)
        return config
    try:
        data = load_allocation(path)
        values = allocation_layers(data, path, config.mode, layers, model_config.hidden_size,
                                   getattr(model_config, "intermediate_size", None) or model_config.ffn_dim,
                                   model_config.num_hidden_layers, getattr(model_config, "model_type", None))
    except AllocationError as error:
        raise SparseSetupError(f"--mlp-keep-file: {error}") from None
    mlp_keep = config.mlp_keep if config.mlp_keep is not None else target_keep(data)
    return config.replace(layer_mlp_keep={**config.layer_mlp_keep, **values}, mlp_keep=mlp_keep)


def sparse_layers(config, num_layers):
    """The set of layer indices config.layers names in a model of num_layers layers."""
    if config.layers == "none":
        return set()
    try:
        return set(parse_layers(config.layers, num_layers, "--sparse-layers"))
    except LayerSpecError as error:
        raise SparseSetupError(str(error)) from None


def dense_mlp_of(block):
    """The block's own (dense) MLP, also where an earlier configure_sparse put a SparseMLP over it."""
    mlp = block.mlp
    dense = mlp.dense if isinstance(mlp, SparseMLP) else mlp
    if not isinstance(dense, DenseMLP):
        raise SparseSetupError(f"layer {block.layer_index}: block.mlp is a {type(dense).__name__}, not a dense MLP")
    return dense


def describe_cost(stats, block):
    """Tell `stats` what the block's MLP runs, for its bytes figure."""
    mlp = block.mlp
    predictor = mlp.predictor if mlp.mode == "predicted" else None
    rank = predictor_bytes = None
    if predictor is not None:
        linears = [module for module in predictor.modules() if isinstance(module, nn.Linear)]
        rank = linears[0].out_features if linears else None
        predictor_bytes = (mlp.predictor_rounded or next(predictor.parameters()).dtype).itemsize
    family = "llama" if mlp.neuron_linears()[1] is not None else "opt"
    stats.describe(block.layer_index, mlp.mode, family, block.config.hidden_size, mlp.width,
                   next(block.parameters()).element_size(), rank, predictor_bytes)


class _Closer:
    def close(self, ok):
        pass


def prepare_stage(blocks, args, config):
    """The runner's hook: set this rank's blocks up for args.variant_settings (the SparseConfig
    the command's edge built; from the flags alone where it is absent)."""
    sparse = getattr(args, "variant_settings", None)
    if sparse is None:
        sparse = settings_from_args(args, {})
    layers = sparse_layers(sparse, config.num_hidden_layers)
    if sparse.thresholds and not MODES[sparse.mode].calibrated:
        logger.warning("--thresholds %s is ignored: sparse mode %s reads no thresholds", sparse.thresholds,
                       sparse.mode)
    if blocks:
        sparse = with_allocation(sparse, config, layers)
    stats = SparseStats() if sparse.stats_file else None
    apply_sparse(blocks, sparse, stats=stats, layers=layers)
    logger.info("sparse execution: mode %s, MLP keep %s%s, heads keep %s, layers %s, predictors in %s",
                sparse.mode, sparse.mlp_keep, (f" (per layer{' from ' + sparse.mlp_keep_file if sparse.mlp_keep_file else ''}: "
                 f"{sparse.layer_mlp_keep})") if sparse.layer_mlp_keep else "",
                sparse.att_keep, sparse.layers, sparse.predictor_dtype)
    if stats is None:
        return _Closer()
    rank, world = getattr(args, "rank", 0) or 0, getattr(args, "world_size", 1) or 1
    thresholds_used = None
    if MODES[sparse.mode].calibrated and sparse.sparse_mlp and any(
            float(sparse.mlp_keep_of(layer)) < 1 for layer in layers):
        thresholds_used = os.path.abspath(thresholds_path(sparse.mode, sparse.thresholds, sparse.sparse_path))
    header = {"mode": sparse.mode, "target_keep": sparse.mlp_keep, "att_keep": sparse.att_keep,
              "model": getattr(args, "model_name", None), "model_type": getattr(args, "model_type", None),
              "sparse_layers": sparse.layers, "sparse_mlp": "on" if sparse.sparse_mlp else "off",
              "sparse_attention": "on" if sparse.sparse_attention else "off",
              "thresholds": thresholds_used,
              "mlp_keep_file": os.path.abspath(sparse.mlp_keep_file) if sparse.mlp_keep_file else None,
              "layer_mlp_keep": {str(layer): keep for layer, keep in sorted(sparse.layer_mlp_keep.items())},
              "rank": rank, "world_size": world,
              "stage_layers": [block.layer_index for block in blocks], "sparse_config": sparse.to_dict()}
    return StatsWriter(stats, stats_path(sparse.stats_file, rank, world), header)
