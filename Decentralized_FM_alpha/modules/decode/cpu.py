"""The cpu backend: decoding through the C kernels of decode_kernels.c (../cpu_kernels.py).

  cpu_step(block, x, layer_past, mask)   (x, present) of one token at batch 1 through a C
                                         decoder layer, or None: the block's forward runs
                                         instead (the same numbers)
  kernel_step(block, x, layer_past)      that step checked and prepared once, to call per token
  DecodingSteps(blocks)                  a sequence's decoding steps: each block's kernel_step
                                         prepared at its first token and reused
  kernel_applies(x, layer_past)          whether a step can go through a decoder-layer kernel
  prepare_modules / release_modules      the modules the backend runs, readied and given back
  kernels_enabled(on)                    the kernels on or off for a block of calls

What a kernel step runs, by what the block holds:
  a dense block (no taps installed, a dense MLP): the whole layer in one call;
  a sparse block (sparse_execution: SparseTaps at block.taps, SparseMLP at block.mlp) whose
  heads are all kept: the whole layer with its dense MLP, with DejaVu's predicted MLP at a
  fixed K, or (Llama) with TEAL's or CATS's MLP, in the same call; where the kernel cannot read
  the predictor or the layout, the attention half in one call and the MLP after it;
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
from . import cpu_training_free, cpu_views
from .huge_pages import move_to_huge_pages
from .sparse_gather import CpuLinear


class KernelStep(NamedTuple):
    """What a decoder-layer kernel's one-token step reads and writes."""

    x: torch.Tensor  # the token's input [1, 1, d], contiguous
    out: torch.Tensor  # where the kernel writes the layer's output
    present: KVCache  # the cache grown by the token: the kernel writes its keys and values
    cache: tuple  # the C calls' cache arguments: present's key and value buffer addresses
    #               ([1, kv_heads, capacity, head_dim]), floats from one head to the next, positions before the token
    where: tuple  # the family's arguments of the step's position (Family.geometry), shared by its layers
    held: tuple  # the tensors those arguments point into, alive while the step is


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


def _address(tensor):
    return None if tensor is None else tensor.data_ptr()


def cache_arguments(buffers):
    """(key buffer address, value buffer address, head stride) of a cache's buffers, read once."""
    arguments = buffers.__dict__.get("kernel_arguments")
    if arguments is None:
        keys = buffers.keys
        arguments = buffers.kernel_arguments = (keys.data_ptr(), buffers.values.data_ptr(), keys.stride(1))
    return arguments


def position_key(block, family):
    """What decides a block's position arguments besides the step: its family and RoPE."""
    return family, getattr(block, "rope_key", None)


def begin_step(block, family, x, layer_past, mask, shared=None, key=None, out=None):
    """The KernelStep of a token: its cache grown, an output to write (`out`, else a new tensor),
    and the family's position arguments, computed once per step where `shared` (a dict for the
    step's layers) is given, under `key` (position_key)."""
    past, present = layer_past.length, layer_past.grown(1)
    where = None if shared is None else shared.get(key)
    if where is None:
        where = family.geometry(block, mask, past)  # (arguments, the tensors they point into)
        if shared is not None:
            shared[key] = where
    x = x.contiguous()
    out = torch.empty_like(x) if out is None else out
    return KernelStep(x, out, present, (*cache_arguments(present.buffers), past), *where)


# ---- each family's position arguments and C calls: (lib, view, step, scale, ...) -> status (0: done) ----
def llama_geometry(block, mask, past):
    """(RoPE cos and sign-folded sin addresses, key mask address), and the tensors behind them."""
    positions, _ = step_geometry(mask, past, 1, torch.device("cpu"))
    cos, _, signed_sin = block.rope_tables(positions, torch.float32)
    valid = key_validity(mask, past + 1)
    return (cos.data_ptr(), signed_sin.data_ptr(), _address(valid)), (cos, signed_sin, valid)


def opt_geometry(block, mask, past):
    valid = key_validity(mask, past + 1)
    return (_address(valid),), (valid,)


def llama_layer(lib, view, step, scale):
    return lib.dejavu_llama_decode_layer(view.ref, step.x.data_ptr(), step.out.data_ptr(), *step.cache, *step.where,
                                         scale, 1, None)


def llama_attention_half(lib, view, step, scale, mlp_input):
    """x + attention into step.out, the MLP's normalised input into mlp_input."""
    return lib.dejavu_llama_decode_layer(view.ref, step.x.data_ptr(), step.out.data_ptr(), *step.cache, *step.where,
                                         scale, 0, mlp_input.data_ptr())


def llama_predicted_layer(lib, view, step, scale, k, predict_from_input):
    """The layer with DejaVu's predicted MLP keeping k neurons; its predictor reads the layer's
    input with predict_from_input, else the MLP's residual input."""
    call = view.predicted
    return lib.dejavu_llama_predicted_decode_layer(view.ref, call.mlp_ref, call.predictor_ref, k,
                                                   int(predict_from_input), step.x.data_ptr(), step.out.data_ptr(),
                                                   *step.cache, *step.where, scale)


