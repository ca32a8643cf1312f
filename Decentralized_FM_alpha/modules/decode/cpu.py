"""The cpu backend: decoding through the C kernels of decode_kernels.c (../cpu_kernels.py).

  CpuPlan                                      the backend's DecodePlan (plan.py): its stages, blocks, logits
  cpu_step(plan, block, x, layer_past, mask)   (x, present) of one token at batch 1 through a C
                                               decoder layer, or None: the block's forward runs
                                               instead (the same numbers)
  kernel_step(plan, block, x, layer_past)      that step checked and prepared once, to call per token
  DecodingSteps(plan, blocks)                  a sequence's decoding steps: each block's kernel_step
                                               prepared at its first token and reused
  kernel_applies(x, layer_past)                whether a step can go through a decoder-layer kernel

What a kernel step runs, by what the block holds:
  a dense block (no taps installed, a dense MLP): the whole layer in one call;
  a sparse block (taps at block.taps, an MLP with kernel_layer at block.mlp: sparse execution's)
  whose heads are all kept: what the MLP's mode says (SparseMode.kernel_layer): the whole layer
  with its dense MLP, with DejaVu's predicted MLP at a fixed K, or (Llama) with TEAL's or CATS's
  MLP, in the same call; or the attention half in one call and the MLP after it;
  nothing else: taps that record (the save variants), sparse heads, the other sparse modes.
Each family's view of its weights (cpu_views.py) and C calls are one entry of FAMILIES.
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .. import cpu_kernels
from ..common import DenseMLP, KVCache, TappedModule, _KVBuffers, step_geometry
from ..hf_llama_module import LlamaBlock
from ..hf_opt_module import OPTBlock
from . import cpu_views
from .plan import DecodePlan
from .sparse_gather import linear_forward
from .stages import DynamicCacheStage


ATTENTION_HALF_THEN_MLP = "attention half, then the MLP"  # a kernel_layer answer (see sparse_kernel_step)


class KernelStep(NamedTuple):
    """What a decoder-layer kernel's one-token step reads and writes."""

    x: torch.Tensor  # the token's input [1, 1, d], contiguous
    out: torch.Tensor  # where the kernel writes the layer's output
    present: KVCache  # the cache grown by the token: the kernel writes its keys and values
    cache: tuple  # the C calls' cache arguments: present's key and value buffer addresses
    #               ([1, kv_heads, capacity, head_dim]), floats from one head to the next, positions before the token
    where: tuple  # the family's arguments of the step's position (Family.geometry), shared by its layers
    held: tuple  # the tensors those arguments point into, alive while the step is


ACTIVATIONS = torch.float32  # what the kernels read and write besides the weights: x, caches, sums


def kernel_applies(x, layer_past):
    """Whether a decoder-layer kernel can take this step: x one CPU token at batch 1 over a KVCache
    of contiguous CPU buffers, without autograd. x and the cache may be in the model's half
    precision (its prompt ran in it): the step reads them as float32 (float32_cache)."""
    if (x.shape[:2] != (1, 1) or cpu_kernels.weight_type(x.dtype) is None or x.device.type != "cpu"
            or not isinstance(layer_past, KVCache) or torch.is_grad_enabled()):
        return False
    keys = layer_past.buffers.keys
    return cpu_kernels.weight_type(keys.dtype) is not None and keys.device.type == "cpu" and keys.is_contiguous()


def float32_cache(cache):
    """The cache with float32 buffers (a half-precision model's prompt wrote its own dtype): the
    kernels keep a layer's keys and values in float32. Once per layer and sequence."""
    if cache.buffers.keys.dtype == ACTIVATIONS:
        return cache
    keys, values = cache.keys.to(ACTIVATIONS), cache.values.to(ACTIVATIONS)
    buffers = _KVBuffers(keys, values, cache.buffers.keys.shape[2])
    return KVCache(buffers, 0).append(keys, values)


def parameter_dtype(module):
    """The dtype of a module's weights (its first floating-point parameter), or float32."""
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return ACTIVATIONS


def key_validity(mask, total):
    """uint8 [total]: which keys the one query of a batch-1 decoding step may see (its first row
    of `mask`), or None when it may see them all (no left padding). Once per step (begin_step's
    `shared`)."""
    if mask is None:
        return None
    valid = mask[0, :total].ne(0).to(torch.uint8)
    return None if bool(valid.all()) else valid.contiguous()


