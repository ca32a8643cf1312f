"""The C decode kernels on several threads: every entry point gives bitwise the same outputs on
1, 2 and 3 threads (each output is computed by one thread, in the same order), and the torch
path's to float32 tolerance. The tiny models' products are far below the work the pool gives
one thread, so these tests let it split any product (cpu_kernels.set_min_chunk(1))."""

import multiprocessing
import threading

import pytest
import torch
from torch import nn

from dejavu_llama.modules import cpu_kernels
from dejavu_llama.modules.decode import choose_backend
from dejavu_llama.modules.decode.cpu_views import view_of
from dejavu_llama.modules.decode.sparse_gather import (dense_mlp, gathered_mlp, gathered_mlp_torch, linear_forward,
                                                       pack_mlp_neurons, predicted_gathered_mlp, round_predictor)
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.modules.sparse_execution import configure_sparse, kept_count
from tiny_models import tiny_llama, tiny_opt

THREADS = (1, 2, 3)


def same_at_every_thread_count(run):
    """run() at 1, 2 and 3 kernel threads; asserts the outputs are bitwise equal, returns them."""
    outputs = []
    for threads in THREADS:
        cpu_kernels.set_num_threads(threads)
        assert cpu_kernels.num_threads() == threads
        outputs.append(run())
    for threads, output in zip(THREADS[1:], outputs[1:]):
        for got, want in zip(_tensors(output), _tensors(outputs[0])):
            assert torch.equal(got, want), f"{threads} threads differ from 1"
    return outputs[0]


def _tensors(output):
    return list(output) if isinstance(output, (tuple, list)) else [output]


class OneRowLinear:
    """An nn.Linear as the cpu backend's plan runs it (one input row through the kernel)."""

    def __init__(self, width, rows, bias=True):
        self.layer = nn.Linear(width, rows, bias=bias).requires_grad_(False)
        self.plan = choose_backend("cpu", "cpu").prepare([])

    def __call__(self, x):
        return linear_forward(self.plan, self.layer, x)


one_row_linear = OneRowLinear


def close(got, want):
    for a, b in zip(_tensors(got), _tensors(want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, 257])
def test_bad_thread_count_is_a_value_error(value):
    before = cpu_kernels.num_threads()
    with pytest.raises(ValueError, match="threads"):
        cpu_kernels.set_num_threads(value)
    assert cpu_kernels.num_threads() == before


@pytest.mark.parametrize("rows,width,bias", [(37, 13, True), (48, 48, False), (1536, 576, False)])
def test_decode_linear_one_row(split_everything, rows, width, bias):
    torch.manual_seed(0)
    layer = one_row_linear(width, rows, bias=bias)
    x = torch.randn(1, 1, width)
    fused = same_at_every_thread_count(lambda: layer(x))
    assert layer.plan.built("rows", layer.layer) is not None  # the kernel ran
    close(fused, nn.functional.linear(x, layer.layer.weight, layer.layer.bias))


def test_decode_linear_at_the_default_chunk_size():
    """A product big enough to split with the pool's own chunk size (no test override)."""
    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    torch.manual_seed(1)
    layer = one_row_linear(576, 4099)
    x = torch.randn(1, 1, 576)
    threads = cpu_kernels.num_threads()
    try:
        fused = same_at_every_thread_count(lambda: layer(x))
    finally:
        cpu_kernels.set_num_threads(threads)
    close(fused, nn.functional.linear(x, layer.layer.weight, layer.layer.bias))


