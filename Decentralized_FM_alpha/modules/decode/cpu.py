"""The cpu backend: decoding through the C kernels of decode_kernels.c (../cpu_kernels.py).

  cpu_step(block, x, layer_past, mask)   (x, present) of one token at batch 1 through a C
                                         decoder layer, or None: the block's forward runs
                                         instead (the same numbers)
  kernel_applies(x, layer_past)          whether a step can go through a decoder-layer kernel
  prepare_modules / release_modules      the modules the backend runs, readied and given back
  kernels_enabled(on)                    the kernels on or off for a block of calls

What cpu_step runs, by what the block holds:
  a dense block (no taps installed, a dense MLP): the whole layer in one call;
  a sparse block (sparse_execution: SparseTaps at block.taps, SparseMLP at block.mlp) whose
  heads are all kept: the whole layer with its dense MLP, or with DejaVu's predicted MLP at a
  fixed K in the same call; where the kernel cannot read the predictor, the attention half in
  one call and the MLP in torch ops;
  nothing else: taps that record (the save variants), sparse heads, the other sparse modes.
Each family's view of its weights (cpu_views.py) and C calls are one entry of FAMILIES.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from .. import cpu_kernels, sparse_execution
from ..common import DenseMLP, KVCache, StepCache, TappedModule, step_geometry, tensor_key
from ..hf_llama_module import LlamaBlock
from ..hf_opt_module import OPTBlock
from . import cpu_views
from .huge_pages import move_to_huge_pages
from .sparse_gather import CpuLinear


class KernelStep(NamedTuple):
    """What a decoder-layer kernel's one-token step reads and writes."""

    x: torch.Tensor  # the token's input [1, 1, d], contiguous
    out: torch.Tensor  # where the kernel writes the layer's output
    present: KVCache  # the cache grown by the token: the kernel writes its keys and values
    keys: int  # address of present's key buffer [1, kv_heads, capacity, head_dim]
    values: int  # address of its value buffer
    head_stride: int  # floats from one head to the next in those buffers
    past: int  # positions before the token
    key_valid: Optional[int]  # address of the uint8 mask of the keys the token sees; None: all


def kernel_applies(x, layer_past):
    """Whether a decoder-layer kernel can take this step: x one float32 CPU token at batch 1 over
    a KVCache of contiguous float32 CPU buffers, without autograd."""
    if (x.shape[:2] != (1, 1) or x.dtype != torch.float32 or x.device.type != "cpu"
            or not isinstance(layer_past, KVCache) or torch.is_grad_enabled()):
        return False
    keys = layer_past.buffers.keys
    return keys.dtype == torch.float32 and keys.device.type == "cpu" and keys.is_contiguous()


_key_validity_cache = StepCache()


def key_validity(mask, total):
    """uint8 [total]: which keys the one query of a batch-1 decoding step may see (its first row
    of `mask`), or None when it may see them all (no left padding). Once per step."""
    if mask is None:
        return None

    def compute():
        valid = mask[0, :total].ne(0).to(torch.uint8)
        return None if bool(valid.all()) else valid.contiguous()

    return _key_validity_cache.get((tensor_key(mask), total), compute, mask)


def begin_step(x, layer_past, mask):
    past, present = layer_past.length, layer_past.grown(1)
    keys, values = present.buffers.keys, present.buffers.values
    valid = key_validity(mask, past + 1)  # kept alive by its StepCache during the call
    x = x.contiguous()
    return KernelStep(x, torch.empty_like(x), present, keys.data_ptr(), values.data_ptr(), keys.stride(1), past,
                      None if valid is None else valid.data_ptr())


# ---- each family's C calls: (lib, block, view, step, mask, ...) -> status (0: done) --------------------
def llama_geometry(block, step, mask):
    positions, _ = step_geometry(mask, step.past, 1, step.x.device)
    cos, _, signed_sin = block.rope_tables(positions, torch.float32)  # kept alive by the RoPE StepCache
    return (step.keys, step.values, step.head_stride, step.past, cos.data_ptr(), signed_sin.data_ptr(),
            step.key_valid, block.head_dim**-0.5)


def llama_layer(lib, block, view, step, mask):
    return lib.dejavu_llama_decode_layer(view.ref, step.x.data_ptr(), step.out.data_ptr(),
                                         *llama_geometry(block, step, mask), 1, None)


def llama_attention_half(lib, block, view, step, mask, mlp_input):
    """x + attention into step.out, the MLP's normalised input into mlp_input."""
    return lib.dejavu_llama_decode_layer(view.ref, step.x.data_ptr(), step.out.data_ptr(),
                                         *llama_geometry(block, step, mask), 0, mlp_input.data_ptr())


def llama_predicted_layer(lib, block, view, step, mask, k, predict_from_input):
    """The layer with DejaVu's predicted MLP keeping k neurons; its predictor reads the layer's
    input with predict_from_input, else the MLP's residual input."""
    call = view.predicted
    return lib.dejavu_llama_predicted_decode_layer(view.ref, call.mlp_ref, call.predictor_ref, k,
                                                   int(predict_from_input), step.x.data_ptr(), step.out.data_ptr(),
                                                   *llama_geometry(block, step, mask))


def opt_layer(lib, block, view, step, mask):
    return lib.dejavu_opt_decode_layer(view.ref, step.x.data_ptr(), step.out.data_ptr(), step.keys, step.values,
                                       step.head_stride, step.past, step.key_valid, block.head_dim**-0.5)


@dataclass(frozen=True)
class Family:
    """One model family's kernels: its view (slots, build: cpu_views) and its C calls."""

    slots: Callable
    build: Callable
    layer: Callable  # the whole layer, its dense MLP included
    attention_half: Optional[Callable] = None  # None: the family has no kernel for the half
    predicted_layer: Optional[Callable] = None  # None: no layer kernel with the predicted MLP