def _address(tensor):
    return None if tensor is None else tensor.data_ptr()


def cache_arguments(buffers):
    """(key buffer address, value buffer address, head stride) of a cache's buffers, read once."""
    arguments = getattr(buffers, "kernel_arguments", None)
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
    step's layers) is given, under `key` (position_key). A half-precision x or cache is read as
    float32 (the kernels' activations)."""
    layer_past = float32_cache(layer_past)
    past, present = layer_past.length, layer_past.grown(1)
    where = None if shared is None else shared.get(key)
    if where is None:
        where = family.geometry(block, mask, past)  # (arguments, the tensors they point into)
        if shared is not None:
            shared[key] = where
    x = x.to(ACTIVATIONS).contiguous()
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
    # layer_step's fields in order: x, x_out, the cache's (k, v, head stride, t), where's (cos, signed_sin, key_valid)
    layer_step = cpu_kernels.LayerStep(step.x.data_ptr(), step.out.data_ptr(), *step.cache, *step.where, scale)
    return lib.dejavu_llama_layer(view.ref, cpu_kernels.MlpStep(kind=cpu_kernels.MLP_DENSE), layer_step)


def llama_attention_half(lib, view, step, scale, mlp_input):
    """x + attention into step.out, the MLP's normalised input into mlp_input."""
    layer_step = cpu_kernels.LayerStep(step.x.data_ptr(), step.out.data_ptr(), *step.cache, *step.where, scale)
    mlp_step = cpu_kernels.MlpStep(kind=cpu_kernels.MLP_NONE, mlp_input=mlp_input.data_ptr())
    return lib.dejavu_llama_layer(view.ref, mlp_step, layer_step)


def llama_predicted_layer(lib, view, step, scale, k, predict_from_input):
    """The layer with DejaVu's predicted MLP keeping k neurons; its predictor reads the layer's
    input with predict_from_input, else the MLP's residual input."""
    call = view.predicted
    layer_step = cpu_kernels.LayerStep(step.x.data_ptr(), step.out.data_ptr(), *step.cache, *step.where, scale)
    mlp_step = cpu_kernels.MlpStep(kind=cpu_kernels.MLP_PREDICTED, mlp=cpu_kernels.struct_pointer(call.mlp_ref),
                                   predictor=cpu_kernels.struct_pointer(call.predictor_ref), k=k,
                                   predict_from_input=int(predict_from_input))
    return lib.dejavu_llama_layer(view.ref, mlp_step, layer_step)


def llama_teal_layer(lib, view, step, scale, weights, t_in, t_down, kept):
    """The layer with TEAL's MLP (weights: cpu_training_free.teal_weights); kept [2] gets the
    inputs and neurons it kept."""
    layer_step = cpu_kernels.LayerStep(step.x.data_ptr(), step.out.data_ptr(), *step.cache, *step.where, scale)
    mlp_step = cpu_kernels.MlpStep(kind=cpu_kernels.MLP_TEAL, teal=cpu_kernels.struct_pointer(weights), t_in=t_in,
                                   t_down=t_down, kept=kept.data_ptr())
    return lib.dejavu_llama_layer(view.ref, mlp_step, layer_step)


def llama_cats_layer(lib, view, step, scale, weights, t_gate, kept):
    """The layer with CATS's MLP (weights: cpu_training_free.cats_weights); kept [1] gets the
    neurons it kept."""
    layer_step = cpu_kernels.LayerStep(step.x.data_ptr(), step.out.data_ptr(), *step.cache, *step.where, scale)
    mlp_step = cpu_kernels.MlpStep(kind=cpu_kernels.MLP_CATS, mlp=cpu_kernels.struct_pointer(weights), t_gate=t_gate,
                                   kept=kept.data_ptr())
    return lib.dejavu_llama_layer(view.ref, mlp_step, layer_step)


def opt_layer(lib, view, step, scale):
    k_cache, v_cache, head_stride, t = step.cache
    (key_valid,) = step.where
    layer_step = cpu_kernels.LayerStep(x=step.x.data_ptr(), x_out=step.out.data_ptr(), k_cache=k_cache,
                                       v_cache=v_cache, head_stride=head_stride, t=t, key_valid=key_valid, scale=scale)
    return lib.dejavu_opt_layer(view.ref, cpu_kernels.MlpStep(kind=cpu_kernels.MLP_DENSE), layer_step)


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class Family:
    """One model family's kernels: its view's builder (cpu_views) and its C calls."""

    build: Callable
    geometry: Callable  # (block, mask, past) -> (the C calls' arguments of the step's position, tensors held)
    layer: Callable  # the whole layer, its dense MLP included
    attention_half: Optional[Callable] = None  # None: the family has no kernel for the half
    predicted_layer: Optional[Callable] = None  # None: no layer kernel with the predicted MLP
    teal_layer: Optional[Callable] = None  # None: none with TEAL's MLP
    cats_layer: Optional[Callable] = None  # None: none with CATS's MLP


FAMILIES = {
    LlamaBlock: Family(cpu_views.build_llama_view, llama_geometry, llama_layer, llama_attention_half,
                       llama_predicted_layer, llama_teal_layer, llama_cats_layer),
    OPTBlock: Family(cpu_views.build_opt_view, opt_geometry, opt_layer),
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
def cpu_step(plan, block, x, layer_past, mask, shared=None):
    """(x, present) of one decoding step of `block` through the C kernels, or None where they do
    not apply: then the block's own forward runs, with the same numbers. `shared`: a dict the
    step's layers share (begin_step)."""
    step = kernel_step(plan, block, x, layer_past)
    return None if step is None else step(x, layer_past, mask, shared)


def kernel_step(plan, block, x, layer_past):
    """step(x, layer_past, mask, shared=None, out=None) -> (x, present): the block's decoding step
    through the C kernels for a token and cache like x and layer_past, checked and prepared now
    (its kernel view from the plan, its path); None where the kernels do not apply. `shared`: a
    dict the step's layers share, `out`: where to write the layer's output (begin_step).
    DecodingSteps reuses the step for a sequence's tokens."""
    if not kernel_applies(x, layer_past) or type(block).tap is not TappedModule.tap:
        return None  # taps that record (the save variants) must see the torch ops
    family = family_of(block)
    lib = cpu_kernels.kernel_library() if family is not None else None
    if lib is None:
        return None
    taps, mlp = block.taps, block._modules["mlp"]
    if taps is None and isinstance(mlp, DenseMLP):
        view = cpu_views.layer_view(plan, block, family.build)
        if view is None or not view.has_mlp:
            return None
        layer, scale, key = family.layer, block.head_dim**-0.5, position_key(block, family)

        def dense_step(x, layer_past, mask, shared=None, out=None):
            step = begin_step(block, family, x, layer_past, mask, shared, key, out)
            _check(layer(lib, view, step, scale), block)
            return step.out, step.present
        return dense_step
    if taps is not None and hasattr(mlp, "kernel_layer"):
        return sparse_kernel_step(plan, lib, family, block, taps, mlp)
    return None


def sparse_kernel_step(plan, lib, family, block, taps, mlp):
    """kernel_step of a sparse block: only with every head kept, and as its MLP's mode says
    (kernel_layer); the taps get what the torch path gives them."""
    if taps.sparse_heads:
        return None
    views = []

    def view_of():  # built only for a mode that runs in the kernels
        if not views:
            views.append(cpu_views.layer_view(plan, block, family.build))
        return views[0]

    found = mlp.kernel_layer(plan, family, view_of)
    if found is None or (found == ATTENTION_HALF_THEN_MLP and family.attention_half is None):
        return None
    view = view_of()
    scale, key = block.head_dim**-0.5, position_key(block, family)
    if found != ATTENTION_HALF_THEN_MLP:
        run_layer, kept = found

        def layer_step(x, layer_past, mask, shared=None, out=None):
            step = begin_step(block, family, x, layer_past, mask, shared, key, out)
            taps.begin(x, None)  # as the att_x tap: the next layer's look-ahead input
            _check(run_layer(lib, view, step, scale), block)
            if taps.stats is not None:
                taps.record(kept(), None, x.shape[:-1])
            return step.out, step.present
        return layer_step

    half = attention_half(lib, family, view, block)

    dtype = parameter_dtype(mlp)

    def half_step(x, layer_past, mask, shared=None, out=None):  # an MLP the layer call cannot run
        taps.begin(x, None)
        x_mid, h, present = half(x, layer_past, mask, shared, out)
        taps.inputs["mlp_x"] = x_mid
        return x_mid + mlp(h.to(dtype)).to(ACTIVATIONS), present  # the MLP records what it kept
    return half_step


class DecodingSteps:
    """One sequence's decoding steps over a stage's blocks (the cpu backend's DynamicCacheStage):
    each block's kernel_step is prepared at the sequence's first token and reused for the
    following ones, since nothing can change a block's weights or settings between two tokens of
    one call, and the layers of a step share its position arguments. The checks, the view lookup
    and the per-layer lookups of the position are Python work done after the layer's weights have
    pushed its objects out of the CPU's caches, so they cost a visible part of a token
    (benchmarks/README.md). Blocks the kernels do not take run their forward.

    The kernel steps but the stage's last write into two buffers in turn instead of a new tensor
    each (an allocation costs for the same reason). A step's input is the
    buffer the step before wrote; the buffer is written again two kernel steps later, once the
    block after it (the only reader of its taps' look-ahead input) is done. The stage's output is
    always a new tensor: the caller keeps it (and a pipeline stage may still be sending it)."""

    def __init__(self, plan, blocks):
        self.plan, self.blocks = plan, list(blocks)
        self.reset()

    def reset(self):
        """A new sequence: its steps are prepared afresh at its first token."""
        self.steps = None
        self.dtypes = None  # each block's weights' dtype (a block that runs its forward reads x in it)
        self.buffers = None

    def run(self, x, caches, mask):
        """x after the blocks; caches (one per block) replaced by the grown ones. Around the kernel
        steps of a batch-1 token torch's own ops run on one thread (they are single-row, and its
        OpenMP workers would spin on the cores the kernels' workers need); a block that runs its
        forward gets torch's threads, and torch has its count back after the step."""
        if self.steps is None:
            self.steps = [kernel_step(self.plan, block, x, cache) for block, cache in zip(self.blocks, caches)]
            self.dtypes = [parameter_dtype(block) for block in self.blocks]
            self.buffers = (torch.empty_like(x, dtype=ACTIVATIONS), torch.empty_like(x, dtype=ACTIVATIONS))
        shared, written, last = {}, 0, len(self.blocks) - 1
        threads = torch.get_num_threads()
        single_row = x.shape[0] == 1 and threads > 1
        current = threads
        try:
            for index, (block, step) in enumerate(zip(self.blocks, self.steps)):
                wanted = 1 if single_row and step is not None else threads
                if wanted != current:
                    torch.set_num_threads(wanted)
                    current = wanted
                if step is None:  # in the block's dtype (a kernel step before it wrote float32)
                    x, caches[index] = block(x.to(self.dtypes[index]), layer_past=caches[index], mask=mask)
                    continue
                out = None if index == last else self.buffers[written % 2]
                x, caches[index] = step(x, caches[index], mask, shared, out)
                written += 1
        finally:
            if current != threads:
                torch.set_num_threads(threads)
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


def attention_half_step(plan, block, x, layer_past):
    """attention_half of the block for a token and cache like x and layer_past, checked and
    prepared as kernel_step prepares a layer (benchmarks time the MLP against it), or None where
    the family has no kernel for it."""
    family = family_of(block)
    lib = cpu_kernels.kernel_library() if kernel_applies(x, layer_past) and family is not None else None
    view = cpu_views.layer_view(plan, block, family.build) if lib is not None else None
    if view is None or family.attention_half is None:
        return None
    return attention_half(lib, family, view, block)


class CpuPlan(DecodePlan):
    """The cpu backend's plan: a float32 CPU token at batch 1 runs each block through its C layer
    call (kernel_step; the kernel views derived once per plan), one-row products (the sparse
    MLPs' kernels, the vocabulary projection) through the one-row kernel; everything else in
    torch ops."""

    def run_block(self, block, x, layer_past, mask, shared=None):
        """(x, present) of one block: its kernel step where one applies, else its forward (in the
        block's dtype: a kernel step before it wrote float32)."""
        stepped = cpu_step(self, block, x, layer_past, mask, shared)
        if stepped is not None:
            return stepped
        return block(x.to(parameter_dtype(block)), layer_past=layer_past, mask=mask)

    def new_stage(self, batch, capacity, device):
        return DynamicCacheStage(self, DecodingSteps(self, self.blocks))

    def logits(self, head, x, input_ids=None):
        """head(x): a single row's vocabulary projection (the widest product) through the kernel."""
        features = head.features(x.to(parameter_dtype(head)))
        return linear_forward(self, head.lm_head, features.to(ACTIVATIONS) if features.shape[:-1].numel() == 1
                              else features)
