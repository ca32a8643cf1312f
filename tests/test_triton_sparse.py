"""The Triton sparse-decode kernels (modules/decode/triton_sparse.py) against float64 torch.

Where it runs: on CUDA when torch sees a GPU (compiled kernels, plus a CUDA-graph check), else
on CPU through Triton's interpreter (TRITON_INTERPRET=1). Set DEJAVU_TRITON_TEST_DEVICE=cpu to
force the interpreter.

How the interpreter is switched on without touching other tests: triton.jit reads
TRITON_INTERPRET when a kernel is decorated, i.e. when the module is imported. The module-scoped
fixture `ts` sets the variable (pytest.MonkeyPatch, undone when this file's tests end) and loads a
private copy of the module from its file under another name, so the interpreted kernels never
enter sys.modules as dejavu_llama.modules.decode.triton_sparse and nothing imported before or
after this file sees the variable. (Setting it at import time of this file would leak into every
later test module, since pytest imports all of them in one process before running any.)

Interpreter limits (CPU only): its tl.dot multiplies bfloat16 as raw uint16 (numpy has no
bfloat16), so bfloat16 is checked here on the register path (batch 1 and 2) only; on a GPU every
batch size is checked in bfloat16.
"""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_PATH = os.path.join(ROOT, "Decentralized_FM_alpha", "modules", "decode", "triton_sparse.py")
ON_GPU = torch.cuda.is_available() and os.environ.get("DEJAVU_TRITON_TEST_DEVICE", "") != "cpu"
DEVICE = "cuda" if ON_GPU else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16]
BATCHES = [1, 3, 16]


def _load(name, interpret):
    with pytest.MonkeyPatch.context() as mp:
        if interpret:
            mp.setenv("TRITON_INTERPRET", "1")
        else:
            mp.delenv("TRITON_INTERPRET", raising=False)
        spec = importlib.util.spec_from_file_location(name, MODULE_PATH)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


@pytest.fixture(scope="module")
def ts():
    with pytest.MonkeyPatch.context() as mp:
        if not ON_GPU:  # kept set while the interpreted kernels run, restored afterwards
            mp.setenv("TRITON_INTERPRET", "1")
        module = _load("_triton_sparse_under_test", interpret=not ON_GPU)
        assert module.INTERPRET == (not ON_GPU)
        assert module.available(torch.empty(0, device=DEVICE))
        yield module


def rel_err(out, ref):
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def rand(*shape, dtype=torch.float32, scale=1.0, gen=None):
    """scale * (N(0, 1) + 0.5): non-zero, and the offset keeps a product of R = 1 rows from
    cancelling to a tiny value whose relative error would measure only the rounding."""
    return (scale * (torch.randn(*shape, generator=gen, dtype=torch.float64) + 0.5)).to(dtype).to(DEVICE)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def d64(t):
    return t.double().cpu()


def rows_cases(n, g):
    """R = 1, a sorted random subset, all n rows, and an unsorted subset."""
    return [torch.tensor([n - 1]), torch.randperm(n, generator=g)[:37].sort().values, torch.arange(n),
            torch.randperm(n, generator=g)[:20]]