def sparse_block(family, tmp_path, packed):
    checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    block = model.blocks[1]
    if packed:
        assert pack_mlp_neurons(*block.mlp.neuron_linears()[:3])
    return model, block


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("packed", [False, True])
def test_gathered_and_dense_mlp(split_everything, tmp_path, family, packed):
    model, block = sparse_block(family, tmp_path, packed)
    d = model.config.hidden_size
    linears = block.mlp.neuron_linears()
    width = linears[0].out_features
    generator = torch.Generator().manual_seed(2)
    h = torch.randn(2, 1, d, generator=generator)
    for k in (width // 4 + 3, width - 1):  # K not a multiple of four: a rest of neurons one by one
        neurons = torch.stack([torch.randperm(width, generator=generator)[:k].sort().values for _ in range(2)])
        with torch.no_grad():
            fused = same_at_every_thread_count(lambda: gathered_mlp(None, h, neurons, *linears))
            close(fused, gathered_mlp_torch(h, neurons, *linears))
    with torch.no_grad():
        one = h[:1]
        fused = same_at_every_thread_count(lambda: dense_mlp(None, one, *linears))
        assert fused is not None
        close(fused, block.mlp.output(block.mlp.activation(one)))


@pytest.mark.parametrize("gated", [True, False])
def test_gathered_mlp_sums_in_many_groups(split_everything, gated):
    """A kept set large enough to be summed in the most partial outputs, and one small enough for
    a single one (with a rest of neurons one by one): the same at every thread count, and equal
    to the torch ops."""
    torch.manual_seed(4)
    d, width = 44, 1100  # d not a multiple of eight: the rows' tails too
    gate, down = nn.Linear(d, width), nn.Linear(width, d)
    up = nn.Linear(d, width) if gated else None
    linears = (gate, up, down, nn.SiLU() if gated else nn.ReLU())
    for module in (gate, up, down):
        if module is not None:
            module.requires_grad_(False)
    assert pack_mlp_neurons(gate, up, down)
    h = torch.randn(1, 1, d)
    for k in (width - 1, 700, 31):
        neurons = torch.randperm(width)[:k].sort().values[None]
        with torch.no_grad():
            fused = same_at_every_thread_count(lambda: gathered_mlp(None, h, neurons, *linears))
            close(fused, gathered_mlp_torch(h, neurons, *linears))


def training_free_mlp(gated, d=140, width=1100):
    """Random gate/up/down (d and the ReLU MLP's width not multiples of eight: the rows' tails)."""
    torch.manual_seed(5)
    gate, down = nn.Linear(d, width), nn.Linear(width, d)
    up = nn.Linear(d, width) if gated else None
    for module in (gate, up, down):
        if module is not None:
            module.requires_grad_(False)
    return gate, up, down, nn.SiLU() if gated else nn.ReLU()


@pytest.mark.parametrize("gated", [True, False])
def test_teal_mlp(split_everything, gated):
    """TEAL's kernel with many kept inputs (the most partial sums of the gate and up products),
    a few (one partial) and none, and with no neuron kept: the same at every thread count, and
    the masked torch ops."""
    from dejavu_llama.modules.decode.cpu_training_free import lay_out_teal, teal_mlp

    gate, up, down, act_fn = linears = training_free_mlp(gated)
    assert lay_out_teal(gate, up, down)
    h = torch.randn(1, 1, gate.in_features)
    for keep_in, keep_down in ((0.9, 0.5), (0.15, 0.3), (0.0, 0.5), (0.9, 0.0)):
        t_in = float(h.abs().quantile(1 - keep_in)) if keep_in else float("inf")
        with torch.no_grad():
            masked = h * (h.abs() > t_in)
            act = act_fn(gate(masked)) * (up(masked) if gated else 1.0)
            t_down = float(act.abs().quantile(1 - keep_down)) if keep_down else float("inf")
            reference = down(act * (act.abs() > t_down))
            out = same_at_every_thread_count(lambda: teal_mlp(None, h, *linears, t_in, t_down)[0])
            _, inputs, neurons = teal_mlp(None, h, *linears, t_in, t_down)
        close(out, reference)
        assert inputs == int((h.abs() > t_in).sum()) and neurons == int((act.abs() > t_down).sum())


def test_cats_mlp(split_everything):
    """CATS's kernel (silu of the whole gate on the threads, then each kept neuron's up and down
    rows in one pass): the same at every thread count, and the masked torch ops."""
    from dejavu_llama.modules.decode.cpu_training_free import cats_mlp

    gate, up, down, act_fn = linears = training_free_mlp(True)
    assert pack_mlp_neurons(gate, up, down)
    h = torch.randn(1, 1, gate.in_features)
    with torch.no_grad():
        act = act_fn(gate(h))
        for keep in (0.7, 0.05, 0.0):
            t_gate = float(act.abs().quantile(1 - keep)) if keep else float("inf")
            reference = down(act * up(h) * (act.abs() > t_gate))
            out = same_at_every_thread_count(lambda: cats_mlp(None, h, *linears, t_gate)[0])
            close(out, reference)
            neurons = cats_mlp(None, h, *linears, t_gate)[1]
            assert neurons == int((act.abs() > t_gate).sum())


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("rounded", [None, torch.float16, torch.bfloat16], ids=["float32", "float16", "bfloat16"])
def test_predicted_mlp(split_everything, tmp_path, family, rounded):
    model, block = sparse_block(family, tmp_path, packed=True)
    d = model.config.hidden_size
    linears = block.mlp.neuron_linears()
    width = linears[0].out_features
    torch.manual_seed(3)
    rank = 24 if rounded is None else 5  # 5: padded tiles; 24: three tiles of the first product
    predictor = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, width, bias=False)).requires_grad_(False)
    if rounded is not None:
        assert round_predictor(predictor, rounded)
    h, x_pred = torch.randn(2, 1, d), torch.randn(2, 1, d)
    for keep in (0.25, 1.0):
        k = kept_count(keep, width)
        with torch.no_grad():
            fused = same_at_every_thread_count(
                lambda: predicted_gathered_mlp(None, h, x_pred, predictor, k, *linears, rounded=rounded))
            assert fused is not None
            neurons = torch.sort(-predictor(x_pred)[:, 0], dim=-1, stable=True).indices[:, :k].sort(dim=-1).values
            close(fused, gathered_mlp_torch(h, neurons, *linears))