def llama_teal_layer(lib, view, step, scale, weights, t_in, t_down, kept):
    """The layer with TEAL's MLP (weights: cpu_training_free.teal_weights); kept [2] gets the
    inputs and neurons it kept."""
    return lib.dejavu_llama_teal_decode_layer(view.ref, weights, t_in, t_down, kept.data_ptr(), step.x.data_ptr(),
                                              step.out.data_ptr(), *step.cache, *step.where, scale)


def llama_cats_layer(lib, view, step, scale, weights, t_gate, kept):
    """The layer with CATS's MLP (weights: cpu_training_free.cats_weights); kept [1] gets the
    neurons it kept."""
    return lib.dejavu_llama_cats_decode_layer(view.ref, weights, t_gate, kept.data_ptr(), step.x.data_ptr(),
                                              step.out.data_ptr(), *step.cache, *step.where, scale)


def opt_layer(lib, view, step, scale):
    return lib.dejavu_opt_decode_layer(view.ref, step.x.data_ptr(), step.out.data_ptr(), *step.cache, *step.where,
                                       scale)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Family:
    """One model family's kernels: its view (slots, build: cpu_views) and its C calls."""

    slots: Callable
    build: Callable
    geometry: Callable  # (block, mask, past) -> (the C calls' arguments of the step's position, tensors held)
    layer: Callable  # the whole layer, its dense MLP included
    attention_half: Optional[Callable] = None  # None: the family has no kernel for the half
    predicted_layer: Optional[Callable] = None  # None: no layer kernel with the predicted MLP
    teal_layer: Optional[Callable] = None  # None: none with TEAL's MLP
    cats_layer: Optional[Callable] = None  # None: none with CATS's MLP