# ---- the three products ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_gather_rows_gemv(ts, dtype, batch):
    g = gen(batch)
    d, n = 70, 150  # d not a multiple of any block
    x, w, b = rand(batch, d, dtype=dtype, gen=g), rand(n, d, dtype=dtype, scale=d ** -0.5, gen=g), \
        rand(n, dtype=dtype, gen=g)
    for i, rows in enumerate(rows_cases(n, g)):
        bias = b if i % 2 else None
        out = ts.gather_rows_gemv(x, w, rows.to(DEVICE), bias)
        ref = d64(x) @ d64(w)[rows].T + (0 if bias is None else d64(bias)[rows])
        assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype], (i, rel_err(out, ref))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_gather_glu_gemv_strided_views(ts, dtype, batch):
    g = gen(10 + batch)
    d, n = 70, 130
    x = rand(batch, d, dtype=dtype, gen=g)
    packed = rand(n, 2, d, dtype=dtype, scale=d ** -0.5, gen=g)  # one neuron's gate and up side by side
    concat = rand(2 * n, d, dtype=dtype, scale=d ** -0.5, gen=g)  # [gate; up]
    gb, ub = rand(n, dtype=dtype, gen=g), rand(n, dtype=dtype, gen=g)
    rows = torch.randperm(n, generator=g)[:41].sort().values
    for gate, up, biases in ((packed[:, 0], packed[:, 1], (None, None)), (concat[:n], concat[n:], (gb, ub))):
        assert gate.stride(0) in (2 * d, d)
        act = ts.gather_glu_gemv(x, gate, up, rows.to(DEVICE), "silu_glu", *biases)
        xg = d64(x) @ d64(gate)[rows].T + (0 if biases[0] is None else d64(gb)[rows])
        xu = d64(x) @ d64(up)[rows].T + (0 if biases[1] is None else d64(ub)[rows])
        assert rel_err(act, F.silu(xg) * xu) < TOL[dtype]
    act = ts.gather_glu_gemv(x, concat[:n], None, rows.to(DEVICE), "relu", gb)  # OPT's fc1
    ref = torch.relu(d64(x) @ d64(concat)[rows].T + d64(gb)[rows])
    assert rel_err(act, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_gather_columns_gemv(ts, dtype, batch):
    g = gen(20 + batch)
    n, d = 140, 97  # two column blocks, the second partial
    w_t, b = rand(n, d, dtype=dtype, scale=n ** -0.5, gen=g), rand(d, dtype=dtype, gen=g)
    for i, rows in enumerate(rows_cases(n, g)):
        act = rand(batch, rows.numel(), dtype=dtype, gen=g)
        for split in (None, 1, 3):  # None: the automatic split (several slices here: few column blocks)
            bias = b if split != 1 else None
            out = ts.gather_columns_gemv(act, w_t, rows.to(DEVICE), bias, split=split)
            ref = d64(act) @ d64(w_t)[rows] + (0 if bias is None else d64(b))
            assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype], (i, split, rel_err(out, ref))


def test_batch_above_16_runs_in_chunks(ts):
    g = gen(30)
    x, w = rand(20, 64, gen=g), rand(100, 64, gen=g)
    rows = torch.arange(0, 100, 3)
    out = ts.gather_rows_gemv(x, w, rows.to(DEVICE))
    assert rel_err(out, d64(x) @ d64(w)[rows].T) < 1e-5
    act = rand(20, rows.numel(), gen=g)
    out = ts.gather_columns_gemv(act, w, rows.to(DEVICE))
    assert rel_err(out, d64(act) @ d64(w)[rows]) < 1e-5


@pytest.mark.parametrize("batch", [1, 2] + ([3, 16] if ON_GPU else []))
def test_bfloat16(ts, batch):
    g = gen(40 + batch)
    d, n = 70, 150
    x, w, down_t = rand(batch, d, dtype=torch.bfloat16, gen=g), rand(2 * n, d, dtype=torch.bfloat16, gen=g), \
        rand(n, d, dtype=torch.bfloat16, scale=n ** -0.5, gen=g)
    rows = torch.randperm(n, generator=g)[:50].sort().values
    act = ts.gather_glu_gemv(x, w[:n], w[n:], rows.to(DEVICE))
    ref = F.silu(d64(x) @ d64(w)[rows].T) * (d64(x) @ d64(w)[n:][rows].T)
    assert rel_err(act, ref) < TOL[torch.bfloat16]
    out = ts.gather_columns_gemv(act, down_t, rows.to(DEVICE))
    assert rel_err(out, d64(act) @ d64(down_t)[rows]) < TOL[torch.bfloat16]


# ---- kept sets ---------------------------------------------------------------------------------
def test_union_and_padded_union(ts):
    g = gen(50)
    width = 40
    top = torch.stack([torch.randperm(width, generator=g)[:9] for _ in range(3)])
    union = ts.union_of_rows(top)
    assert torch.equal(union, torch.unique(top))
    assert ts.kept_mask(union, width)[top].all()  # every row's top-K is computed
    padded = ts.padded_union(top, width)
    assert padded.shape == (27,)
    assert torch.equal(padded[:union.numel()], union) and (padded[union.numel():] == width).all()
    everything = torch.arange(width).repeat(2, 1)
    assert torch.equal(ts.padded_union(everything, width), torch.arange(width))  # capacity min(B*K, width)


def top_k_reference(row, k):
    """The k highest of a row in index order: NaN first, ties to the lowest index, -0 == +0."""
    values = row.double().cpu()
    rank = sorted(range(len(values)), key=lambda i: (not values[i].isnan(), -values[i].nan_to_num(0.0).item(), i))
    return sorted(rank[:k])