def decode_steps(model, prompt, backend="cpu", steps=4):
    """Logits of each decoded token (cpu: one kernel call per layer) and a greedy continuation."""
    with torch.no_grad():
        logits, past = model(prompt, backend=backend)
        outputs = []
        for token in range(11, 11 + steps):
            logits, past = model(torch.tensor([[token]]), past=past, backend=backend)
            outputs.append(logits[:, -1])
        return torch.cat(outputs), model.generate_greedy(prompt, 4, backend=backend)


@pytest.mark.parametrize("family,overrides", [("llama", {}), ("llama", {"num_key_value_heads": 6}),
                                              ("opt", {}), ("opt", {"do_layer_norm_before": False})],
                         ids=["llama-gqa", "llama-mha", "opt-pre-ln", "opt-post-ln"])
def test_decode_layer(split_everything, tmp_path, family, overrides):
    checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path, **overrides)[1]
    model = LocalModel.from_checkpoint(checkpoint, family)
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(4))
    fused = same_at_every_thread_count(lambda: decode_steps(model, prompt))
    assert view_of(model.plan("cpu"), model.blocks[0]) is not None  # the C layer ran
    reference = decode_steps(model, prompt, "torch")
    close(fused[0], reference[0])
    assert torch.equal(fused[1], reference[1])


@pytest.mark.parametrize("mode", ["predicted", "predicted float16", "predicted biased"])
def test_llama_decode_layer_with_predicted_mlp(split_everything, tmp_path, mode):
    """The layer with the predicted MLP in the same call (biased predictors: the attention half in
    the kernel, then the MLP in torch ops)."""
    checkpoint = tiny_llama(tmp_path)[1]
    torch.manual_seed(5)
    biased = "biased" in mode
    predictors = {("mlp", layer): (nn.Sequential(nn.Linear(48, 16, bias=biased), nn.Linear(16, 112, bias=biased)),
                                   "prev" if layer == 1 else "same") for layer in range(3)}
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
    configure_sparse(list(model.blocks), "predicted", mlp_keep=0.25, predictors=predictors, sparse_attention=False,
                     predictor_dtype="float16" if "float16" in mode else "float32")
    prompt = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(6))
    fused = same_at_every_thread_count(lambda: decode_steps(model, prompt))
    view = view_of(model.plan("cpu"), model.blocks[1])
    assert view is not None and (view.predicted is not None) == (not biased)  # the predicted MLP inside, unless biased
    reference = decode_steps(model, prompt, "torch")
    close(fused[0], reference[0])
    assert torch.equal(fused[1], reference[1])


def test_calls_from_two_threads_at_once(split_everything):
    """Two Python threads calling the kernels together (ctypes lets go of the GIL): the one that
    finds the pool busy runs its product on its own thread; both get the right numbers."""
    torch.manual_seed(7)
    layers = [one_row_linear(256, 515) for _ in range(2)]
    inputs = [torch.randn(1, 1, 256) for _ in range(2)]
    cpu_kernels.set_num_threads(2)
    expected = [layer(x) for layer, x in zip(layers, inputs)]
    failures = []

    def hammer(index):
        for _ in range(300):
            if not torch.equal(layers[index](inputs[index]), expected[index]):
                failures.append(index)
                return

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures


def _child(queue):
    torch.manual_seed(8)
    layer = one_row_linear(64, 99, bias=False)
    x = torch.randn(1, 1, 64)
    queue.put(bool(torch.allclose(layer(x), nn.functional.linear(x, layer.layer.weight), rtol=1e-5, atol=1e-5)))


def test_forked_child_runs_the_kernels(split_everything):
    """A process forked after the workers started (they are not copied) starts its own."""
    cpu_kernels.set_num_threads(2)
    one_row_linear(64, 99)(torch.randn(1, 1, 64))  # the workers run
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0 and queue.get(timeout=5)
