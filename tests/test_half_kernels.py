"""The C kernels with bfloat16 and float16 weights (float32 activations and sums): a Linear's
one-row product, the dense MLP and the gathered MLP against torch's ops on the same weights, at
every thread count, in the native and the portable build; a weight type the kernels do not know
is refused.

Tolerance: the kernels read each half-precision weight exactly (widening to float32 is exact) and
sum in float32, so they match torch in float32 on the weights widened (`.float()`) to float32
rounding (relative 1e-5 here). Torch's own ops in the half dtype round their inputs and outputs
to it as well, and are matched to that dtype's precision (relative 2^-7 for bfloat16, 2^-10 for
float16, times a small factor for the sums)."""

import ctypes

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dejavu_llama.modules import cpu_kernels
from dejavu_llama.modules.decode.sparse_gather import (dense_mlp, gathered_mlp, gathered_mlp_torch, linear_forward,
                                                       predicted_gathered_mlp)

HALVES = [torch.bfloat16, torch.float16]
# relative error of torch's own op in that dtype against ours (its rounding of inputs and output)
HALF_TOLERANCE = {torch.bfloat16: 4 * 2.0**-8, torch.float16: 4 * 2.0**-11}


@pytest.fixture(scope="module")
def lib():
    lib = cpu_kernels.kernel_library()
    if lib is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    return lib


@pytest.fixture
def split_everything(lib):
    """Any product split over the threads; the thread count restored after."""
    threads, chunk = cpu_kernels.num_threads(), cpu_kernels.set_min_chunk(1)
    yield
    cpu_kernels.set_min_chunk(chunk)
    cpu_kernels.set_num_threads(threads)


def at_every_thread_count(run):
    outputs = []
    for threads in (1, 2, 3):
        cpu_kernels.set_num_threads(threads)
        with torch.inference_mode():  # as decoding runs (no autograd: the kernels apply)
            outputs.append(run())
    for output in outputs[1:]:
        assert torch.equal(output, outputs[0])
    return outputs[0]


def linears(dtype, d=40, inner=72, gated=True, bias=False, seed=0):
    """gate, up (None without gated), down in `dtype`, and the same weights widened to float32."""
    torch.manual_seed(seed)
    made = [nn.Linear(d, inner, bias=bias), nn.Linear(d, inner, bias=bias) if gated else None,
            nn.Linear(inner, d, bias=bias)]
    wide = [None if m is None else m.float() for m in made]
    half = [None if m is None else nn.Linear(m.in_features, m.out_features, bias=bias).to(dtype) for m in made]
    with torch.no_grad():
        for h, w in zip(half, wide):
            if h is not None:
                h.weight.copy_(w.weight)
                w.weight.copy_(h.weight.float())  # the very values the half layer holds
                if bias:
                    h.bias.copy_(w.bias)
                    w.bias.copy_(h.bias.float())
    return half, wide


