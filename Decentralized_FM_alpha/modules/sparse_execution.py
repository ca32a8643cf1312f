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

configure_sparse puts two pieces into each block of a stage, without subclassing it: a
SparseMLP in place of block.mlp (the MLP of the layer's mode, on the dense MLP's own weights) and
a SparseTaps at block.taps (it keeps the predictors' inputs and zeroes the heads not kept). The
decode backends run these blocks as they are; the cpu backend (decode/cpu.py) reads the same
configuration to run a layer with dense heads through the C kernels.

When every sequence feeds one token (decoding) predicted mode gathers the kept rows of gate/up
(fc1) and columns of down (fc2) and computes only those; everywhere else the dropped entries
are masked (set to zero). Both give the same numbers. Heads are always masked after attention.
The kept fractions a run reached and their cost in MLP bytes: --sparse-stats (sparse_stats.py).
"""

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from dejavu_common.helpers import KeepError, LayerSpecError, check_keep, keep_argument, kept_count, parse_layers
from dejavu_common.thresholds_format import ThresholdsError, read_thresholds, thresholds_file

from .common import DenseMLP
from .decode import cpu_training_free, cuda_sparse
from .decode.sparse_gather import (gathered_mlp, linear_forward, pack_mlp_neurons, predicted_gathered_mlp,
                                   store_predictor_half, unpack_mlp)
from .sparse_stats import SparseStats, StatsWriter, stats_path
from .training_free import apply_mask, column_norms, magnitude_mask, top_k_mask, wina_mask

logger = logging.getLogger(__name__)

PREDICTOR_DTYPES = ("float32", "float16")


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
        """The block's attention for a decoding step (h [B, 1, d]) reading only the kept heads' q
        rows and o columns (decode/cuda_sparse.py): (output, present), or None where that does not
        apply (then the block's own attention runs and head_out masks). Predicted heads at a
        fixed K, on CUDA through Triton; what it keeps is recorded as head_out records it."""
        if not (self.mode == "predicted" and self.sparse_heads and self.att_keep is not None and self.use_gather):
            return None
        if not cuda_sparse.heads_usable(block, h):
            return None
        keep = self.predicted_head_mask()  # [B, 1, H]
        self.record({"heads": keep}, token_mask, h.shape[:2])
        return cuda_sparse.sparse_heads_attention(block, h, layer_past, mask, keep,
                                                  kept_count(self.att_keep, self.num_heads))

    def record(self, kept, token_mask, token_shape):
        """Count what one call kept (--sparse-stats); nothing when no stats are collected."""
        if self.stats is not None:
            self.stats.add(self.layer_index, kept, token_mask, token_shape)

    def configuration(self):
        """What a captured CUDA graph bakes in of the heads (decode/stages.py)."""
        return self.mode, self.att_keep, id(self.att_predictor), self.use_gather


class SparseMLP(nn.Module):
    """block.mlp under sparse execution: the MLP of the layer's mode (MODES) on the dense MLP's
    weights. It shares the dense MLP's submodules (the very dict), so the block's state dict and
    weights stay what they were, and a weight changed through either is changed for both."""

    def __init__(self, dense, taps):
        super().__init__()
        self.__dict__["_modules"] = dense._modules  # the dense MLP's submodules, the same dict
        object.__setattr__(self, "dense", dense)  # not a submodule: its children are already ours
        self.taps, self.layer_index = taps, taps.layer_index
        self.width = dense.neuron_linears()[0].out_features  # I: intermediate_size / ffn_dim
        self.mode = "dense"  # the MODES entry this MLP runs
        self.keep = None  # --mlp-keep: a kept fraction or count (None: no fixed K)
        self.predictor, self.input_mode = None, "same"  # predicted: the predictor and what it reads
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

    def forward(self, h):
        output, kept = MODES[self.mode].mlp(self, h)
        self.taps.record(kept, self.taps.token_mask, h.shape[:-1])
        return output


def predictor_scores(predictor, x):
    """The predictor's float32 scores of x (its logits per unit)."""
    x = x.to(next(predictor.parameters()).dtype)
    if not isinstance(predictor, nn.Sequential):
        return predictor(x).float()
    for layer in predictor:  # Linears through the decode kernel when x is one row
        x = linear_forward(layer, x) if isinstance(layer, nn.Linear) else layer(x)
    return x.float()


def select(predictor, x, keep, width):
    """Boolean [..., width]: the top K of the predictor's scores, or its positives without K."""
    scores = predictor_scores(predictor, x)
    k = count_or_none(keep, width)
    return (scores > 0) if k is None else top_k_mask(scores, k)


def kernel_predicted_mlp(mlp, h, x_pred, k):
    """Predictor, top-k and gathered MLP through the device's kernels: one C call per row on the
    CPU (predicted_gathered_mlp), the Triton kernels on CUDA (decode/cuda_sparse.py); None where
    neither applies (then the same steps run in torch ops)."""
    if h.is_cuda:
        return cuda_sparse.predicted_mlp(h, x_pred, mlp.predictor, k, *mlp.neuron_linears(), predictor_scores)
    return predicted_gathered_mlp(h, x_pred, mlp.predictor, k, *mlp.neuron_linears())


# ---- the MLP of each mode: (mlp, h) -> (output, {input: kept mask | fraction | None (all)}) ------------
# `mlp` is the layer's SparseMLP: its weights (activation, output, neuron_linears) and the mode's settings.
def dense_mlp(mlp, h):
    return mlp.output(mlp.activation(h)), {"neurons": None}


def oracle_mlp(mlp, h):
    act = mlp.activation(h)
    keep = top_k_mask(act.float().abs(), mlp.kept)
    return mlp.output(act * keep.to(act.dtype)), {"neurons": keep}


def predicted_mlp(mlp, h):
    width, k = mlp.width, mlp.kept
    if mlp.use_gather and h.shape[1] == 1 and k is not None:
        x_pred = mlp.predictor_input()
        out = kernel_predicted_mlp(mlp, h, x_pred, k)
        if out is None:
            scores = predictor_scores(mlp.predictor, x_pred)[:, 0]
            neurons = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # [B, K], in weight order
            out = gathered_mlp(h, neurons, *mlp.neuron_linears())
        return out, {"neurons": k / width}
    keep = select(mlp.predictor, mlp.predictor_input(), mlp.keep, width)
    act = mlp.activation(h)
    return mlp.output(act * keep.to(act.dtype)), {"neurons": keep}


def teal_mlp(mlp, h):
    """TEAL: entries of h at or below t_in are zeroed before gate and up (fc1), entries of the
    activation at or below t_down before down (fc2). One float32 CPU token in the C kernel, which
    reads only the kept columns (decode/cpu_training_free.py); elsewhere masked in torch ops."""
    thresholds = mlp.thresholds
    if mlp.use_gather and h.shape[:2] == (1, 1):
        found = cpu_training_free.teal_mlp(h, *mlp.neuron_linears(), thresholds["t_in"], thresholds["t_down"])
        if found is not None:
            out, kept_in, kept_down = found
            return out, {"in": kept_in / h.shape[-1], "down": kept_down / mlp.width}
    keep_in = magnitude_mask(h, thresholds["t_in"])
    act = mlp.activation(apply_mask(h, keep_in))
    keep_down = magnitude_mask(act, thresholds["t_down"])
    return mlp.output(apply_mask(act, keep_down)), {"in": keep_in, "down": keep_down}


def cats_mlp(mlp, h):
    """CATS: SiLU(gate(h)) computed densely; neurons whose |SiLU(gate)| is at or below t_gate are
    dropped. One float32 CPU token in the C kernel, which reads the kept neurons' up and down only
    (decode/cpu_training_free.py); elsewhere masked in torch ops."""
    if mlp.use_gather and h.shape[:2] == (1, 1):
        found = cpu_training_free.cats_mlp(h, *mlp.neuron_linears(), mlp.thresholds["t_gate"])
        if found is not None:
            return found[0], {"neurons": found[1] / mlp.width}
    gate, up, _, act_fn = mlp.neuron_linears()
    gated = act_fn(gate(h))
    keep = magnitude_mask(gated, mlp.thresholds["t_gate"])
    return mlp.output(apply_mask(gated * up(h), keep)), {"neurons": keep}


def wina_mlp(mlp, h):
    """WINA: per token the top-K entries of h by |h_i| * ||[gate; up][:, i]|| (OPT: fc1), and of the
    activation by |act_j| * ||down[:, j]|| (fc2), K = kept_count(--mlp-keep, width)."""
    (in_norms, down_norms), (k_in, k_down) = mlp.wina_norms, mlp.wina_counts
    keep_in = wina_mask(h, in_norms, k_in)
    act = mlp.activation(apply_mask(h, keep_in))
    keep_down = wina_mask(act, down_norms, k_down)
    return mlp.output(apply_mask(act, keep_down)), {"in": keep_in, "down": keep_down}


# ---- set-up of each mode, once per stage: setup(sparse blocks, options) -----------------------------
def lay_out(mlp, layout):
    """Lay the MLP's weights out as the decoding kernels of a mode read them (same values, shapes
    and state-dict keys; once per layout):
      rows     each weight row-major as the checkpoint has it (the dense layer kernel's; None);
      neurons  a kept neuron's gate, up and down weights as one run of memory (CPU:
               pack_mlp_neurons; predicted, cats), or its down column as one row (CUDA);
      teal     gate and up by input column, down by neuron (cpu_training_free.lay_out_teal)."""
    if mlp.dense.__dict__.get("layout") == layout:
        return
    first, second, output, _ = mlp.neuron_linears()
    if layout is None:
        unpack_mlp(first, second, output)
        done = True
    elif layout == "teal":
        done = cpu_training_free.lay_out_teal(first, second, output)
    else:
        done = pack_mlp_neurons(first, second, output) or cuda_sparse.lay_out_for_gather(output)
    mlp.dense.__dict__["layout"] = layout if done else None



def sparse_mlps(blocks):
    return [block.mlp for block in blocks if block.mlp.mode != "dense"]


def setup_predicted(blocks, options):
    """Attach each layer's predictors (from options.predictors, else --sparse-path files)."""
    predictors = options.predictors
    for block in blocks:
        mlp, taps = block.mlp, block.taps
        for kind, enabled in (("mlp", options.sparse_mlp), ("att", options.sparse_attention)):
            if not enabled:
                continue
            key = (kind, block.layer_index)
            if key not in predictors:
                if not options.sparse_path:
                    raise SparseSetupError("predicted mode needs --sparse-path (or $SPRARSE_PATH)")
                predictors[key] = load_predictors(options.sparse_path, kind, block.layer_index,
                                                   options.predictor_dataset)
            module, input_mode = predictors[key]
            module = module.to(next(block.parameters()).device)
            if options.predictor_dtype == "float16" and not store_predictor_half(module):
                raise SparseSetupError(f"layer {block.layer_index}: the {kind} predictor has a weight outside "
                                       "float16's range; use --predictor-dtype float32")
            if kind == "mlp":
                mlp.predictor, mlp.input_mode = module, input_mode
                if options.use_gather:
                    lay_out(mlp, "neurons")
                continue
            if input_mode == "prev" and taps.previous is None:
                raise SparseSetupError(
                    f"layer {block.layer_index}: its attention predictor reads the previous layer's "
                    "input, which is not on this stage; train it with --input same or move the stage split"
                )
            taps.att_predictor, taps.att_input = module, input_mode
            if options.use_gather:
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
    """teal / cats: each layer's calibrated thresholds for exactly --mlp-keep. A kept fraction of
    1.0 needs no file: no threshold, the dense MLP's numbers."""
    mode, mlps = options.mode, sparse_mlps(blocks)
    if not mlps:
        return
    if float(options.mlp_keep) >= 1.0:
        thresholds = {mlp.layer_index: None for mlp in mlps}
    elif isinstance(options.thresholds, dict):  # given in-process, e.g. by tests
        thresholds = options.thresholds
    else:
        path = thresholds_path(mode, options.thresholds, options.sparse_path)
        if path is None:
            raise SparseSetupError(f"sparse mode {mode} needs calibrated thresholds: --thresholds FILE, or "
                                   f"--sparse-path DIR holding thresholds_{mode}.json (sparse_predictor/calibrate.py)")
        try:
            thresholds = read_thresholds(path, mode, options.mlp_keep, [mlp.layer_index for mlp in mlps],
                                         blocks[0].config.hidden_size, mlps[0].width)
        except ThresholdsError as error:
            raise SparseSetupError(str(error)) from None
    for mlp in mlps:
        if mlp.layer_index not in thresholds:
            raise SparseSetupError(f"sparse mode {mode}: no thresholds for layer {mlp.layer_index}")
        mlp.thresholds = {**KEEP_ALL, **(thresholds[mlp.layer_index] or {})}
        if options.use_gather:
            lay_out(mlp, "teal" if options.mode == "teal" else "neurons")


def setup_cats(blocks, options):
    for mlp in sparse_mlps(blocks):
        if mlp.neuron_linears()[1] is None:
            raise SparseSetupError(
                f"sparse mode cats needs a gated MLP (Llama's gate and up); layer {mlp.layer_index} of this "
                "model has fc1/activation/fc2 (OPT) and no gate to threshold: use teal or wina")
    setup_thresholds(blocks, options)


def setup_wina(blocks, options):
    """wina: the column norms each input is scored against, and K per input (no file needed)."""
    for mlp in sparse_mlps(blocks):
        first, second, output, _ = mlp.neuron_linears()
        readers = [first.weight] if second is None else [first.weight, second.weight]
        mlp.wina_norms = (column_norms(*readers), column_norms(output.weight))
        mlp.wina_counts = (kept_count(options.mlp_keep, first.in_features, "--mlp-keep"),
                           kept_count(options.mlp_keep, mlp.width, "--mlp-keep"))


@dataclass(frozen=True)
class SparseMode:
    mlp: Callable  # (SparseMLP, h) -> (output, kept): the MLP of a layer whose MLP is sparse
    setup: Optional[Callable] = None  # (sparse blocks, options), once per stage
    layer_kernel: bool = False  # the cpu backend may run the layer in C when its heads are dense
    mlp_only: bool = False  # a training-free baseline: attention dense, --mlp-keep a fraction, required
    calibrated: bool = False  # reads a thresholds file (sparse_predictor/calibrate.py)
    lays_out: bool = False  # its setup lays the MLP out for its kernels (lay_out); others get the checkpoint's rows


MODES = {
    "predicted": SparseMode(predicted_mlp, setup_predicted, layer_kernel=True, lays_out=True),
    "oracle": SparseMode(oracle_mlp),
    "dense": SparseMode(dense_mlp, layer_kernel=True),
    "teal": SparseMode(teal_mlp, setup_thresholds, layer_kernel=True, mlp_only=True, calibrated=True,
                       lays_out=True),
    "cats": SparseMode(cats_mlp, setup_cats, layer_kernel=True, mlp_only=True, calibrated=True, lays_out=True),
    "wina": SparseMode(wina_mlp, setup_wina, mlp_only=True),
}
SPARSE_MODES = tuple(MODES)
TRAINING_FREE_MODES = tuple(name for name, mode in MODES.items() if mode.mlp_only)


def add_arguments(parser):
    env = os.environ
    group = parser.add_argument_group("sparse execution (*-ml-att-sparse model types)")
    group.add_argument("--sparse-mode", choices=SPARSE_MODES, default=env.get("SPARSE_MODE", "predicted"),
                       help="predicted, oracle, dense, or a training-free MLP baseline: teal, cats (Llama), wina "
                            "(default: $SPARSE_MODE or predicted)")
    group.add_argument("--sparse-path", default=env.get("SPRARSE_PATH") or env.get("SPARSE_PATH"),
                       help="folder of c4_layer{L}.pt / c4_att_layer{L}.pt (c4: --predictor-dataset), and "
                            "thresholds_{teal,cats}.json "
                            "(default: $SPRARSE_PATH)")
    group.add_argument("--predictor-dataset", default=env.get("PREDICTOR_DATASET") or "c4",
                       help="the label the predictors were trained under (the predictor package's --dataset): "
                            "files {label}_layer{L}.pt / {label}_att_layer{L}.pt (default: $PREDICTOR_DATASET or c4)")
    group.add_argument("--thresholds", default=None,
                       help="teal / cats: the calibrated thresholds file (default: "
                            "--sparse-path/thresholds_{mode}.json)")
    # argparse converts string defaults with `type` too, so $TOPK and $ATTN_TOPK_1 are checked like the flags.
    group.add_argument("--mlp-keep", type=keep_argument("--mlp-keep ($TOPK)"), default=env.get("TOPK") or None,
                       help="MLP neurons kept per token: a fraction in (0, 1] or a whole count up to the MLP's "
                            "width (default: $TOPK; predicted mode without it keeps the classifier's positives); "
                            "teal, cats, wina: the target kept fraction of each masked input")
    group.add_argument("--att-keep", type=keep_argument("--att-keep ($ATTN_TOPK_1)"),
                       default=env.get("ATTN_TOPK_1") or None,
                       help="heads kept per token: a fraction in (0, 1] or a whole count up to the number of "
                            "heads (default: $ATTN_TOPK_1; not with teal, cats, wina)")
    group.add_argument("--sparse-layers", default=_layers_env(),
                       help="'all', '4-29', '4-' (to the last) or '0,3,5' (default: all, or from $LAYER onwards)")
    group.add_argument("--sparse-attention", choices=("on", "off"), default="on")
    group.add_argument("--sparse-mlp", choices=("on", "off"), default="on")
    group.add_argument("--no-gather", action="store_true",
                       help="always mask, never gather: the MLP's neurons and (CUDA, Llama) the heads")
    group.add_argument("--predictor-dtype", choices=PREDICTOR_DTYPES, default=env.get("PREDICTOR_DTYPE", "float32"),
                       help="weights the predictors run with: float32 as trained, or rounded to float16 "
                            "as upstream runs them (half the bytes per token on the CPU; default: "
                            "$PREDICTOR_DTYPE or float32)")
    group.add_argument("--sparse-stats", default=None, metavar="FILE",
                       help="write, at the end, the kept fraction each layer reached over the real tokens and "
                            "the MLP bytes per token it costs (JSON; FILE.rank{r}.json per rank when several)")


def _layers_env():
    first = os.environ.get("LAYER")
    return f"{first}-" if first not in (None, "") else "all"


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
    mode: str
    mlp_keep: object
    sparse_path: Optional[str]
    thresholds: object  # a file path, or {layer: thresholds} given in-process
    predictors: dict
    predictor_dtype: str
    use_gather: bool
    sparse_mlp: bool
    sparse_attention: bool
    predictor_dataset: str = "c4"  # the label in the predictor files' names


def check_mode_flags(mode, mlp_keep, att_keep, sparse_mlp):
    """What the training-free modes refuse: heads, a count, no kept fraction."""
    if not MODES[mode].mlp_only:
        return
    if att_keep is not None:
        raise SparseSetupError(f"--att-keep ($ATTN_TOPK_1): sparse mode {mode} is MLP-only (attention stays dense); "
                               "drop --att-keep")
    if not sparse_mlp:
        return
    if mlp_keep is None:
        raise SparseSetupError(f"sparse mode {mode} needs --mlp-keep ($TOPK): the kept fraction to reach")
    if float(mlp_keep) > 1:
        raise SparseSetupError(f"--mlp-keep {mlp_keep:g}: sparse mode {mode} takes a kept fraction in (0, 1], "
                               "not a count (it masks inputs of different widths)")


def configure_sparse(blocks, mode, sparse_path=None, mlp_keep=None, att_keep=None, layers=None,
                     sparse_mlp=True, sparse_attention=True, use_gather=True, predictors=None,
                     predictor_dtype="float32", thresholds=None, stats=None, predictor_dataset="c4"):
    """Set up a stage's blocks. `predictors` {(kind, layer): (module, input mode)} overrides files.
    predictor_dtype "float16" rounds the predictors' weights to float16 (store_predictor_half).
    predictor_dataset: the label of the predictor files read from sparse_path
    ({label}_layer{L}.pt). `thresholds` (teal, cats): a thresholds file, or {layer: {"t_in", "t_down"} / {"t_gate"}}; by
    default --sparse-path/thresholds_{mode}.json. `stats`: a SparseStats that the blocks report
    what they keep to (None: no counting). Returns the blocks."""
    if mode not in MODES:
        raise SparseSetupError(f"unknown sparse mode {mode!r}; known: {', '.join(SPARSE_MODES)}")
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise SparseSetupError(f"unknown predictor dtype {predictor_dtype!r}; known: {', '.join(PREDICTOR_DTYPES)}")
    for flag, keep in (("--mlp-keep", mlp_keep), ("--att-keep", att_keep)):
        if keep is not None:
            try:
                check_keep(keep, flag)
            except KeepError as error:
                raise SparseSetupError(str(error)) from None
    check_mode_flags(mode, mlp_keep, att_keep, sparse_mlp)
    options = SetupOptions(mode, mlp_keep, sparse_path, thresholds, dict(predictors or {}), predictor_dtype,
                           use_gather, sparse_mlp, sparse_attention, predictor_dataset)
    sparse_blocks, previous = [], None
    for block in blocks:
        taps = SparseTaps(block, previous, stats)
        block.taps, previous = taps, taps
        mlp = block.mlp = SparseMLP(dense_mlp_of(block), taps)
        mlp.use_gather = taps.use_gather = use_gather
        if layers is not None and block.layer_index not in layers:
            continue  # a dense layer: its taps still keep the look-ahead input
        taps.mode = mode
        mlp.mode = mode if sparse_mlp else "dense"
        for flag, keep, width in (("--mlp-keep", mlp_keep, mlp.width),
                                  ("--att-keep", att_keep, taps.num_heads)):
            try:
                if keep is not None:
                    kept_count(keep, width, flag)  # a count above the width is refused here, not per token
            except KeepError as error:
                raise SparseSetupError(f"layer {block.layer_index}: {error}") from None
        mlp.keep = mlp_keep if sparse_mlp else None
        taps.att_keep = att_keep if sparse_attention else None
        sparse_blocks.append(block)
    for block in blocks:
        if not MODES[block.mlp.mode].lays_out:
            lay_out(block.mlp, None)  # a dense MLP (or masks in torch ops): the checkpoint's rows
    setup = MODES[mode].setup
    if setup is not None:
        setup(sparse_blocks, options)
    if stats is not None:
        for block in blocks:
            describe_cost(stats, block)
    return blocks


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
        predictor_bytes = 2 if predictor.__dict__.get("kernel_half") else next(predictor.parameters()).element_size()
    family = "llama" if mlp.neuron_linears()[1] is not None else "opt"
    stats.describe(block.layer_index, mlp.mode, family, block.config.hidden_size, mlp.width,
                   next(block.parameters()).element_size(), rank, predictor_bytes)


class _Closer:
    def close(self, ok):
        pass


def prepare_stage(blocks, args, config):
    try:
        layers = parse_layers(args.sparse_layers, config.num_hidden_layers, "--sparse-layers")
    except LayerSpecError as error:
        raise SparseSetupError(str(error)) from None
    if getattr(args, "thresholds", None) and not MODES[args.sparse_mode].calibrated:
        logger.warning("--thresholds %s is ignored: sparse mode %s reads no thresholds", args.thresholds,
                       args.sparse_mode)
    stats_file = getattr(args, "sparse_stats", None)
    stats = SparseStats() if stats_file else None
    configure_sparse(
        blocks,
        args.sparse_mode,
        sparse_path=args.sparse_path,
        mlp_keep=args.mlp_keep,
        att_keep=args.att_keep,
        layers=set(layers),
        sparse_mlp=args.sparse_mlp == "on",
        sparse_attention=args.sparse_attention == "on",
        use_gather=not args.no_gather,
        predictor_dtype=args.predictor_dtype,
        thresholds=getattr(args, "thresholds", None),
        stats=stats,
        predictor_dataset=getattr(args, "predictor_dataset", "c4"),
    )
    logger.info("sparse execution: mode %s, MLP keep %s, heads keep %s, layers %s, predictors in %s",
                args.sparse_mode, args.mlp_keep, args.att_keep, args.sparse_layers, args.predictor_dtype)
    if stats is None:
        return _Closer()
    rank, world = getattr(args, "rank", 0) or 0, getattr(args, "world_size", 1) or 1
    thresholds_used = None
    if MODES[args.sparse_mode].calibrated and args.sparse_mlp == "on" and float(args.mlp_keep) < 1:
        thresholds_used = os.path.abspath(thresholds_path(args.sparse_mode, args.thresholds, args.sparse_path))
    header = {"mode": args.sparse_mode, "target_keep": args.mlp_keep, "att_keep": args.att_keep,
              "model": args.model_name if hasattr(args, "model_name") else None,
              "model_type": getattr(args, "model_type", None), "sparse_layers": args.sparse_layers,
              "sparse_mlp": args.sparse_mlp, "sparse_attention": args.sparse_attention,
              "thresholds": thresholds_used, "rank": rank, "world_size": world,
              "stage_layers": [block.layer_index for block in blocks]}
    return StatsWriter(stats, stats_path(stats_file, rank, world), header)
