"""The C kernels with bfloat16 and float16 weights (float32 activations and sums): a Linear's
one-row product, the dense MLP and the gathered MLP against torch's ops on the same weights, at
every thread count, in the native and the portable build; a weight type the kernels do not know
is refused.

Tolerance: the kernels read each half-precision weight exactly (widening to float32 is exact) and
sum in float32, so they match torch in float32 on the weights widened (`.float()`) to float32
rounding (relative 1e-5 here). Torch's own ops in the half dtype round their inputs and outputs
to it as well, and are matched to that dtype's precision (relative 2^-7 for bfloat16, 2^-10 for
float16, times a small factor for the sums)."""

import copy
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
def lib(kernel_lib):
    return kernel_lib


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


def training_free_mlp(dtype, gated, d=140, width=1100):
    """Random gate/up/down in `dtype` (widths not multiples of eight: the rows' tails) and the
    same weights widened to float32."""
    torch.manual_seed(5)
    made = [nn.Linear(d, width), nn.Linear(d, width) if gated else None, nn.Linear(width, d)]
    half = [None if m is None else m.to(dtype).requires_grad_(False) for m in made]
    wide = [None if m is None else copy.deepcopy(m).float() for m in half]
    return half, wide, nn.SiLU() if gated else nn.ReLU()


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("gated", [True, False])
def test_teal_in_half_precision(dtype, gated, split_everything):
    """TEAL's kernel over half-precision columns (laid out in their dtype) against the masked
    torch ops on the widened weights."""
    from dejavu_llama.modules.decode.cpu_training_free import lay_out_teal, teal_mlp

    (gate, up, down), (wide_gate, wide_up, wide_down), act_fn = training_free_mlp(dtype, gated)
    assert lay_out_teal(gate, up, down) and gate.weight.dtype == dtype
    h = torch.randn(1, 1, gate.in_features)
    for keep_in, keep_down in ((0.9, 0.5), (0.15, 0.3)):
        t_in = float(h.abs().quantile(1 - keep_in))
        with torch.no_grad():
            masked = h * (h.abs() > t_in)
            act = act_fn(wide_gate(masked)) * (wide_up(masked) if gated else 1.0)
            t_down = float(act.abs().quantile(1 - keep_down))
            reference = wide_down(act * (act.abs() > t_down))
        out = at_every_thread_count(lambda: teal_mlp(None, h, gate, up, down, act_fn, t_in, t_down)[0])
        close(out, reference, 1e-5)


@pytest.mark.parametrize("dtype", HALVES)
def test_cats_in_half_precision(dtype, split_everything):
    from dejavu_llama.modules.decode.cpu_training_free import cats_mlp
    from dejavu_llama.modules.decode.sparse_gather import pack_mlp_neurons

    (gate, up, down), (wide_gate, wide_up, wide_down), act_fn = training_free_mlp(dtype, True)
    assert pack_mlp_neurons(gate, up, down) and gate.weight.dtype == dtype
    h = torch.randn(1, 1, gate.in_features)
    with torch.no_grad():
        act = act_fn(wide_gate(h))
        t_gate = float(act.abs().quantile(0.6))
        reference = wide_down(act * wide_up(h) * (act.abs() > t_gate))
    out = at_every_thread_count(lambda: cats_mlp(None, h, gate, up, down, act_fn, t_gate)[0])
    close(out, reference, 1e-5)


def kernel_steps_counted(monkeypatch):
    """A list that gets each block's kernel step (None where the block ran its forward)."""
    from dejavu_llama.modules.decode import cpu

    made, real = [], cpu.kernel_step

    def counting(*args):
        step = real(*args)
        made.append(step)
        return step
    monkeypatch.setattr(cpu, "kernel_step", counting)
    return made


def decode_logits(model, prompt, backend, steps=4):
    """Each decoded token's logits (float32) and a greedy continuation."""
    with torch.inference_mode():
        tokens, logprobs = model.generate_greedy(prompt, steps, backend=backend, with_logprobs=True)
    return tokens, logprobs


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_half_precision_model_decodes_through_the_kernels(dtype, family, split_everything, tmp_path, monkeypatch):
    """A model loaded in half precision: its prompt runs in torch in that dtype, each decoded
    token through the C layers (weights as loaded, activations and caches float32), the same at
    every thread count; its tokens and log-probabilities are torch's own in that dtype, to the
    dtype's precision."""
    from tiny_models import tiny_llama, tiny_opt
    from dejavu_llama.modules.local_model import LocalModel

    checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, family, dtype=dtype, backend="cpu")
    assert model.blocks[0].self_attn.q_proj.weight.dtype == dtype
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    steps = kernel_steps_counted(monkeypatch)
    tokens, logprobs = at_every_thread_count(lambda: torch.cat([t.float() for t in decode_logits(model, prompt, "cpu")]))\
        .split(1)
    # each of the three runs prepares every layer's decoding step in the kernels (its prompt: torch)
    assert sum(step is not None for step in steps) == 3 * len(model.blocks)
    reference_tokens, reference_logprobs = decode_logits(model, prompt, "torch")
    assert torch.equal(tokens.long(), reference_tokens)
    close(logprobs, reference_logprobs.float(), 8 * HALF_TOLERANCE[dtype])