@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_indices_one_program_per_row(ts, dtype):
    """Each row's k highest in ascending index order, as the CPU kernel selects them: rows of
    distinct scores, of few values (ties at the k-th), of specials (NaN above +inf, -inf, -0 and
    +0, subnormals), of one value; widths not a power of two; k from 1 to all."""
    g = gen(60)
    rows = torch.randn(4, 300, generator=g, dtype=torch.float64)
    rows[1] = (rows[1] * 5).round() / 10  # about 30 distinct values
    rows[2, [3, 40]] = float("nan")
    rows[2, 41] = -rows[2, 3]  # a NaN with its sign bit set ranks above +inf too
    rows[2, [5, 6]] = float("inf")
    rows[2, [7, 299]] = float("-inf")
    rows[2, [8, 9, 10, 11]] = torch.tensor([-0.0, 0.0, 1e-42, -1e-42], dtype=torch.float64)
    rows[3] = 0.25
    scores = rows.to(dtype).to(DEVICE)
    for k in (1, 2, 7, 150, 298, 299, 300):
        got = ts.top_k_indices(scores, k)
        assert got.shape == (4, k) and got.dtype == torch.int64
        for row in range(4):
            assert got[row].tolist() == top_k_reference(scores[row], k), (row, k)
    odd = torch.randn(2, 1537, generator=g).to(dtype).to(DEVICE)  # SmolLM2's 1536 + 1
    assert [ts.top_k_indices(odd, 384)[r].tolist() for r in range(2)] == [top_k_reference(odd[r], 384) for r in range(2)]
    one = torch.ones(1, 1, dtype=dtype, device=DEVICE)
    assert ts.top_k_indices(one, 1).tolist() == [[0]]
    with pytest.raises(ValueError, match="cannot keep 301 of 300"):
        ts.top_k_indices(scores, 301)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        ts.top_k_indices(scores.t(), 2)


def test_padding_slots_read_nothing(ts):
    g = gen(51)
    x, w, b = rand(3, 64, gen=g), rand(30, 64, gen=g), rand(30, gen=g)
    rows = torch.tensor([2, 5, 30, 30, 999])
    out = ts.gather_rows_gemv(x, w, rows.to(DEVICE), b)
    assert (out[:, 2:] == 0).all()
    assert rel_err(out[:, :2], d64(x) @ d64(w)[[2, 5]].T + d64(b)[[2, 5]]) < 1e-5
    act = rand(3, 5, gen=g)
    out = ts.gather_columns_gemv(act, w, rows.to(DEVICE))
    assert rel_err(out, d64(act)[:, :2] @ d64(w)[[2, 5]]) < 1e-5


# ---- the MLP -----------------------------------------------------------------------------------
def mlp_weights(family, d, inter, dtype, g):
    """(gate, up, down_t, biases) as the kernels take them, and a float64 act(h) -> [B, I]."""
    if family == "llama":
        gate_up = rand(2 * inter, d, dtype=dtype, scale=d ** -0.5, gen=g)
        gate, up, down = gate_up[:inter], gate_up[inter:], rand(d, inter, dtype=dtype, scale=inter ** -0.5, gen=g)
        biases = dict(gate_bias=None, up_bias=None, down_bias=None)
        act = lambda h: F.silu(d64(h) @ d64(gate).T) * (d64(h) @ d64(up).T)
        return dict(gate=gate, up=up, down_t=down.t().contiguous(), activation="silu_glu", **biases), act, down
    fc1, fc2 = rand(inter, d, dtype=dtype, scale=d ** -0.5, gen=g), rand(d, inter, dtype=dtype, scale=inter ** -0.5, gen=g)
    b1, b2 = rand(inter, dtype=dtype, scale=0.1, gen=g), rand(d, dtype=dtype, scale=0.1, gen=g)
    act = lambda h: torch.relu(d64(h) @ d64(fc1).T + d64(b1))
    return dict(gate=fc1, up=None, down_t=fc2.t().contiguous(), activation="relu", gate_bias=b1, up_bias=None,
                down_bias=b2), act, fc2