FAMILIES = {
    LlamaBlock: Family(cpu_views.llama_slots, cpu_views.build_llama_view, llama_layer, llama_attention_half,
                       llama_predicted_layer),
    OPTBlock: Family(cpu_views.opt_slots, cpu_views.build_opt_view, opt_layer),
}


def family_of(block):
    for cls in type(block).__mro__:
        family = FAMILIES.get(cls)
        if family is not None:
            return family
    return None


def _check(status, block):
    if status:
        raise RuntimeError(f"layer {block.layer_index}: the C decoder layer refused its input (status {status})")


# ---- the step ---------------------------------------------------------------------------------------------
def cpu_step(block, x, layer_past, mask):
    """(x, present) of one decoding step of `block` through the C kernels, or None where they do
    not apply: then the block's own forward runs, with the same numbers."""
    if not kernel_applies(x, layer_past) or type(block).tap is not TappedModule.tap:
        return None  # taps that record (the save variants) must see the torch ops
    family = family_of(block)
    lib = cpu_kernels.kernel_library() if family is not None else None
    if lib is None:
        return None
    taps, mlp = block.taps, block._modules["mlp"]
    if taps is None and isinstance(mlp, DenseMLP):
        view = cpu_views.layer_view(block, family.slots, family.build)
        if view is None or not view.has_mlp:
            return None
        step = begin_step(x, layer_past, mask)
        _check(family.layer(lib, block, view, step, mask), block)
        return step.out, step.present
    if isinstance(taps, sparse_execution.SparseTaps) and isinstance(mlp, sparse_execution.SparseMLP):
        return sparse_step(lib, family, block, taps, mlp, x, layer_past, mask)
    return None


def sparse_step(lib, family, block, taps, mlp, x, layer_past, mask):
    """cpu_step of a sparse block: only with every head kept, and an MLP the kernels run (dense,
    predicted at a fixed K, teal or cats, with gathering on); the taps get what the torch path
    gives them."""
    if taps.sparse_heads or not sparse_execution.MODES[mlp.mode].layer_kernel:
        return None
    dense, predicting = mlp.mode == "dense", mlp.mode == "predicted"
    k = mlp.kept if predicting else None
    if not dense and not mlp.use_gather or predicting and k is None:
        return None  # the classifier's positives, or --no-gather: the masked MLP in torch ops
    view = cpu_views.layer_view(block, family.slots, family.build)
    predicted = view.predicted if predicting and view is not None else None
    if view is None or (dense and not view.has_mlp) or (
            not dense and predicted is None and family.attention_half is None):
        return None
    if predicted is not None and not 1 <= k <= predicted.rows:
        raise ValueError(f"layer {block.layer_index}: cannot keep {k} of {predicted.rows} MLP neurons")
    step = begin_step(x, layer_past, mask)
    taps.begin(x, None)  # as the att_x tap: the next layer's look-ahead input
    if dense:
        _check(family.layer(lib, block, view, step, mask), block)
    elif predicted is not None:
        _check(family.predicted_layer(lib, block, view, step, mask, k, mlp.input_mode != "same"), block)
    else:  # teal, cats, or a predictor the layer kernel cannot read: the attention half here, then the MLP
        h = torch.empty_like(step.x)
        _check(family.attention_half(lib, block, view, step, mask, h), block)
        taps.inputs["mlp_x"] = step.out
        return step.out + mlp(h), step.present  # the MLP records what it kept
    taps.record({"neurons": None if dense else k / mlp.width}, None, x.shape[:-1])
    return step.out, step.present


def attention_half_step(block, x, layer_past, mask):
    """(x + attention, the MLP's normalised input, present) of a step through the family's
    attention-half kernel, or None where there is none (benchmarks time the MLP against it)."""
    family = family_of(block)
    lib = cpu_kernels.kernel_library() if kernel_applies(x, layer_past) and family is not None else None
    view = cpu_views.layer_view(block, family.slots, family.build) if lib is not None else None
    if view is None or family.attention_half is None:
        return None
    step = begin_step(x, layer_past, mask)
    h = torch.empty_like(step.x)
    _check(family.attention_half(lib, block, view, step, mask, h), block)
    return step.out, h, step.present


# ---- the modules the backend runs ---------------------------------------------------------------------
HUGE_PAGES_KEY = "in_huge_pages"  # module.__dict__ key: its weights were copied once already


def prepare_modules(*modules):
    """Ready modules for the cpu backend: their CPU weights copied into huge pages (once per
    module: decoding streams them every token), and every nn.Linear in them given the one-row
    kernel by becoming a CpuLinear (a subclass: same parameters, state-dict keys, isinstance)."""
    for module in modules:
        if not module.__dict__.get(HUGE_PAGES_KEY):
            move_to_huge_pages(module)
            module.__dict__[HUGE_PAGES_KEY] = True
        for linear in module.modules():
            if type(linear) is nn.Linear:
                linear.__class__ = CpuLinear


def release_modules(*modules):
    """Give the modules' CpuLinears back their plain nn.Linear forward (the other backends)."""
    for module in modules:
        for linear in module.modules():
            if type(linear) is CpuLinear:
                linear.__class__ = nn.Linear


@contextlib.contextmanager
def kernels_enabled(enabled):
    """The C decode kernels on or off for a block of calls (they read float32 CPU tensors only)."""
    previous = cpu_kernels.ENABLED
    cpu_kernels.ENABLED = enabled and previous
    try:
        yield
    finally:
        cpu_kernels.ENABLED = previous