@torch.no_grad()
def thresholds_keeping(model, mode, keep, dtype):
    """Per layer, thresholds that keep about `keep` of random inputs' entries (as calibrated ones)."""
    h = torch.randn(1, 64, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    found = {}
    for block in model.blocks:
        first, _, _, act_fn = block.mlp.neuron_linears()
        if mode == "cats":
            found[block.layer_index] = {"t_gate": float(act_fn(first(h)).float().abs().quantile(1 - keep))}
        else:
            act = block.mlp.activation(h).float()
            found[block.layer_index] = {"t_in": float(h.float().abs().quantile(1 - keep)),
                                        "t_down": float(act.abs().quantile(1 - keep))}
    return found


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("mode", ["predicted", "teal", "cats"])
def test_sparse_modes_decode_a_half_precision_model_through_the_kernels(dtype, mode, split_everything, tmp_path,
                                                                        monkeypatch):
    """DejaVu's predicted MLP, TEAL and CATS in a half-precision model: each decoded token's
    layers in the C kernels (the MLP's weights packed or laid out in their dtype), the same
    tokens and, to the dtype's precision, log-probabilities as the torch ops in that dtype."""
    from tiny_models import tiny_llama
    from dejavu_llama.modules.local_model import LocalModel
    from dejavu_llama.modules.sparse_execution import configure_sparse

    model = LocalModel.from_checkpoint(tiny_llama(tmp_path)[1], "llama-ml-att-sparse", dtype=dtype)
    torch.manual_seed(5)
    options = dict(mlp_keep=0.5, sparse_attention=False)
    if mode == "predicted":
        options["predictors"] = {("mlp", layer): (nn.Sequential(nn.Linear(48, 16, bias=False),
                                                                nn.Linear(16, 112, bias=False)), "same")
                                 for layer in range(len(model.blocks))}
    else:
        options["thresholds"] = thresholds_keeping(model, mode, 0.5, dtype)
    configure_sparse(list(model.blocks), mode, **options)
    assert model.blocks[0].mlp.neuron_linears()[0].weight.dtype == dtype
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(6))
    steps = kernel_steps_counted(monkeypatch)
    tokens, logprobs = decode_logits(model, prompt, "cpu", steps=6)
    assert sum(step is not None for step in steps) == len(model.blocks)
    reference_tokens, reference_logprobs = decode_logits(model, prompt, "torch", steps=6)
    assert torch.equal(tokens, reference_tokens)
    close(logprobs.float(), reference_logprobs.float(), 8 * HALF_TOLERANCE[dtype])


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are"]


def test_bfloat16_greedy_tokens_against_transformers(smollm2_checkpoint, smollm2_tokenizer, split_everything):
    """SmolLM2 in bfloat16 through the cpu backend, 32 greedy tokens on 4 prompts. Its decoding
    keeps float32 activations, so it matches transformers in float32 on the same (bfloat16-rounded)
    weights token for token; against transformers computing in bfloat16 it may part only where
    that model's two best logits tie at bfloat16's resolution (measured: at 2 of 4 prompts)."""
    from transformers import AutoModelForCausalLM

    from dejavu_common.helpers import embedded_gguf
    from dejavu_llama.modules.local_model import LocalModel

    folder, gguf_file = embedded_gguf()
    rounded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()
    with torch.no_grad():
        for parameter in rounded.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    in_bfloat16 = copy.deepcopy(rounded).to(torch.bfloat16)
    for model in (rounded, in_bfloat16):
        model.generation_config.eos_token_id = None  # 32 tokens, none suppressed
    ours = LocalModel.from_checkpoint(smollm2_checkpoint, "llama", dtype=torch.bfloat16, backend="cpu")
    for prompt in PROMPTS:
        ids = torch.tensor([smollm2_tokenizer.encode(prompt)])
        with torch.inference_mode():
            tokens = ours.generate_greedy(ids, 32, backend="cpu")[0]
            options = dict(max_new_tokens=32, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
            assert torch.equal(tokens, rounded.generate(ids, **options)[0, ids.shape[1]:]), prompt
            theirs = in_bfloat16.generate(ids, **options)[0, ids.shape[1]:]
            parted = (tokens != theirs).nonzero()
            if len(parted):
                at = int(parted[0])
                logits = in_bfloat16(torch.cat([ids[0], theirs[:at]])[None]).logits[0, -1].float()
                best, second = logits.topk(2).values.tolist()
                assert best - second <= 2 * 2.0**-7 * abs(best), (prompt, at, best, second)