def masked_reference(h, act, down, down_bias, keep):
    """The dense MLP with the dropped neurons' activations zeroed: down(act(h) * keep) + bias."""
    out = (act(h) * keep.double().cpu()) @ d64(down).T
    return out if down_bias is None else out + d64(down_bias)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_sparse_mlp_union_equals_masked(ts, family, dtype, batch):
    g = gen(60 + batch)
    d, inter, k = 96, 200, 24
    weights, act, down = mlp_weights(family, d, inter, dtype, g)
    h = rand(batch, d, dtype=dtype, gen=g)
    top = torch.stack([torch.randperm(inter, generator=g)[:k] for _ in range(batch)])
    union = ts.union_of_rows(top)
    keep = ts.kept_mask(union, inter)
    assert keep[top].all()
    ref = masked_reference(h, act, down, weights["down_bias"], keep)
    out = ts.sparse_mlp(h, union.to(DEVICE), **weights)
    assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype]
    padded = ts.padded_union(top.to(DEVICE), inter)
    assert rel_err(ts.sparse_mlp(h, padded, **weights), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_mlp_all_and_one_neuron(ts, dtype):
    g = gen(70)
    d, inter = 64, 128
    weights, act, down = mlp_weights("llama", d, inter, dtype, g)
    h = rand(1, d, dtype=dtype, gen=g)
    for neurons in (torch.arange(inter), torch.tensor([77])):
        keep = torch.zeros(inter, dtype=torch.bool)
        keep[neurons] = True
        ref = masked_reference(h, act, down, None, keep)
        assert rel_err(ts.sparse_mlp(h, neurons.to(DEVICE), **weights), ref) < TOL[dtype]


def predictor_for(d, rank, inter, g):
    from sparse_predictor.predictor import build_predictor

    predictor = build_predictor(d, rank, inter)
    with torch.no_grad():
        for layer in predictor:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * layer.in_features ** -0.5)
    return predictor.to(DEVICE).eval()


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_predicted_sparse_mlp(ts, family, dtype, batch):
    """Batch 1: the masked reference with that row's top-K; batch > 1: masked by the union."""
    g = gen(80 + batch)
    d, inter, rank, k = 96, 200, 32, 30
    weights, act, down = mlp_weights(family, d, inter, dtype, g)
    predictor = predictor_for(d, rank, inter, g)  # float32, as trained
    h, x_pred = rand(batch, d, dtype=dtype, gen=g), rand(batch, d, gen=g)
    with torch.no_grad():
        top = predictor(x_pred).topk(k, dim=-1).indices.cpu()  # sparse_predictor's own network
    keep = ts.kept_mask(top, inter)
    ref = masked_reference(h, act, down, weights["down_bias"], keep)
    pair = (predictor[0].weight.detach(), predictor[1].weight.detach())
    for source, fixed in ((predictor, False), (pair, True)):
        neurons = ts.predict_neurons(x_pred, source, k, fixed_size=fixed)
        expected = top[0].sort().values if batch == 1 else torch.unique(top)
        assert torch.equal(neurons.cpu()[:expected.numel()], expected)
        out = ts.predicted_sparse_mlp(h, x_pred, source, k, fixed_size=fixed, **weights)
        assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype], (fixed, rel_err(out, ref))
    if batch > 1:  # each row is exactly the masked MLP of the union, never of its own top-K alone
        own = masked_reference(h[:1], act, down, weights["down_bias"], ts.kept_mask(top[0], inter))
        assert rel_err(out[:1], own) > 10 * TOL[dtype]


# ---- attention heads ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_head_helpers_equal_masked_o_proj(ts, dtype, batch):
    g = gen(90 + batch)
    d, n_heads, hd, kept = 96, 6, 16, 3
    q_w, q_b = rand(n_heads * hd, d, dtype=dtype, scale=d ** -0.5, gen=g), rand(n_heads * hd, dtype=dtype, gen=g)
    o_w = rand(d, n_heads * hd, dtype=dtype, scale=(n_heads * hd) ** -0.5, gen=g)
    x = rand(batch, d, dtype=dtype, gen=g)
    heads_out = rand(batch, n_heads, hd, dtype=dtype, gen=g)  # every head's attention output
    top = torch.stack([torch.randperm(n_heads, generator=g)[:kept] for _ in range(batch)])
    heads = top[0].sort().values if batch == 1 else ts.union_of_rows(top)
    mask = ts.kept_mask(heads, n_heads)
    rows = ts.head_rows(heads, hd)
    assert torch.equal(rows.view(-1, hd)[:, 0], heads * hd)

    q = ts.gather_head_rows(x, q_w, heads.to(DEVICE), hd, q_b)
    ref_q = (d64(x) @ d64(q_w).T + d64(q_b)).view(batch, n_heads, hd)[:, heads].reshape(batch, -1)
    assert rel_err(q, ref_q) < TOL[dtype]

    o_t = o_w.t().contiguous()
    attn = heads_out[:, heads.to(DEVICE)].reshape(batch, -1)
    out = ts.gather_head_columns(attn, o_t, heads.to(DEVICE), hd)
    ref = (d64(heads_out) * mask.double()[None, :, None]).reshape(batch, -1) @ d64(o_w).T  # o_proj(heads * mask)
    assert rel_err(out, ref) < TOL[dtype]
    padded = ts.padded_union(top.to(DEVICE), n_heads)  # padding heads give padding rows
    attn = torch.zeros(batch, padded.numel(), hd, dtype=dtype, device=DEVICE)
    real = padded < n_heads
    attn[:, real] = heads_out[:, padded[real]]
    assert rel_err(ts.gather_head_columns(attn.reshape(batch, -1), o_t, padded, hd), ref) < TOL[dtype]