def close(got, want, rtol):
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= rtol * max(scale, 1e-6), (got - want).abs().max().item()


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("bias", [False, True])
def test_a_linear_row_in_half_precision(dtype, bias, split_everything):
    (layer, _, _), (wide, _, _) = linears(dtype, d=37, inner=53, bias=bias)  # odd widths: the scalar tails too
    x = torch.randn(1, 1, 37)
    out = at_every_thread_count(lambda: linear_forward(None, layer, x))
    assert out.dtype == torch.float32
    close(out, F.linear(x, wide.weight, wide.bias), 1e-5)
    with torch.no_grad():
        close(out, F.linear(x.to(dtype), layer.weight, layer.bias).float(), HALF_TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("gated", [True, False])
def test_the_dense_mlp_in_half_precision(dtype, gated, split_everything):
    (gate, up, down), (wide_gate, wide_up, wide_down) = linears(dtype, gated=gated, bias=not gated)
    act = F.silu if gated else F.relu
    h = torch.randn(1, 1, 40)
    out = at_every_thread_count(lambda: dense_mlp(None, h, gate, up, down, act))
    with torch.no_grad():
        hidden = act(wide_gate(h)) * wide_up(h) if gated else act(wide_gate(h))
        close(out, wide_down(hidden), 1e-5)


@pytest.mark.parametrize("dtype", HALVES)
def test_the_gathered_mlp_in_half_precision(dtype, split_everything):
    half, wide = linears(dtype, inner=96)
    h = torch.randn(2, 1, 40)
    neurons = torch.stack([torch.randperm(96)[:37].sort().values, torch.randperm(96)[:37].sort().values])
    out = at_every_thread_count(lambda: gathered_mlp(None, h, neurons, *half, F.silu))
    with torch.no_grad():
        close(out, gathered_mlp_torch(h, neurons, *wide, F.silu), 1e-5)


@pytest.mark.parametrize("dtype", HALVES)
def test_the_predicted_mlp_reads_half_precision_rows(dtype, split_everything):
    half, wide = linears(dtype, inner=96)
    torch.manual_seed(1)
    predictor = nn.Sequential(nn.Linear(40, 16, bias=False), nn.Linear(16, 96, bias=False))
    h, x = torch.randn(1, 1, 40), torch.randn(1, 1, 40)
    out = at_every_thread_count(lambda: predicted_gathered_mlp(None, h, x, predictor, 24, *half, F.silu))
    with torch.no_grad():
        kept = predictor(x).reshape(1, -1).topk(24).indices.sort().values
        close(out, gathered_mlp_torch(h, kept, *wide, F.silu), 1e-5)


def test_an_unknown_weight_type_is_refused(lib):
    weights = torch.zeros(8, 8)
    h, out = torch.zeros(8), torch.zeros(8)
    assert lib.dejavu_gathered_dots(weights.data_ptr(), 8, None, 0, None, None, None, 8, 8, 8, h.data_ptr(),
                                    out.data_ptr(), 0, 3) == 1
    table = cpu_kernels.MlpWeights(A=weights.data_ptr(), T=weights.data_ptr(), lda=8, ldt=8, rows=8, d=8, weights=7)
    index = torch.arange(4)
    assert lib.dejavu_gathered_mlp(ctypes.byref(table), index.data_ptr(), 4, h.data_ptr(), out.data_ptr()) == 1
    assert cpu_kernels.weight_type(torch.float64) is None
    assert cpu_kernels.weight_type(torch.bfloat16) == cpu_kernels.ABI.constants["WEIGHTS_BF16"]


@pytest.mark.parametrize("dtype", HALVES)
def test_the_portable_build_reads_half_weights_as_the_native_one(dtype, lib):
    """The portable build (no AVX2 or F16C: one element at a time) widens the same values."""
    portable = cpu_kernels.compile_library(cpu_kernels.FLAG_SETS[-1:])
    portable.dejavu_set_threads(2)
    assert portable.dejavu_weight_paths() == 0
    (layer, _, _), (wide, _, _) = linears(dtype, d=45, inner=30)
    special = torch.tensor([0.0, -0.0, 1e-6, -3e-5, 65000.0, 1.0e-38], dtype=torch.float32).to(dtype)
    with torch.no_grad():  # zeros, subnormals and the largest values of the type in the rows
        layer.weight[0, :6] = special
        wide.weight[0, :6] = special.float()
    x = torch.randn(45)
    outs = []
    for library in (lib, portable):
        out = torch.empty(30)
        assert library.dejavu_gathered_dots(layer.weight.data_ptr(), 45, None, 0, None, None, None, 30, 30, 45,
                                            x.data_ptr(), out.data_ptr(), 0, cpu_kernels.weight_type(dtype)) == 0
        outs.append(out)
    close(outs[1], outs[0], 1e-5)
    close(outs[0], wide.weight @ x, 1e-5)
