"""Sparse execution (the *-ml-att-sparse model types): keep the top-K MLP neurons and heads.

Per token and per sparse layer, the kept MLP neurons and attention heads are chosen
  predicted: by the trained predictors (top-K of their scores; with no K, the classifier's
             own decision, probability >= 0.5),
  oracle:    by the layer's own activations (top-K |SiLU(gate)*up| or ReLU(fc1); top-K head norms),
  dense:     not at all (every layer dense; a control run).
"Does sparsity exist" (oracle) and "can it be predicted" (predicted) are so measured apart.

When every sequence feeds one token (decoding) the MLP gathers the kept rows of gate/up (fc1)
and columns of down (fc2) and computes only those; otherwise it masks. Both give the same
numbers. Heads are always masked after attention (their outputs are set to zero).
"""

import logging
import os

import torch
from torch import nn

from dejavu_common.helpers import KeepError, LayerSpecError, check_keep, keep_argument, kept_count, parse_layers

from .sparse_gather import (gathered_mlp, linear_forward, linear_slots, pack_mlp_neurons, predicted_call,
                            predicted_gathered_mlp, store_predictor_half)

logger = logging.getLogger(__name__)

SPARSE_MODES = ("predicted", "oracle", "dense")
PREDICTOR_DTYPES = ("float32", "float16")


class SparseSetupError(RuntimeError):
    pass


def count_or_none(keep, width):
    """K for a kept fraction or count (dejavu_common.helpers.kept_count); None keeps no fixed K."""
    return None if keep is None else kept_count(keep, width)


def top_k_mask(scores, k):
    """Boolean mask [..., width] with the k largest scores per row set."""
    if k is None or k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    indices = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, indices, True)


class SparseBlockMixin:
    """Mixed in before a dense block class; configured by `configure_sparse` (else dense)."""

    sparse_mode = "dense"
    mlp_keep = None
    att_keep = None
    mlp_predictor = None
    att_predictor = None
    mlp_input = "same"
    att_input = "same"
    previous_block = None
    use_gather = True

    # Per-token state (current_inputs, last_att_x) is written into __dict__ directly: it is no
    # parameter, buffer or submodule, and Module.__setattr__ would cost microseconds per layer.
    def forward(self, x, layer_past=None, mask=None):
        fused = self.fused_sparse_step(x, layer_past, mask)
        if fused is not None:
            return fused
        self.__dict__["current_inputs"] = {}
        return super().forward(x, layer_past=layer_past, mask=mask)

    def fused_sparse_step(self, x, layer_past, mask):
        """One decoding token through the C kernels where the family has a fused decoder layer
        (Llama) and the heads stay dense: the whole layer in one call, with the dense MLP or
        DejaVu's predicted one; else (a predictor the kernel cannot read) the attention half in
        one call and the MLP in torch ops. None where that does not apply: then the torch path
        (with its taps) runs, with the same numbers."""
        step = getattr(self, "fused_step", None)
        if step is None or self.sparse_heads or self.sparse_mode == "oracle":
            return None
        dense = self.sparse_mode == "dense" or self.mlp_predictor is None
        k = None if dense else count_or_none(self.mlp_keep, self.mlp_width)
        if not dense and (not self.use_gather or k is None):
            return None
        result = step(x, layer_past, mask, predicted_k=k, predict_from_input=self.mlp_input != "same")
        if result is None:
            return None
        self.__dict__["last_att_x"] = x  # the next layer's look-ahead input, as the att_x tap records it
        if dense or len(result) == 2:
            return result
        x_mid, h, present = result
        self.__dict__["current_inputs"] = {"att_x": x, "mlp_x": x_mid}
        return x_mid + self.mlp(h, None), present

    def tap(self, name, value, token_mask):
        if name in ("att_x", "mlp_x"):
            self.current_inputs[name] = value
            if name == "att_x":
                self.__dict__["last_att_x"] = value  # the next layer's look-ahead input
            return value
        if name == "head_out" and self.sparse_heads:
            return value * self.head_mask(value)[..., None].to(value.dtype)
        return value

    @property
    def sparse_heads(self):
        if self.sparse_mode == "oracle":
            return self.att_keep is not None
        return self.sparse_mode == "predicted" and self.att_predictor is not None

    def predictor_input(self, kind):
        mode = self.mlp_input if kind == "mlp" else self.att_input
        if kind == "mlp":
            return self.current_inputs["mlp_x" if mode == "same" else "att_x"]
        return self.current_inputs["att_x"] if mode == "same" else self.previous_block.last_att_x

    @staticmethod
    def predictor_scores(predictor, x):
        x = x.to(next(predictor.parameters()).dtype)
        if not isinstance(predictor, nn.Sequential):
            return predictor(x).float()
        for layer in predictor:  # Linears through the decode kernel when x is one row
            x = linear_forward(layer, x) if isinstance(layer, nn.Linear) else layer(x)
        return x.float()

    def select(self, predictor, x, keep, width):
        scores = self.predictor_scores(predictor, x)
        k = count_or_none(keep, width)
        return (scores > 0) if k is None else top_k_mask(scores, k)

    def head_mask(self, heads):
        """[B, S, H] boolean: heads kept per token."""
        if self.sparse_mode == "oracle":
            return top_k_mask(heads.float().norm(dim=-1), count_or_none(self.att_keep, self.num_heads))
        return self.select(self.att_predictor, self.predictor_input("att"), self.att_keep, self.num_heads)

    def gathered_mlp(self, h, neurons):
        """The MLP computed on the kept neurons only: h [B, 1, d], neurons [B, K] -> [B, 1, d]."""
        return gathered_mlp(h, neurons, *self.neuron_linears())

    def fused_predicted_mlp(self, h, x_pred, predictor, k):
        """Predictor, top-k and gathered MLP in one kernel call per row, or None (see
        predicted_gathered_mlp)."""
        return predicted_gathered_mlp(h, x_pred, predictor, k, *self.neuron_linears())

    def _kernel_slots(self):
        """The family's kernel-view slots (fused_step), then the MLP predictor's: the view also
        holds the predicted-MLP call, and one check per token covers both."""
        slots = super()._kernel_slots() + [(self.__dict__, "mlp_predictor")]
        predictor = self.__dict__.get("mlp_predictor")
        if isinstance(predictor, nn.Module):
            layers = predictor._modules
            slots += [(layers, name) for name in layers]
            slots += linear_slots([layer for layer in layers.values() if isinstance(layer, nn.Linear)])
        return slots

    def _build_kernel_layer(self, values):
        """The family's view, plus the PredictedCall of the MLP predictor (None where there is
        none, or the kernel cannot read it)."""
        view = super()._build_kernel_layer(values)
        predictor = self.__dict__.get("mlp_predictor")
        if view is None:
            return None
        call = None if predictor is None else predicted_call(predictor, *self.neuron_linears())
        return (*view, call)

    def mlp(self, h, token_mask):
        if self.sparse_mode == "dense" or (self.sparse_mode == "predicted" and self.mlp_predictor is None):
            return super().mlp(h, token_mask)
        width = self.mlp_width
        if self.sparse_mode == "oracle":
            act = self.mlp_activation(h)
            keep = top_k_mask(act.float().abs(), count_or_none(self.mlp_keep, width))
            return self.mlp_output(act * keep.to(act.dtype))
        k = count_or_none(self.mlp_keep, width)
        if self.use_gather and h.shape[1] == 1 and k is not None:
            x_pred = self.predictor_input("mlp")
            fused = self.fused_predicted_mlp(h, x_pred, self.mlp_predictor, k)
            if fused is not None:
                return fused
            scores = self.predictor_scores(self.mlp_predictor, x_pred)[:, 0]
            neurons = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # [B, K], in weight order
            return self.gathered_mlp(h, neurons)
        keep = self.select(self.mlp_predictor, self.predictor_input("mlp"), self.mlp_keep, width)
        act = self.mlp_activation(h)
        return self.mlp_output(act * keep.to(act.dtype))