# ---- fallbacks and errors ----------------------------------------------------------------------
def test_available_without_interpreter():
    compiled = _load("_triton_sparse_compiled", interpret=False)
    assert not compiled.INTERPRET
    assert not compiled.available(torch.empty(0))  # a CPU tensor needs the interpreter
    assert compiled.available() == torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="torch path"):
        compiled.gather_rows_gemv(torch.ones(1, 4), torch.ones(2, 4), torch.tensor([0]))


def test_rejects_bad_layouts(ts):
    x, w = rand(1, 8), rand(4, 8)
    with pytest.raises(ValueError, match="contiguous"):
        ts.gather_rows_gemv(x, rand(8, 4).t(), torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="dtype"):
        ts.gather_rows_gemv(x, w.half(), torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="up"):
        ts.gather_glu_gemv(x, w, None, torch.tensor([0], device=DEVICE), "silu_glu")


# ---- CUDA only ---------------------------------------------------------------------------------
@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_fixed_size_path_captures_in_cuda_graph(ts):
    g = gen(100)
    d, inter, rank, k, batch = 256, 1024, 64, 100, 4
    weights, act, down = mlp_weights("llama", d, inter, torch.float16, g)
    predictor = predictor_for(d, rank, inter, g)
    h, x_pred = rand(batch, d, dtype=torch.float16, gen=g), rand(batch, d, gen=g)
    run = lambda: ts.predicted_sparse_mlp(h, x_pred, predictor, k, fixed_size=True, **weights)
    with torch.no_grad():
        run()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()
        h.copy_(rand(batch, d, dtype=torch.float16, gen=g))
        x_pred.copy_(rand(batch, d, gen=g))
        graph.replay()
        torch.cuda.synchronize()
        top = predictor(x_pred).topk(k, dim=-1).indices.cpu()
    ref = masked_reference(h, act, down, None, ts.kept_mask(top, inter))
    assert rel_err(out, ref) < TOL[torch.float16]


# ---- sparse heads on the decoding step (decode/cuda_sparse.py) ---------------------------------
@pytest.fixture
def heads_kernels(ts, monkeypatch):
    """decode/cuda_sparse with the kernels under test and its device check on ts's: the Triton heads
    path then runs here too (on CPU through the interpreter). Returns the module."""
    from dejavu_llama.modules.decode import cuda_sparse

    monkeypatch.setattr(cuda_sparse, "triton_sparse", ts)
    monkeypatch.setattr(cuda_sparse, "usable", lambda h: not torch.is_grad_enabled() and ts.available(h))
    return cuda_sparse


class MaskHeads:
    """block.taps zeroing the heads not in `keep` [B, 1, H] at head_out: the masked torch attention."""

    def __init__(self, keep):
        self.keep = keep

    def __call__(self, name, value, token_mask):
        return value * self.keep[..., None].to(value.dtype) if name == "head_out" else value


def random_keep(batch, n_heads, k, g):
    """[B, 1, H] bool, k heads per row, different rows."""
    keep = torch.zeros(batch, 1, n_heads, dtype=torch.bool)
    for row in range(batch):
        keep[row, 0, torch.randperm(n_heads, generator=g)[:k]] = True
    return keep.to(DEVICE)


