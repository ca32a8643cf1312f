"""Sparse execution: controls that must equal dense, and gathered MLP == masked MLP."""

import pytest
import torch
from torch import nn

from dejavu_llama.modules.decode import choose_backend
from dejavu_llama.modules.decode.cpu_views import view_of
from dejavu_llama.modules.decode.sparse_gather import gathered_mlp, gathered_mlp_torch
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.modules.sparse_execution import SparseSetupError, configure_sparse, top_k_mask
from tiny_models import tiny_llama, tiny_opt


def ids(batch, length, seed):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


class Constant(nn.Module):
    """A predictor that scores every unit with the same logit (always on / always off)."""

    def __init__(self, width, logit):
        super().__init__()
        self.width, self.logit = width, logit
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.full((*x.shape[:-1], self.width), self.logit) + 0 * self.anchor


def build(family, tmp_path):
    return (tiny_llama if family == "llama" else tiny_opt)(tmp_path)[1]


def mlp_width(config):
    return getattr(config, "intermediate_size", None) or config.ffn_dim


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_oracle_keep_all_equals_dense(tmp_path, family):
    checkpoint = build(family, tmp_path)
    dense = LocalModel.from_checkpoint(checkpoint, family)
    sparse = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    configure_sparse(list(sparse.blocks), "oracle", mlp_keep=1.0, att_keep=1.0)
    input_ids = ids(2, 9, 1)
    assert torch.equal(sparse(input_ids)[0], dense(input_ids)[0])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_always_on_predictor_equals_dense(tmp_path, family):
    checkpoint = build(family, tmp_path)
    dense = LocalModel.from_checkpoint(checkpoint, family)
    sparse = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    config = dense.config
    predictors = {}
    for layer in range(3):
        predictors["mlp", layer] = (Constant(mlp_width(config), 5.0), "same")
        predictors["att", layer] = (Constant(config.num_attention_heads, 5.0), "same")
    configure_sparse(list(sparse.blocks), "predicted", predictors=predictors)
    input_ids = ids(2, 9, 2)
    assert torch.allclose(sparse(input_ids)[0], dense(input_ids)[0], atol=1e-6)
    assert torch.equal(sparse.generate_greedy(input_ids, 4), dense.generate_greedy(input_ids, 4))


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_oracle_sparsity_changes_output(tmp_path, family):
    checkpoint = build(family, tmp_path)
    dense = LocalModel.from_checkpoint(checkpoint, family)
    sparse = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    configure_sparse(list(sparse.blocks), "oracle", mlp_keep=0.25, att_keep=0.5)
    input_ids = ids(1, 9, 3)
    assert not torch.allclose(sparse(input_ids)[0], dense(input_ids)[0], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_gathered_mlp_equals_masked_mlp(tmp_path, family):
    checkpoint = build(family, tmp_path)
    model = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    block = model.blocks[1]
    width = mlp_width(model.config)
    torch.manual_seed(0)
    h = torch.randn(3, 1, model.config.hidden_size)
    neurons = torch.stack([torch.randperm(width)[: width // 4].sort().values for _ in range(3)])
    keep = torch.zeros(3, 1, width, dtype=torch.bool).scatter_(-1, neurons[:, None], True)
    masked = block.mlp.output(block.mlp.activation(h) * keep)
    for plan in (None, model.plan("cpu")):  # the C kernel where it loads, else torch ops
        gathered = gathered_mlp(plan, h, neurons, *block.mlp.neuron_linears())
        assert (gathered - masked).abs().max().item() <= 1e-5
    assert (gathered_mlp_torch(h, neurons, *block.mlp.neuron_linears()) - masked).abs().max().item() <= 1e-5


def test_predicted_decode_gathers_and_matches_masking(tmp_path):
    checkpoint = build("llama", tmp_path)
    torch.manual_seed(1)
    predictors = {("mlp", l): (nn.Sequential(nn.Linear(48, 8, bias=False), nn.Linear(8, 112, bias=False)), "same")
                  for l in range(3)}
    predictors.update({("att", l): (nn.Sequential(nn.Linear(48, 8, bias=False), nn.Linear(8, 6, bias=False)),
                                    "prev" if l else "same") for l in range(3)})
    runs = []
    for use_gather in (True, False):
        model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
        configure_sparse(list(model.blocks), "predicted", mlp_keep=0.25, att_keep=0.5, predictors=predictors,
                         use_gather=use_gather)
        runs.append(model.generate_greedy(ids(2, 6, 4), 5))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("keep", [1, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("rounded", ["float32", "float16", "bfloat16"])
def test_predicted_mlp_kernel_matches_torch_steps(tmp_path, family, keep, tied, packed, rounded):
    """The one-call predicted MLP (predictor, top-K, gathered MLP) against the same steps in torch
    ops, on the checkpoint's layout and on the packed one, with the predictor in float32 (rank
    8) and rounded to float16 or bfloat16 (rank 5: the tiles are padded). With tied scores
    (repeated predictor rows) the kernel keeps the lowest indices."""
    from dejavu_llama.modules import cpu_kernels
    from dejavu_llama.modules.decode.sparse_gather import (pack_mlp_neurons, predicted_gathered_mlp,
                                                           round_predictor)
    from dejavu_llama.modules.sparse_execution import kept_count

    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    model = LocalModel.from_checkpoint(build(family, tmp_path), f"{family}-ml-att-sparse")
    block, d, width = model.blocks[1], model.config.hidden_size, mlp_width(model.config)
    if packed:
        before = {key: value.clone() for key, value in block.state_dict().items()}
        assert pack_mlp_neurons(*block.mlp.neuron_linears()[:3])
        after = block.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)
        assert not block.mlp.neuron_linears()[0].weight.is_contiguous()  # really the interleaved views
    torch.manual_seed(2)
    dtype = getattr(torch, rounded)
    rank = 8 if rounded == "float32" else 5
    predictor = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, width, bias=False)).requires_grad_(False)
    if tied:  # every score appears four times
        predictor[1].weight.copy_(predictor[1].weight[: width // 4].repeat(4, 1))
    if rounded != "float32":
        assert round_predictor(predictor, dtype)
        assert all(torch.equal(w, w.to(dtype).float()) for w in (predictor[0].weight, predictor[1].weight))
    h, x_pred = torch.randn(3, 1, d), torch.randn(3, 1, d)
    k = kept_count(keep, width)
    plan = model.plan("cpu")
    with torch.no_grad():
        fused = predicted_gathered_mlp(plan, h, x_pred, predictor, k, *block.mlp.neuron_linears(),
                                       rounded=None if rounded == "float32" else dtype)
    assert fused is not None
    tiles = plan.built("predicted_call", predictor).held[1][1]
    assert tiles[0].dtype == dtype
    scores = predictor(x_pred)[:, 0]
    order = torch.sort(-scores, dim=-1, stable=True).indices  # descending, lowest index first on ties
    neurons = order[:, :k].sort(dim=-1).values
    with torch.no_grad():
        expected = gathered_mlp_torch(h, neurons, *block.mlp.neuron_linears())
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["predicted", "predicted float16", "predicted biased", "dense"])
def test_fused_sparse_decode_matches_torch_path(tmp_path, mode):
    """Decoding an MLP-sparse Llama through the C kernels (the layer with the predicted MLP in
    one call; the whole dense layer in dense mode; with predictors the kernel does not read,
    biased ones, the attention half and then the MLP in torch ops) gives the torch path's
    logits and tokens, with the predictors in float32 and in float16."""
    from dejavu_llama.modules import cpu_kernels

    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    checkpoint = build("llama", tmp_path)
    torch.manual_seed(3)
    biased = "biased" in mode
    predictors = {("mlp", layer): (nn.Sequential(nn.Linear(48, 8, bias=biased), nn.Linear(8, 112, bias=biased)),
                                   "prev" if layer == 1 else "same") for layer in range(3)}
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
    configure_sparse(list(model.blocks), mode.split()[0], mlp_keep=0.25, predictors=predictors, sparse_attention=False,
                     predictor_dtype="float16" if "float16" in mode else "float32")
    prompt = ids(1, 7, 5)

    def decode(backend):
        logits, past = model(prompt, backend=backend)
        steps = []
        for token in (11, 12, 13, 14):
            logits, past = model(torch.tensor([[token]]), past=past, backend=backend)
            steps.append(logits[:, -1])
        return torch.cat(steps), model.generate_greedy(prompt, 5, backend=backend)

    (fused_logits, fused_tokens), (torch_logits, torch_tokens) = decode("cpu"), decode("torch")
    view = view_of(model.plan("cpu"), model.blocks[1])
    assert view is not None and view.has_mlp == (mode == "dense")  # the kernel ran; MLP packed when sparse
    assert (view.predicted is not None) == (mode in ("predicted", "predicted float16"))  # the predicted MLP inside
    torch.testing.assert_close(fused_logits, torch_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(fused_tokens, torch_tokens)
    if mode == "dense":
        dense = LocalModel.from_checkpoint(checkpoint, "llama")
        assert torch.equal(dense.generate_greedy(prompt, 5), fused_tokens)


def test_fused_sparse_layer_follows_changed_predictor(tmp_path):
    """The decoder layer's kernel view holds the predicted-MLP call, made once per plan: after a
    predictor changed in place, replaced, given another Linear, or a changed MLP weight, a new
    plan (prepare) shows the change in the logits as the torch path does."""
    from dejavu_llama.modules import cpu_kernels

    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    checkpoint = build("llama", tmp_path)
    torch.manual_seed(6)

    def predictor():
        return nn.Sequential(nn.Linear(48, 8, bias=False), nn.Linear(8, 112, bias=False)).requires_grad_(False)

    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
    configure_sparse(list(model.blocks), "predicted", mlp_keep=0.25, sparse_attention=False,
                     predictors={("mlp", layer): (predictor(), "same") for layer in range(3)})
    block, prompt = model.blocks[1], ids(1, 6, 7)

    def step(backend):
        with torch.no_grad():
            _, past = model(prompt, backend=backend)
            return model(torch.tensor([[9]]), past=past, backend=backend)[0][:, -1]

    def new_linear():
        twin = nn.Linear(8, 112, bias=False).requires_grad_(False)
        twin.weight.copy_(block.mlp.predictor[1].weight.flip(0))
        block.mlp.predictor[1] = twin

    def replace_predictor():
        block.mlp.predictor = predictor()

    changes = [
        lambda: None,
        lambda: block.mlp.predictor[1].weight.mul_(-1.0),
        replace_predictor,
        new_linear,
        lambda: setattr(block.mlp.down_proj.weight, "data", block.mlp.down_proj.weight.detach() * 3.0),
    ]
    before = None
    for change in changes:
        with torch.no_grad():
            change()
        plan = model.prepare("cpu")  # a new set-up: a new plan
        fused = step("cpu")
        view = view_of(plan, block)
        assert view is not None and view.predicted is not None  # the layer ran with the predicted MLP inside
        torch.testing.assert_close(fused, step("torch"), rtol=1e-5, atol=1e-5)
        assert before is None or not torch.allclose(fused, before)  # the change mattered
        before = fused


def test_lookahead_predictor_on_first_layer_of_stage_is_refused(tmp_path):
    checkpoint = build("llama", tmp_path)
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
    predictors = {("mlp", 0): (Constant(112, 1.0), "same"), ("att", 0): (Constant(6, 1.0), "prev")}
    with pytest.raises(SparseSetupError, match="layer 0"):
        configure_sparse(list(model.blocks)[:1], "predicted", predictors=predictors)


def test_missing_predictor_file_is_named(tmp_path):
    checkpoint = build("llama", tmp_path)
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
    with pytest.raises(SparseSetupError, match="c4_layer0.pt"):
        configure_sparse(list(model.blocks), "predicted", sparse_path=str(tmp_path))


def test_predictors_trained_under_another_label_are_read_with_predictor_dataset(tmp_path):
    """The predictor package names files by its --dataset label; the runner reads that label
    (--predictor-dataset), and a folder holding the files under another label says which."""
    from sparse_predictor.predictor import build_predictor, checkpoint_path, save_predictor

    checkpoint = build("llama", tmp_path)
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
    config = model.config
    folder = tmp_path / "predictors"
    folder.mkdir()
    torch.manual_seed(0)
    saved = {}
    for layer in range(config.num_hidden_layers):
        for kind, width in (("mlp", config.intermediate_size), ("att", config.num_attention_heads)):
            saved[kind, layer] = build_predictor(config.hidden_size, 4, width)
            save_predictor(checkpoint_path(str(folder), kind, layer, "wiki"), saved[kind, layer])
    with pytest.raises(SparseSetupError, match=r"c4_layer0\.pt \(the folder has it under 'wiki': pass --predictor-dataset"):
        configure_sparse(list(model.blocks), "predicted", sparse_path=str(folder), mlp_keep=0.5, att_keep=0.5)
    blocks = configure_sparse(list(model.blocks), "predicted", sparse_path=str(folder), mlp_keep=0.5, att_keep=0.5,
                              predictor_dataset="wiki")
    for block in blocks:
        want_mlp, want_att = saved["mlp", block.layer_index], saved["att", block.layer_index]
        assert torch.equal(block.mlp.predictor[1].weight, want_mlp[1].weight)
        assert torch.equal(block.taps.att_predictor[0].weight, want_att[0].weight)


def test_top_k_mask_counts():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, 3.0, 2.0, 1.0]])
    assert top_k_mask(scores, 2).tolist() == [[False, True, True, False], [True, True, False, False]]
    assert top_k_mask(scores, 10).all()


@pytest.fixture(scope="module")
def portable_kernels():
    """The kernels built without -march=native: the scalar top-K and float16 conversion that
    CPUs without AVX-512 or F16C run (the library's last flag set)."""
    from dejavu_llama.modules import cpu_kernels

    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    lib = cpu_kernels.compile_library(cpu_kernels.FLAG_SETS[-1:])
    lib.dejavu_set_threads(2)
    return lib


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("scores, half", [("ties", "float32"), ("special", "float32"), ("equal", "float32"),
                                         ("small", "float16"), ("ties", "bfloat16"), ("special", "bfloat16")])
def test_predicted_mlp_kernel_selects_as_topk(scores, half, build, request):
    """The kernel's top-K of the predictor's scores, read back from the call: the K highest, NaN
    above +inf (as torch.topk), ties at the K-th value to the lowest indices, in index order, for
    every K from 1 to all; 300 neurons, many sharing their first bytes. Both builds (the native one's
    vector counts, the portable one's scalar loops); float16 and bfloat16 tiles too (the scores rounded)."""
    from dejavu_llama.modules import cpu_kernels
    from dejavu_llama.modules.decode.sparse_gather import predicted_call, round_predictor

    lib = cpu_kernels.kernel_library()
    if lib is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    if build == "portable":
        lib = request.getfixturevalue("portable_kernels")
    width, d = 300, 8
    generator = torch.Generator().manual_seed(5)
    values = {
        "ties": (torch.randn(width, generator=generator) * 20).round() / 100,  # about 100 distinct values
        "special": torch.randn(width, generator=generator) * 1e-3,
        "equal": torch.full((width,), 0.25),
        "small": torch.randn(width, generator=generator) * 1e-4,  # about half float16 subnormals
    }[scores]
    if scores == "small":
        values[[8, 9, 10, 11]] = torch.tensor([-0.0, 0.0, 6e4, -6e4])  # near float16's largest
        values[20:30] = values[19]
    if scores == "special":
        values[[3, 40, 41, 200]] = float("nan")
        values[41] = -values[41]  # a NaN with its sign bit set ranks above +inf too
        values[[5, 6, 250]] = float("inf")
        values[[7, 299]] = float("-inf")
        values[[8, 9, 10]] = torch.tensor([-0.0, 0.0, 1e-42])  # a float32 subnormal
        values[100:120] = 3.0
    gate, up, down = nn.Linear(d, width, bias=False), nn.Linear(d, width, bias=False), nn.Linear(width, d, bias=False)
    predictor = nn.Sequential(nn.Linear(d, 1, bias=False), nn.Linear(1, width, bias=False)).requires_grad_(False)
    with torch.no_grad():  # scores = values exactly: P1 picks x[0] = 1, P2's column is the values
        predictor[0].weight.zero_()[0, 0] = 1.0
        predictor[1].weight.copy_(values[:, None])
    rounded = None if half == "float32" else getattr(torch, half)
    if rounded is not None:
        round_predictor(predictor, rounded)  # rounds the weights: the scores are the rounded values
        values = predictor[1].weight[:, 0].clone()
    call = predicted_call(None, predictor, gate, up, down, nn.SiLU(), rounded=rounded)
    assert call is not None and call.predictor_ref._obj.weights == cpu_kernels.weight_type(getattr(torch, half))
    x_pred, h, out = torch.zeros(d), torch.randn(d, generator=generator), torch.empty(d)
    x_pred[0] = 1.0
    rank = sorted(range(width), key=lambda i: (not values[i].isnan(), -values[i].nan_to_num(0.0).item(), i))
    for k in range(1, width + 1):
        neurons = torch.full((k,), -1, dtype=torch.int64)
        status = lib.dejavu_predicted_mlp(call.mlp_ref, call.predictor_ref, x_pred.data_ptr(), k, h.data_ptr(),
                                          None, out.data_ptr(), neurons.data_ptr())
        assert status == 0
        assert neurons.tolist() == sorted(rank[:k]), f"K={k}"


def test_predicted_mlp_kernel_follows_changed_predictor_weights():
    """The kernel's tiles are copies made per plan: a new plan reads a predictor changed in place,
    and a rounded predictor whose weights stop being that type's values falls back to float32 tiles."""
    from dejavu_llama.modules import cpu_kernels
    from dejavu_llama.modules.decode.sparse_gather import predicted_gathered_mlp, round_predictor

    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    torch.manual_seed(4)
    d, width, k = 16, 13, 4  # a width that is not a multiple of the tiles' eight rows
    gate, up, down = nn.Linear(d, width, bias=False), nn.Linear(d, width, bias=False), nn.Linear(width, d, bias=False)
    predictor = nn.Sequential(nn.Linear(d, 3, bias=False), nn.Linear(3, width, bias=False))
    h, x_pred = torch.randn(1, 1, d), torch.randn(1, 1, d)

    def both(rounded=None):
        plan = choose_backend("cpu", "cpu").prepare([])
        with torch.no_grad():
            fused = predicted_gathered_mlp(plan, h, x_pred, predictor, k, gate, up, down, nn.SiLU(), rounded=rounded)
            neurons = predictor(x_pred)[:, 0].topk(k).indices.sort().values
            act = nn.functional.silu(gate(h)) * up(h)
            mask = torch.zeros(1, 1, width).index_fill_(-1, neurons[0], 1.0)
            return fused, down(act * mask), plan.built("predicted_call", predictor).held[1][1][0].dtype

    for change in (lambda: None, lambda: predictor[1].weight.mul_(-1.0), lambda: predictor[0].weight.add_(0.5)):
        with torch.no_grad():
            change()
        fused, expected, _ = both()
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    for rounded in (torch.float16, torch.bfloat16):
        assert round_predictor(predictor, rounded)
        assert both(rounded)[2] == rounded
        with torch.no_grad():
            predictor[1].weight.add_(1e-4)  # no longer values of that type
        fused, expected, dtype = both(rounded)
        assert dtype == torch.float32
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_predictor_dtype_is_checked(tmp_path):
    model = LocalModel.from_checkpoint(build("llama", tmp_path), "llama-ml-att-sparse")
    predictors = {("mlp", layer): (nn.Sequential(nn.Linear(48, 8, bias=False), nn.Linear(8, 112, bias=False)), "same")
                  for layer in range(3)}
    with pytest.raises(SparseSetupError, match="float64"):
        configure_sparse(list(model.blocks), "predicted", predictors=predictors, sparse_attention=False,
                         predictor_dtype="float64")
    with torch.no_grad():
        predictors["mlp", 2][0][0].weight[0, 0] = 1e6
    with pytest.raises(SparseSetupError, match="layer 2.*float16's range"):
        configure_sparse(list(model.blocks), "predicted", predictors=predictors, sparse_attention=False,
                         predictor_dtype="float16")


def test_predictor_dtype_flag_reaches_the_predictors(tmp_path, capsys):
    import argparse

    from dejavu_llama.modules.sparse_execution import add_arguments, prepare_stage, settings_from_args

    model = LocalModel.from_checkpoint(build("llama", tmp_path), "llama-ml-att-sparse")
    torch.manual_seed(6)
    for layer in range(3):
        torch.save(nn.Sequential(nn.Linear(48, 8, bias=False), nn.Linear(8, 112, bias=False)).state_dict(),
                   tmp_path / f"c4_layer{layer}.pt")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--sparse-path", str(tmp_path), "--mlp-keep", "0.25", "--sparse-attention", "off"]
    args = parser.parse_args(common)
    args.variant_settings = settings_from_args(args, {"PREDICTOR_DTYPE": "float16"})  # upstream's name, at the edge
    assert args.variant_settings.predictor_dtype == "float16"
    assert settings_from_args(parser.parse_args(common + ["--predictor-dtype", "float32"]),
                              {"PREDICTOR_DTYPE": "float16"}).predictor_dtype == "float32"  # the flag wins
    prepare_stage(list(model.blocks), args, model.config)
    for block in model.blocks:
        assert block.mlp.predictor_rounded == torch.float16
        assert all(torch.equal(w, w.half().float()) for w in block.mlp.predictor.parameters())
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(common + ["--predictor-dtype", "bf16"])
    assert exit_info.value.code == 2 and "--predictor-dtype" in capsys.readouterr().err


def test_a_predictor_too_large_for_float16_runs_in_bfloat16(tmp_path):
    """A weight past float16's largest value: --predictor-dtype float16 refuses it with an error
    that names the layer and the flag; bfloat16 (float32's range) rounds it and the predicted MLP
    kernel reads bfloat16 tiles."""
    import argparse

    from dejavu_llama.modules.decode.sparse_gather import predicted_call
    from dejavu_llama.modules.sparse_execution import SparseSetupError, add_arguments, prepare_stage

    for layer in range(3):
        predictor = nn.Sequential(nn.Linear(48, 8, bias=False), nn.Linear(8, 112, bias=False))
        with torch.no_grad():
            predictor[1].weight[0, 0] = 1e5  # float16 ends at 65504
        torch.save(predictor.state_dict(), tmp_path / f"c4_layer{layer}.pt")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    common = ["--sparse-path", str(tmp_path), "--mlp-keep", "0.25", "--sparse-attention", "off", "--predictor-dtype"]
    model = LocalModel.from_checkpoint(build("llama", tmp_path / "model"), "llama-ml-att-sparse")
    with pytest.raises(SparseSetupError, match="layer 0.*float16's range.*--predictor-dtype bfloat16"):
        prepare_stage(list(model.blocks), parser.parse_args(common + ["float16"]), model.config)
    model = LocalModel.from_checkpoint(build("llama", tmp_path / "model"), "llama-ml-att-sparse")
    prepare_stage(list(model.blocks), parser.parse_args(common + ["bfloat16"]), model.config)
    for block in model.blocks:
        mlp = block.mlp
        assert mlp.predictor_rounded == torch.bfloat16
        assert all(torch.equal(w, w.bfloat16().float()) for w in mlp.predictor.parameters())
        call = predicted_call(model.plan("cpu"), mlp.predictor, *mlp.neuron_linears(), mlp.predictor_rounded)
        if call is not None:  # the kernels built here
            assert call.held[1][1][0].dtype == torch.bfloat16


@pytest.mark.parametrize("flags, message", [
    (["--mlp-keep", "-0.5"], "--mlp-keep"),
    (["--mlp-keep", "0"], "--mlp-keep"),
    (["--att-keep", "2.5"], "--att-keep"),
    (["--sparse-layers", "1-x"], "--sparse-layers"),
])
def test_bad_kept_fraction_is_refused_by_the_parser(flags, message, capsys):
    import argparse

    from dejavu_llama.modules.sparse_execution import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    if flags[0] == "--sparse-layers":  # checked against the model's layers when the stage is built
        args = parser.parse_args(flags)
        with pytest.raises(SparseSetupError, match=message):
            from dejavu_llama.modules.sparse_execution import prepare_stage
            prepare_stage([], args, type("Config", (), {"num_hidden_layers": 3})())
        return
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("name, value", [("TOPK", "-0.5"), ("ATTN_TOPK_1", "2.5"), ("SPARSE_MODE", "bogus")])
def test_bad_settings_from_the_environment_are_refused(name, value):
    import argparse

    from dejavu_llama.modules.sparse_execution import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SparseSetupError, match=rf"\${name}"):
        settings_from_args(parser.parse_args([]), {name: value})


def test_upstream_environment_names_fill_the_sparse_config(tmp_path):
    import argparse

    from dejavu_llama.modules.sparse_config import SparseConfig, config_path_beside
    from dejavu_llama.modules.sparse_execution import add_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    environ = {"SPARSE_MODE": "oracle", "SPRARSE_PATH": "/p", "TOPK": "0.25", "ATTN_TOPK_1": "3", "LAYER": "4",
               "PREDICTOR_DATASET": "wiki"}
    config = settings_from_args(parser.parse_args([]), environ)
    assert (config.mode, config.sparse_path, config.mlp_keep, config.att_keep, config.layers,
            config.predictor_dataset) == ("oracle", "/p", 0.25, 3.0, "4-", "wiki")
    flagged = settings_from_args(parser.parse_args(["--sparse-mode", "predicted", "--mlp-keep", "0.5"]), environ)
    assert (flagged.mode, flagged.mlp_keep) == ("predicted", 0.5)
    config.save_beside(tmp_path / "out.jsonl")  # saved beside the results, read back the same
    assert SparseConfig.load(config_path_beside(tmp_path / "out.jsonl")) == config


def test_count_above_the_width_is_refused_through_the_runner(tmp_path, caplog):
    from test_pipeline_support import run_in_process, runner_args, write_requests

    checkpoint = build("llama", tmp_path)  # MLP width 112, 6 heads
    requests = write_requests(tmp_path / "requests.jsonl", [{"prompt": "w1 w2 w3", "max_tokens": 0, "echo": True,
                                                             "logprobs": 1}])
    for flags, message in ((["--mlp-keep", "1000"], "--mlp-keep 1000: keeps 1000 units, but there are only 112"),
                           (["--att-keep", "7"], "--att-keep 7: keeps 7 units, but there are only 6")):
        output = tmp_path / "out.jsonl"
        args = runner_args(checkpoint, "llama-ml-att-sparse", requests, output,
                           ["--sparse-mode", "oracle", *flags])
        assert run_in_process(args) == 1
        assert message in caplog.text
        assert not output.exists()


def test_a_new_mode_is_one_object(tmp_path, monkeypatch):
    """A mode added as one SparseMode object (here: keep the even neurons) runs on every backend,
    with its stats and its byte cost, and nothing else changes."""
    from dejavu_llama.modules import sparse_execution
    from dejavu_llama.modules.sparse_cost import mlp_bytes_per_token
    from dejavu_llama.modules.sparse_stats import SparseStats

    class EvenNeurons(sparse_execution.SparseMode):
        name, kept_inputs = "even", ("neurons",)

        def mlp(self, mlp, h):
            act = mlp.activation(h)
            keep = torch.zeros(act.shape[-1], dtype=torch.bool)
            keep[::2] = True
            return mlp.output(act * keep.to(act.dtype)), {"neurons": keep.expand(act.shape)}

        def weight_count(self, d, inner, matrices, kept):
            return matrices * d * kept["neurons"] * inner

    monkeypatch.setitem(sparse_execution.MODES, "even", EvenNeurons())
    model = LocalModel.from_checkpoint(build("llama", tmp_path), "llama-ml-att-sparse")
    prompt = ids(1, 5, 9)
    runs = {}
    for backend in ("torch", "cpu", "cuda"):
        stats = SparseStats()
        configure_sparse(list(model.blocks), "even", stats=stats)
        runs[backend] = model.generate_greedy(prompt, 4, backend=backend, with_logprobs=True)
        summary = stats.summary()
        assert summary["layers"]["1"]["kept"]["neurons"] == pytest.approx(0.5)
        assert summary["bytes_relative"] == pytest.approx(0.5)
    for backend in ("cpu", "cuda"):
        assert torch.equal(runs[backend][0], runs["torch"][0])
        assert torch.allclose(runs[backend][1], runs["torch"][1], atol=1e-5)
    configure_sparse(list(model.blocks), "dense")
    assert not torch.equal(model.generate_greedy(prompt, 4, backend="torch", with_logprobs=True)[1], runs["torch"][1])
    assert mlp_bytes_per_token("even", 48, 112, 0.5)["relative"] == pytest.approx(0.5)