def add_arguments(parser):
    env = os.environ
    group = parser.add_argument_group("sparse execution (*-ml-att-sparse model types)")
    group.add_argument("--sparse-mode", choices=SPARSE_MODES, default=env.get("SPARSE_MODE", "predicted"))
    group.add_argument("--sparse-path", default=env.get("SPRARSE_PATH") or env.get("SPARSE_PATH"),
                       help="folder of c4_layer{L}.pt / c4_att_layer{L}.pt (default: $SPRARSE_PATH)")
    # argparse converts string defaults with `type` too, so $TOPK and $ATTN_TOPK_1 are checked like the flags.
    group.add_argument("--mlp-keep", type=keep_argument("--mlp-keep ($TOPK)"), default=env.get("TOPK") or None,
                       help="MLP neurons kept per token: a fraction in (0, 1] or a whole count up to the MLP's "
                            "width (default: $TOPK; predicted mode without it keeps the classifier's positives)")
    group.add_argument("--att-keep", type=keep_argument("--att-keep ($ATTN_TOPK_1)"),
                       default=env.get("ATTN_TOPK_1") or None,
                       help="heads kept per token: a fraction in (0, 1] or a whole count up to the number of "
                            "heads (default: $ATTN_TOPK_1)")
    group.add_argument("--sparse-layers", default=_layers_env(),
                       help="'all', '4-29', '4-' (to the last) or '0,3,5' (default: all, or from $LAYER onwards)")
    group.add_argument("--sparse-attention", choices=("on", "off"), default="on")
    group.add_argument("--sparse-mlp", choices=("on", "off"), default="on")
    group.add_argument("--no-gather", action="store_true", help="always mask, never gather, the MLP")
    group.add_argument("--predictor-dtype", choices=PREDICTOR_DTYPES, default=env.get("PREDICTOR_DTYPE", "float32"),
                       help="weights the predictors run with: float32 as trained, or rounded to float16 "
                            "as upstream runs them (half the bytes per token on the CPU; default: "
                            "$PREDICTOR_DTYPE or float32)")