def test_padded_kept_heads(heads_kernels):
    keep = torch.tensor([[0, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert heads_kernels.padded_kept_heads(keep[:1], 2).tolist() == [1, 3]
    assert heads_kernels.padded_kept_heads(keep, 2).tolist() == [1, 2, 3, 6]  # union, then the sentinel H
    assert heads_kernels.padded_kept_heads(torch.ones(3, 6, dtype=torch.bool), 4).tolist() == list(range(6))


def attention_block(family, bias, dtype):
    """A Llama block with GQA (8 heads over 2 KV heads) or an OPT block (8 heads), d = 64, its
    output projection laid out transposed as sparse execution does on CUDA."""
    from transformers import LlamaConfig, OPTConfig

    from dejavu_llama.modules.decode import cuda_sparse
    from dejavu_llama.modules.hf_llama_module import LlamaBlock
    from dejavu_llama.modules.hf_opt_module import OPTBlock

    if family == "llama":
        block = LlamaBlock(LlamaConfig(hidden_size=64, intermediate_size=32, num_attention_heads=8,
                                       num_key_value_heads=2, attention_bias=bias, rms_norm_eps=1e-5))
    else:
        block = OPTBlock(OPTConfig(hidden_size=64, ffn_dim=32, num_attention_heads=8, enable_bias=bias))
    block = block.to(DEVICE, dtype).eval()
    cuda_sparse.store_transposed(cuda_sparse.output_projection(block))
    return block


@pytest.mark.parametrize("family, batch, keep_fraction, bias, dtype", [
    ("llama", 1, 0.5, False, torch.float32), ("llama", 3, 0.5, True, torch.float32),
    ("llama", 3, 0.25, False, torch.float32), ("llama", 3, 0.5, False, torch.float16),
    ("opt", 1, 0.5, True, torch.float32), ("opt", 3, 0.5, True, torch.float32),
    ("opt", 3, 0.25, True, torch.float32), ("opt", 3, 0.5, True, torch.float16),
    ("opt", 3, 0.5, False, torch.float32)])
def test_sparse_heads_attention_equals_the_masked_attention(heads_kernels, family, batch, keep_fraction, bias, dtype):
    """After a left-padded prompt of 5 positions, the kept heads' q rows and output-projection
    columns give the block's attention with each row's dropped heads zeroed (Llama: RoPE, GQA;
    OPT: biased q, k, v and out_proj)."""
    g = gen(110 + batch)
    torch.manual_seed(110 + batch)
    block = attention_block(family, bias, dtype)
    n_heads, k = 8, max(1, round(keep_fraction * 8))
    prompt, mask = rand(batch, 5, 64, dtype=dtype, gen=g), torch.ones(batch, 6, dtype=torch.long, device=DEVICE)
    mask[1:, 0] = 0  # left padding
    h, keep = rand(batch, 1, 64, dtype=dtype, gen=g), random_keep(batch, n_heads, k, g)
    with torch.no_grad():
        assert heads_kernels.heads_usable(block, h)
        _, present = block.attention(prompt, None, mask[:, :5], None)
        past = (present[0].clone(), present[1].clone())
        dense, _ = block.attention(h, past, mask, None)
        block.taps = MaskHeads(keep)
        masked, masked_present = block.attention(h, past, mask, None)
        block.taps = None
        out, out_present = heads_kernels.sparse_heads_attention(block, h, past, mask, keep, k)
    assert torch.equal(out_present[0], masked_present[0]) and torch.equal(out_present[1], masked_present[1])
    assert out.shape == (batch, 1, 64) and out.dtype == dtype and rel_err(out, d64(masked)) < TOL[dtype]
    assert rel_err(out, d64(dense)) > 1e-2  # the dropped heads do matter
    if batch > 1:  # the union is larger than one row's k: each row's own dropped heads were zeroed
        assert (heads_kernels.padded_kept_heads(keep[:, 0], k) < n_heads).sum() > k


def test_output_projection_and_layout_of_both_families(heads_kernels):
    """o_proj (Llama) and out_proj (OPT) are found; the transposed layout keeps values, shape and
    state-dict key; a block without either is refused by name."""
    for family, name in (("llama", "o_proj"), ("opt", "out_proj")):
        block = attention_block(family, True, torch.float32)
        output = heads_kernels.output_projection(block)
        assert output is getattr(block.self_attn, name) and output.weight.t().is_contiguous()
        assert block.state_dict()[f"self_attn.{name}.weight"].shape == (64, 64)
    plain = nn.Module()
    assert heads_kernels.output_projection(plain) is None and not heads_kernels.lay_out_o_proj(plain)
    assert not heads_kernels.heads_usable(plain, torch.zeros(1, 1, 64, device=DEVICE))
    with pytest.raises(TypeError, match="o_proj.*out_proj"):
        heads_kernels.sparse_heads_attention(plain, torch.zeros(1, 1, 64), None, None,
                                             torch.ones(1, 1, 8, dtype=torch.bool), 8)


def tiny_sparse_model(family, tmp_path, seed=7):
    """A tiny Llama (6 heads over 2 KV heads) or OPT (4 heads) as an *-ml-att-sparse model, and
    attention predictors for every layer (random, from seed)."""
    from dejavu_llama.modules.local_model import LocalModel
    from tiny_models import tiny_llama, tiny_opt

    checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    config = model.config
    torch.manual_seed(seed)
    predictors = {("att", layer): (nn.Sequential(nn.Linear(config.hidden_size, 8, bias=False),
                                                 nn.Linear(8, config.num_attention_heads, bias=False)), "same")
                  for layer in range(config.num_hidden_layers)}
    return model, predictors


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_model_with_predicted_heads_decodes_as_the_masked_torch_path(heads_kernels, tmp_path, monkeypatch, family,
                                                                      batch):
    """Tiny Llama or OPT, predicted heads at keep 0.5, the static-cache step (eager here): the
    kept-heads path gives the masked torch path's tokens, logprobs and stats."""
    from dejavu_llama.modules.sparse_execution import configure_sparse
    from dejavu_llama.modules.sparse_stats import SparseStats

    if ON_GPU:
        pytest.skip("the interpreter's run of the CUDA path; tests/test_cuda_decode.py covers the GPU")
    model, predictors = tiny_sparse_model(family, tmp_path)
    config = model.config
    ids = torch.randint(3, 256, (batch, 6), generator=gen(batch))
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[1:, :2] = 0

    calls = []
    sparse_heads_attention = heads_kernels.sparse_heads_attention
    monkeypatch.setattr(heads_kernels, "sparse_heads_attention",
                        lambda *args: calls.append(1) or sparse_heads_attention(*args))

    def run(use_gather):
        """(tokens, logprobs, stats, kept-heads calls); use_gather False: the masked torch path."""
        calls.clear()
        stats = SparseStats()
        configure_sparse(list(model.blocks), "predicted", predictors=predictors, att_keep=0.5, sparse_mlp=False,
                         use_gather=use_gather, stats=stats)
        for block in model.blocks:
            heads_kernels.store_transposed(heads_kernels.output_projection(block))
        tokens, logprobs = model.generate_greedy(ids, 5, mask=mask, backend="cuda", with_logprobs=True)
        return tokens, logprobs, stats, len(calls)

    masked, sparse = run(use_gather=False), run(use_gather=True)
    assert masked[3] == 0
    assert sparse[3] == 4 * config.num_hidden_layers  # every decoding step of every layer, no prompt step
    assert torch.equal(sparse[0], masked[0])
    assert torch.allclose(sparse[1], masked[1], rtol=0, atol=2e-6)  # float32 rounding of the gathered products
    for key, total in masked[2].sums.items():
        assert torch.allclose(torch.as_tensor(sparse[2].sums[key]).float(), torch.as_tensor(total).float()), key
        assert int(sparse[2].counts[key]) == int(masked[2].counts[key]), key
    assert {name for _, name in masked[2].sums} == {"heads", "neurons"}


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("mode, att_keep", [("oracle", 0.5), ("predicted", None)])
def test_the_kept_heads_path_leaves_oracle_heads_and_positives_masked(heads_kernels, tmp_path, monkeypatch, family,
                                                                      mode, att_keep):
    """Oracle heads (chosen from the heads' own outputs) and predicted positives (no fixed K)
    keep the masked torch path, even where the Triton path is usable."""
    from dejavu_llama.modules.sparse_execution import configure_sparse

    model, predictors = tiny_sparse_model(family, tmp_path)
    configure_sparse(list(model.blocks), mode, predictors=predictors, att_keep=att_keep, sparse_mlp=False)
    for block in model.blocks:
        heads_kernels.store_transposed(heads_kernels.output_projection(block))
    monkeypatch.setattr(heads_kernels, "sparse_heads_attention", lambda *args: pytest.fail("kept-heads path taken"))
    model.generate_greedy(torch.randint(3, 256, (1, 5), generator=gen(3)), 3, backend="cuda")
