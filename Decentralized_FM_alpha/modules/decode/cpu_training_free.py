"""TEAL's and CATS's MLP for one decoding token through the C kernels (dejavu_teal_mlp,
dejavu_cats_mlp in decode_kernels.c): the cost each method really pays, measured, not only
counted (sparse_cost.py counts it).

  cats  gate read in full, then only the kept neurons' up rows and down columns: the packed
        layout of the gathered kernels (pack_mlp_neurons: a neuron's gate, up and down side by
        side) serves it as it is.
  teal  h's kept entries read their columns of gate and up, and the kept activations their
        columns of down: lay_out_teal stores gate and up transposed, side by side per input
        ([d, 2, I]: input j's columns of both are one run), and down transposed ([I, d]), so
        every column read is contiguous memory.

The layouts re-point the Linears' weights to strided views (same values, shapes and state-dict
keys), so the torch ops of the prompt and of every other path read the same numbers. Each
function returns None where the kernel does not apply (not one float32 CPU token, another
layout, autograd, no compiler): the caller's torch ops then give the same numbers.
"""

import ctypes

import torch
from torch import nn

from .. import cpu_kernels
from .huge_pages import huge_page_buffer
from .sparse_gather import OneCall, _autograd, derived, is_relu, is_silu, mlp_weights

NO_THRESHOLD = -1.0  # |x| > -1 holds for every x: the kernel keeps everything, as None does in torch


def _pointer(tensor):
    return None if tensor is None else tensor.data_ptr()


def threshold(value):
    return NO_THRESHOLD if value is None else float(value)


def _one_token(h, *linears):
    """h [1, 1, d] as a contiguous float32 CPU tensor for the kernels, or None (another shape,
    dtype or device, or autograd through h or the weights: the kernels keep no graph)."""
    if h.dtype != torch.float32 or not h.is_cpu or h.numel() != linears[0].in_features or _autograd(h, *linears):
        return None
    return h.contiguous()


def lay_out_teal(first, second, output):
    """Store first (gate / fc1) and second (up; None for OPT) as transposed views of one [d, n, I]
    buffer and output (down / fc2) as the transposed view of an [I, d] one. CPU tensors of one
    dtype the kernels read (float32, bfloat16, float16) only; returns whether it did (already laid
    out counts)."""
    linears = [first] if second is None else [first, second]
    weights = [linear.weight for linear in linears] + [output.weight]
    dtype = weights[0].dtype
    if cpu_kernels.weight_type(dtype) is None or any(w.dtype != dtype or w.device.type != "cpu" for w in weights):
        return False
    if teal_laid_out(first, second, output):
        return True
    inner, d = first.weight.shape
    with torch.no_grad():
        columns = huge_page_buffer(d * len(linears) * inner * dtype.itemsize).view(dtype).view(d, len(linears), inner)
        for slot, linear in enumerate(linears):
            columns[:, slot] = linear.weight.t()
        rows = huge_page_buffer(inner * d * dtype.itemsize).view(dtype).view(inner, d)
        rows.copy_(output.weight.t())
        for slot, linear in enumerate(linears):
            linear.weight = nn.Parameter(columns[:, slot].t(), requires_grad=linear.weight.requires_grad)
        output.weight = nn.Parameter(rows.t(), requires_grad=output.weight.requires_grad)
    return True


def teal_laid_out(first, second, output):
    """Whether the MLP's weights lie in lay_out_teal's layout (read from their strides)."""
    gate_t, down_t = first.weight.t(), output.weight.t()
    inner = first.weight.shape[0]
    return gate_t.stride(1) == 1 and down_t.is_contiguous() and (
        second is None or (second.weight.t().stride(1) == 1 and second.weight.t().stride(0) == gate_t.stride(0)
                           and second.weight.data_ptr() - first.weight.data_ptr()
                           == inner * first.weight.element_size()))


def _build_teal_view(first, second, output):
    """(TealWeights, the biases its pointers name) of an MLP in lay_out_teal's layout, or None."""
    if not teal_laid_out(first, second, output):
        return None
    gate_t, down_t = first.weight.t(), output.weight.t()
    inner, weights = first.weight.shape[0], cpu_kernels.weight_type(first.weight.dtype)
    if weights is None or first.weight.device.type != "cpu" or output.weight.dtype != first.weight.dtype or (
            second is not None and second.weight.dtype != first.weight.dtype):
        return None
    biases = [None if linear is None or linear.bias is None else linear.bias.detach().float().contiguous()
              for linear in (first, second, output)]
    view = cpu_kernels.TealWeights(in_t=gate_t.data_ptr(), gate_bias=_pointer(biases[0]), up_bias=_pointer(biases[1]),
                                   down_t=down_t.data_ptr(), down_bias=_pointer(biases[2]), ld_in=gate_t.stride(0),
                                   up_offset=0 if second is None else inner, ld_down=down_t.stride(0),
                                   d=first.weight.shape[1], inner=inner, weights=weights)
    return view, biases


def teal_weights(plan, first, second, output, act_fn):
    """A ctypes reference to TEAL's weights as the kernels read them (the TealWeights struct, kept
    by the plan), or None where they are not laid out for it or the activation is not the kernel's."""
    if not (is_silu(act_fn) if second is not None else is_relu(act_fn)):
        return None
    found = derived(plan, "teal_weights", first, lambda: _build_teal_view(first, second, output))
    return None if found is None else ctypes.byref(found[0])


def cats_weights(plan, first, second, output, act_fn):
    """A ctypes reference to the packed MLP as CATS's kernels read it, or None."""
    if second is None or not is_silu(act_fn):
        return None
    found = mlp_weights(plan, first, second, output, act_fn)[0]
    return None if found is None else found[1]


def _run_mlp(plan, method, kernel, weights_of, counted, h, first, second, output, act_fn, *thresholds):
    """(out [1, 1, d], *counts) of one token through the MLP kernel `kernel` (counted: how many
    counts it writes), or None where it does not apply."""
    plan = plan or OneCall()
    lib = cpu_kernels.kernel_library()
    weights = weights_of(plan, first, second, output, act_fn) if lib is not None else None
    hs = _one_token(h, first, second, output) if weights is not None else None
    if hs is None:
        return None
    out, kept = torch.empty(1, 1, output.out_features), torch.zeros(counted, dtype=torch.int64)
    status = getattr(lib, kernel)(weights, *(threshold(t) for t in thresholds), hs.data_ptr(), out.data_ptr(),
                                  kept.data_ptr())
    if status:
        raise RuntimeError(f"{method} kernel refused its input (status {status})")
    return (out, *(int(count) for count in kept))


def teal_mlp(plan, h, first, second, output, act_fn, t_in, t_down):
    """(out [1, 1, d], inputs kept, neurons kept) of TEAL for one token, or None."""
    return _run_mlp(plan, "TEAL", "dejavu_teal_mlp", teal_weights, 2, h, first, second, output, act_fn, t_in, t_down)


def cats_mlp(plan, h, first, second, output, act_fn, t_gate):
    """(out [1, 1, d], neurons kept) of CATS for one token, or None."""
    return _run_mlp(plan, "CATS", "dejavu_cats_mlp", cats_weights, 1, h, first, second, output, act_fn, t_gate)