def _layers_env():
    first = os.environ.get("LAYER")
    return f"{first}-" if first not in (None, "") else "all"


def load_predictors(folder, kind, layer):
    """(predictor, input mode) for one layer, from the predictor package's files."""
    from sparse_predictor.predictor import load_predictor, load_predictor_info

    name = f"c4_layer{layer}.pt" if kind == "mlp" else f"c4_att_layer{layer}.pt"
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise SparseSetupError(f"predictor file not found: {path}")
    info = load_predictor_info(folder, kind, layer)
    if info is None:  # e.g. upstream's checkpoints, which carry no metrics file
        logger.warning("%s: no metrics line records its input mode; assuming 'same'", path)
        info = {}
    return load_predictor(path), info.get("input_mode", "same")


def configure_sparse(blocks, mode, sparse_path=None, mlp_keep=None, att_keep=None, layers=None,
                     sparse_mlp=True, sparse_attention=True, use_gather=True, predictors=None,
                     predictor_dtype="float32"):
    """Set up a stage's blocks. `predictors` {(kind, layer): (module, input mode)} overrides files.
    predictor_dtype "float16" rounds the predictors' weights to float16 (store_predictor_half)."""
    if mode not in SPARSE_MODES:
        raise SparseSetupError(f"unknown sparse mode {mode!r}; known: {', '.join(SPARSE_MODES)}")
    if predictor_dtype not in PREDICTOR_DTYPES:
        raise SparseSetupError(f"unknown predictor dtype {predictor_dtype!r}; known: {', '.join(PREDICTOR_DTYPES)}")
    predictors = dict(predictors or {})
    for flag, keep in (("--mlp-keep", mlp_keep), ("--att-keep", att_keep)):
        if keep is not None:
            try:
                check_keep(keep, flag)
            except KeepError as error:
                raise SparseSetupError(str(error)) from None
    for position, block in enumerate(blocks):
        # Plain attributes, not submodules: the predictors and the neighbour are not weights of
        # this block (and a registered submodule would hide behind the class defaults).
        object.__setattr__(block, "previous_block", blocks[position - 1] if position > 0 else None)
        block.mlp_width = block.config.intermediate_size if hasattr(block.config, "intermediate_size") \
            else block.config.ffn_dim
        block.use_gather = use_gather
        if layers is not None and block.layer_index not in layers:
            block.sparse_mode = "dense"
            continue
        block.sparse_mode = mode
        for flag, keep, width in (("--mlp-keep", mlp_keep, block.mlp_width),
                                  ("--att-keep", att_keep, block.config.num_attention_heads)):
            try:
                if keep is not None:
                    kept_count(keep, width, flag)  # a count above the width is refused here, not per token
            except KeepError as error:
                raise SparseSetupError(f"layer {block.layer_index}: {error}") from None
        block.mlp_keep = mlp_keep if sparse_mlp else None
        block.att_keep = att_keep if sparse_attention else None
        if mode == "oracle":
            block.mlp_keep = mlp_keep if sparse_mlp else 1.0
            block.att_keep = att_keep if sparse_attention else None
        if mode != "predicted":
            continue
        for kind, enabled in (("mlp", sparse_mlp), ("att", sparse_attention)):
            if not enabled:
                continue
            key = (kind, block.layer_index)
            if key not in predictors:
                if not sparse_path:
                    raise SparseSetupError("predicted mode needs --sparse-path (or $SPRARSE_PATH)")
                predictors[key] = load_predictors(sparse_path, kind, block.layer_index)
            module, input_mode = predictors[key]
            module = module.to(next(block.parameters()).device)
            object.__setattr__(block, f"{kind}_predictor", module)
            object.__setattr__(block, f"{kind}_input", input_mode)
            if predictor_dtype == "float16" and not store_predictor_half(module):
                raise SparseSetupError(f"layer {block.layer_index}: the {kind} predictor has a weight outside "
                                       "float16's range; use --predictor-dtype float32")
            if kind == "mlp" and use_gather and not block.__dict__.get("mlp_packed"):
                # decoding reads a kept neuron's gate, up and down weights as one run of memory
                first, second, output, _ = block.neuron_linears()
                block.__dict__["mlp_packed"] = pack_mlp_neurons(first, second, output)
            if kind == "att":
                if input_mode == "prev" and block.previous_block is None:
                    raise SparseSetupError(
                        f"layer {block.layer_index}: its attention predictor reads the previous layer's "
                        "input, which is not on this stage; train it with --input same or move the stage split"
                    )
    return blocks


class _Closer:
    def close(self, ok):
        pass


def prepare_stage(blocks, args, config):
    try:
        layers = parse_layers(args.sparse_layers, config.num_hidden_layers, "--sparse-layers")
    except LayerSpecError as error:
        raise SparseSetupError(str(error)) from None
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
    )
    logger.info("sparse execution: mode %s, MLP keep %s, heads keep %s, layers %s, predictors in %s",
                args.sparse_mode, args.mlp_keep, args.att_keep, args.sparse_layers, args.predictor_dtype)
    return _Closer()