FAMILIES = {
    LlamaBlock: Family(cpu_views.llama_slots, cpu_views.build_llama_view, llama_geometry, llama_layer,
                       llama_attention_half, llama_predicted_layer, llama_teal_layer, llama_cats_layer),
    OPTBlock: Family(cpu_views.opt_slots, cpu_views.build_opt_view, opt_geometry, opt_layer),
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


# ---- the step ----------------------------------------------------------------------------------------------
def cpu_step(block, x, layer_past, mask):
    """(x, present) of one decoding step of `block` through the C kernels, or None where they do
    not apply: then the block's own forward runs, with the same numbers."""
    step = kernel_step(block, x, layer_past)
    return None if step is None else step(x, layer_past, mask)


def kernel_step(block, x, layer_past):
    """step(x, layer_past, mask, shared=None, out=None) -> (x, present): the block's decoding step
    through the C kernels for a token and cache like x and layer_past, checked and prepared now
    (its kernel view, its path); None where the kernels do not apply. `shared`: a dict the step's
    layers share, `out`: where to write the layer's output (begin_step). DecodingSteps reuses
    the step for a sequence's tokens."""
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
        layer, scale, key = family.layer, block.head_dim**-0.5, position_key(block, family)

        def dense_step(x, layer_past, mask, shared=None, out=None):
            step = begin_step(block, family, x, layer_past, mask, shared, key, out)
            _check(layer(lib, view, step, scale), block)
            return step.out, step.present
        return dense_step
    if isinstance(taps, sparse_execution.SparseTaps) and isinstance(mlp, sparse_execution.SparseMLP):
        return sparse_kernel_step(lib, family, block, taps, mlp)
    return None


def sparse_kernel_step(lib, family, block, taps, mlp):
    """kernel_step of a sparse block: only with every head kept, and an MLP the kernels run (dense,
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
    scale, key = block.head_dim**-0.5, position_key(block, family)
    run_layer, kept = layer_call(lib, family, view, mlp, scale, k, dense, predicted)
    if run_layer is not None:
        def layer_step(x, layer_past, mask, shared=None, out=None):
            step = begin_step(block, family, x, layer_past, mask, shared, key, out)
            taps.begin(x, None)  # as the att_x tap: the next layer's look-ahead input
            _check(run_layer(step), block)
            if taps.stats is not None:
                taps.record(kept(), None, x.shape[:-1])
            return step.out, step.present
        return layer_step

    half = attention_half(lib, family, view, block)

    def half_step(x, layer_past, mask, shared=None, out=None):  # teal, cats, or a predictor the layer kernel cannot read
        taps.begin(x, None)
        x_mid, h, present = half(x, layer_past, mask, shared, out)
        taps.inputs["mlp_x"] = x_mid
        return x_mid + mlp(h), present  # the MLP records what it kept
    return half_step


def layer_call(lib, family, view, mlp, scale, k, dense, predicted):
    """(run_layer(step) -> status, kept() -> what --sparse-stats counts) of a sparse block whose
    whole layer one kernel call runs (its dense MLP, DejaVu's predicted MLP, TEAL's or CATS's),
    or (None, None) where none does."""
    if dense:
        return (lambda step: family.layer(lib, view, step, scale)), (lambda: {"neurons": None})
    if predicted is not None:
        from_input = mlp.input_mode != "same"
        return ((lambda step: family.predicted_layer(lib, view, step, scale, k, from_input)),
                (lambda: {"neurons": k / mlp.width}))
    linears = mlp.neuron_linears()
    if mlp.mode == "teal" and family.teal_layer is not None:
        weights = cpu_training_free.teal_weights(*linears)
        if weights is not None:
            t_in, t_down = (cpu_training_free.threshold(mlp.thresholds[name]) for name in ("t_in", "t_down"))
            counts, d = torch.zeros(2, dtype=torch.int64), linears[0].in_features
            return ((lambda step: family.teal_layer(lib, view, step, scale, weights, t_in, t_down, counts)),
                    (lambda: {"in": int(counts[0]) / d, "down": int(counts[1]) / mlp.width}))
    if mlp.mode == "cats" and family.cats_layer is not None:
        weights = cpu_training_free.cats_weights(*linears)
        if weights is not None:
            t_gate, counts = cpu_training_free.threshold(mlp.thresholds["t_gate"]), torch.zeros(1, dtype=torch.int64)
            return ((lambda step: family.cats_layer(lib, view, step, scale, weights, t_gate, counts)),
                    (lambda: {"neurons": int(counts[0]) / mlp.width}))
    return None, None


class DecodingSteps:
    """One sequence's decoding steps over a stage's blocks (the cpu backend's DynamicCacheStage):
    each block's kernel_step is prepared at the sequence's first token and reused for the
    following ones, since nothing can change a block's weights or settings between two tokens of
    one call, and the layers of a step share its position arguments. The checks, the view lookup
    and the per-layer lookups of the position are Python work done after the layer's weights have
    pushed its objects out of the CPU's caches: about 40 us a layer (SmolLM2, 2 threads), 5-10% of
    a token. Blocks the kernels do not take run their forward.

    The kernel steps but the stage's last write into two buffers in turn instead of a new tensor
    each (allocating one cost about 12 us a layer, for the same reason). A step's input is the
    buffer the step before wrote; the buffer is written again two kernel steps later, once the
    block after it (the only reader of its taps' look-ahead input) is done. The stage's output is
    always a new tensor: the caller keeps it (and a pipeline stage may still be sending it)."""

    def __init__(self, blocks):
        self.blocks = list(blocks)
        self.steps = None
        self.buffers = None

    def run(self, x, caches, mask):
        """x after the blocks; caches (one per block) replaced by the grown ones."""
        if self.steps is None:
            self.steps = [kernel_step(block, x, cache) for block, cache in zip(self.blocks, caches)]
            self.buffers = (torch.empty_like(x), torch.empty_like(x))
        shared, written, last = {}, 0, len(self.blocks) - 1
        for index, (block, step) in enumerate(zip(self.blocks, self.steps)):
            if step is None:
                x, caches[index] = block(x, layer_past=caches[index], mask=mask)
                continue
            out = None if index == last else self.buffers[written % 2]
            x, caches[index] = step(x, caches[index], mask, shared, out)
            written += 1
        return x


def attention_half(lib, family, view, block):
    """half(x, layer_past, mask, shared=None, out=None) -> (x + attention, the MLP's normalised
    input, present): the block's attention half through the family's kernel."""
    scale, key = block.head_dim**-0.5, position_key(block, family)

    def half(x, layer_past, mask, shared=None, out=None):
        step = begin_step(block, family, x, layer_past, mask, shared, key, out)
        h = torch.empty_like(step.x)
        _check(family.attention_half(lib, view, step, scale, h), block)
        return step.out, h, step.present
    return half


def attention_half_step(block, x, layer_past):
    """attention_half of the block for a token and cache like x and layer_past, checked and
    prepared as kernel_step prepares a layer (benchmarks time the MLP against it), or None where
    the family has no kernel for it."""
    family = family_of(block)
    lib = cpu_kernels.kernel_library() if kernel_applies(x, layer_past) and family is not None else None
    view = cpu_views.layer_view(block, family.slots, family.build) if lib is not None else None
    if view is None or family.attention_half is None:
        return None
    return attention_half(lib, family, view, block)


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
def torch_single_threaded():
    """torch's intra-op threads at 1 for a block of calls (a decoding step's). Its ops there are
    single-row, too small to gain from threads, and after each one torch's OpenMP workers spin on
    the cores the C kernels' workers need: at 2 threads SmolLM2 decoded 41.5 tok/s instead of 37.6
    with it, and WINA's masked MLP (torch ops between kernel calls) 23.7 instead of 14.4."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def kernels_enabled(enabled):
    """The C decode kernels on or off for a block of calls (they read float32 CPU tensors only)."""
    previous = cpu_kernels.ENABLED
    cpu_kernels.ENABLED = enabled and previous
    try:
        yield
    finally:
        cpu_kernels.ENABLED = previous
