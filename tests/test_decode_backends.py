"""Decode backends (modules/decode): every backend gives the reference's tokens and logprobs,
dense and under every sparse mode.

The cuda backend's static-cache step runs eagerly here (no GPU): the same step that is captured
as a CUDA graph on a GPU, reading its position, cache slot and key mask from tensors.
"""

import pytest
import torch
from torch import nn

from dejavu_llama.modules import cpu_kernels
from dejavu_llama.modules.common import StaticDecodeState, StaticKVCache
from dejavu_llama.modules.decode import BackendError, StaticCacheStage, choose_backend, cpu, sparse_gather
from dejavu_llama.modules.decode.cpu_views import view_of
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.modules.sparse_execution import configure_sparse
from dejavu_llama.modules.sparse_stats import SparseStats
from tiny_models import tiny_llama, tiny_opt

BACKENDS = ("torch", "cpu", "cuda")


def prompts(batch, length, seed, padded=True):
    """Input ids and a left-padding mask (row r has r padding positions when padded)."""
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    if padded:
        for row in range(batch):
            mask[row, :row] = 0
    return ids, mask


@pytest.fixture(scope="module", params=["llama", "opt"])
def family_checkpoint(request, tmp_path_factory):
    build = tiny_llama if request.param == "llama" else tiny_opt
    return request.param, build(tmp_path_factory.mktemp(request.param))[1]


@pytest.mark.parametrize("batch", [1, 3])
def test_every_backend_gives_the_reference_tokens_and_logprobs(family_checkpoint, batch):
    family, checkpoint = family_checkpoint
    model = LocalModel.from_checkpoint(checkpoint, family)
    input_ids, mask = prompts(batch, 7, seed=batch)
    mask = mask if batch > 1 else None
    runs = {name: model.generate_greedy(input_ids, 9, mask=mask, backend=name, with_logprobs=True)
            for name in BACKENDS}
    tokens, logprobs = runs["torch"]
    assert tokens.shape == (batch, 9)
    for name in BACKENDS[1:]:
        assert torch.equal(runs[name][0], tokens), name
        assert torch.allclose(runs[name][1], logprobs, atol=1e-5), name


def random_predictors(config, rank=8, biased=False, prev_layers=()):
    """{(kind, layer): (predictor, input mode)}: random low-rank predictors for the MLP and the heads;
    layers in prev_layers read the look-ahead input (the layer's input for the MLP, the previous
    layer's for the heads)."""
    width = getattr(config, "intermediate_size", None) or config.ffn_dim
    torch.manual_seed(7)
    predictors = {}
    for layer in range(config.num_hidden_layers):
        mode = "prev" if layer in prev_layers else "same"
        for kind, out in (("mlp", width), ("att", config.num_attention_heads)):
            predictors[kind, layer] = (nn.Sequential(nn.Linear(config.hidden_size, rank, bias=biased),
                                                     nn.Linear(rank, out, bias=biased)).requires_grad_(False), mode)
    return predictors


TEAL = {layer: {"t_in": 0.6, "t_down": 0.005} for layer in range(3)}
CATS = {layer: {"t_gate": 0.03} for layer in range(3)}
# name: (configure_sparse options, predictor options or None, what the cpu backend's layer kernel
# runs for Llama: "layer" (the dense layer), "predicted" (the layer with the predicted MLP),
# "teal" / "cats" (the layer with that MLP), "half" (the attention half, then the MLP in torch
# ops), None (the block's torch forward))
SPARSE_CASES = {
    "dense": (dict(), None, "layer"),
    "oracle": (dict(mlp_keep=0.25, att_keep=0.5), None, None),
    "predicted": (dict(mlp_keep=0.25, sparse_attention=False), {}, "predicted"),
    "predicted float16 prev": (dict(mlp_keep=0.25, sparse_attention=False, predictor_dtype="float16"),
                               dict(prev_layers=(1, 2)), "predicted"),
    "predicted biased": (dict(mlp_keep=0.25, sparse_attention=False), dict(biased=True), "half"),
    "predicted heads prev": (dict(mlp_keep=0.25, att_keep=0.5), dict(prev_layers=(1, 2)), None),
    "predicted layers 1-": (dict(mlp_keep=2, layers={1, 2}, sparse_attention=False), {}, "predicted"),
    # layers 0 and 1 through the kernels, layer 2's heads read layer 1's input (a kernel step's output)
    "predicted heads prev layer 2": (dict(mlp_keep=0.25, att_keep=0.5, layers={2}), dict(prev_layers=(2,)), "layer"),
    "teal": (dict(mlp_keep=0.5, thresholds=TEAL), None, "teal"),
    "cats": (dict(mlp_keep=0.5, thresholds=CATS), None, "cats"),
    "wina": (dict(mlp_keep=0.5), None, None),
}


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_every_backend_gives_the_reference_under_sparse_modes(family_checkpoint, case, monkeypatch):
    """Batch 1 (where the C kernels apply): each sparse mode through every backend gives the torch
    backend's tokens, logprobs and --sparse-stats; the cpu backend runs the layer kernel it should."""
    family, checkpoint = family_checkpoint
    options, predictor_options, kernel = SPARSE_CASES[case]
    mode = case.split()[0]
    if mode == "cats" and family == "opt":
        pytest.skip("cats needs a gated MLP (Llama)")
    lib = cpu_kernels.kernel_library()
    if lib is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    training_free_layers = {}  # Llama layer calls with TEAL's or CATS's MLP: calls per method
    methods = {cpu_kernels.MLP_TEAL: "teal", cpu_kernels.MLP_CATS: "cats"}
    real = lib.dejavu_llama_layer

    def counted(layer, mlp_step, layer_step):
        method = methods.get(mlp_step.kind)
        if method is not None:
            training_free_layers[method] = training_free_layers.get(method, 0) + 1
        return real(layer, mlp_step, layer_step)
    monkeypatch.setattr(lib, "dejavu_llama_layer", counted)
    model = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    if predictor_options is not None:
        options = dict(options, predictors=random_predictors(model.config, **predictor_options))
    input_ids, _ = prompts(1, 6, seed=11)
    runs, stats = {}, {}
    for name in BACKENDS:
        stats[name] = SparseStats()
        configure_sparse(list(model.blocks), mode, stats=stats[name], **options)
        runs[name] = model.generate_greedy(input_ids, 8, backend=name, with_logprobs=True)
        if name == "cpu":
            views = [view_of(model.plan("cpu"), block) for block in model.blocks]
    tokens, logprobs = runs["torch"]
    for name in BACKENDS[1:]:
        assert torch.equal(runs[name][0], tokens), name
        assert torch.allclose(runs[name][1], logprobs, atol=1e-5), name
        got, want = stats[name].summary()["layers"], stats["torch"].summary()["layers"]
        assert got.keys() == want.keys(), name
        for layer, entry in got.items():
            assert entry["tokens"] == want[layer]["tokens"], (name, layer)
            assert entry["kept"] == pytest.approx(want[layer]["kept"]), (name, layer)
    if family == "opt":  # the whole OPT layer in C where the MLP is dense; no other OPT layer kernel
        kernel = "layer" if kernel == "layer" else None
    view = views[1]  # layer 1 is sparse in every case
    ran = None if view is None else "predicted" if view.predicted is not None else "layer" if view.has_mlp else "half"
    if ran == "half" and training_free_layers:
        assert list(training_free_layers) == [mode] and training_free_layers[mode] == 7 * 3  # 7 steps, 3 layers
        ran = mode
    assert ran == kernel


def test_a_dense_configuration_gives_the_mlp_its_rows_back(family_checkpoint):
    """After a sparse mode laid the MLP out for its kernels (teal: by input column; cats: by
    neuron), configuring dense lays the checkpoint's rows back: the same state dict and tokens,
    and the cpu backend's dense layer kernel reads the MLP again."""
    family, checkpoint = family_checkpoint
    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    model = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    input_ids, _ = prompts(1, 6, seed=12)
    reference = model.generate_greedy(input_ids, 4, backend="torch")

    def weights(block):
        return [linear.weight for linear in block.mlp.neuron_linears()[:3] if linear is not None]

    for mode, thresholds in (("teal", TEAL), ("cats", CATS))[: 1 if family == "opt" else 2]:
        configure_sparse(list(model.blocks), mode, mlp_keep=0.5, thresholds=thresholds)
        assert not all(weight.is_contiguous() for weight in weights(model.blocks[1]))
        configure_sparse(list(model.blocks), "dense")
        assert all(weight.is_contiguous() for block in model.blocks for weight in weights(block))
        state = model.state_dict()
        assert all(torch.equal(state[key], value) for key, value in before.items())
        assert torch.equal(model.generate_greedy(input_ids, 4, backend="cpu"), reference)
        assert all(view_of(model.plan("cpu"), block).has_mlp for block in model.blocks), mode


def test_the_torch_backend_never_takes_the_kernels(family_checkpoint, monkeypatch):
    """torch is the reference: no kernel step, no one-row kernel, plain nn.Linears; the cpu
    backend's plan takes both, and leaves the modules' classes as they are."""
    family, checkpoint = family_checkpoint
    model = LocalModel.from_checkpoint(checkpoint, family)
    input_ids, _ = prompts(1, 5, seed=4)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    steps, rows = [], []
    real_step, real_rows = cpu.kernel_step, sparse_gather.kernel_rows

    def counting_step(*args):
        steps.append(args[1])
        return real_step(*args)

    def counting_rows(*args):
        rows.append(args[1])
        return real_rows(*args)

    monkeypatch.setattr(cpu, "kernel_step", counting_step)
    monkeypatch.setattr(sparse_gather, "kernel_rows", counting_rows)
    reference = model.generate_greedy(input_ids, 4, backend="torch")
    assert not steps and not rows
    assert torch.equal(model.generate_greedy(input_ids, 4, backend="cpu"), reference)
    assert steps and rows == [model.head.lm_head] * 4  # each token's vocabulary projection
    assert linears and all(type(m) is nn.Linear for m in linears)


def test_the_static_cache_equals_the_growing_cache_under_sparse_modes(tmp_path):
    checkpoint = tiny_llama(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
    config = model.config
    torch.manual_seed(3)
    predictors = {}
    for layer in range(config.num_hidden_layers):
        predictors["mlp", layer] = (nn.Sequential(nn.Linear(config.hidden_size, 8, bias=False),
                                                  nn.Linear(8, config.intermediate_size, bias=False)), "same")
        predictors["att", layer] = (nn.Sequential(nn.Linear(config.hidden_size, 8, bias=False),
                                                  nn.Linear(8, config.num_attention_heads, bias=False)), "same")
    input_ids, _ = prompts(1, 6, seed=5)
    for mode, options in (("predicted", dict(mlp_keep=0.25, att_keep=0.5, predictors=predictors)),
                          ("oracle", dict(mlp_keep=0.25, att_keep=0.5))):
        configure_sparse(list(model.blocks), mode, **options)
        reference = model.generate_greedy(input_ids, 8, backend="torch", with_logprobs=True)
        static = model.generate_greedy(input_ids, 8, backend="cuda", with_logprobs=True)
        assert torch.equal(static[0], reference[0]), mode
        assert torch.allclose(static[1], reference[1], atol=1e-5), mode


def test_the_static_step_reads_tensors_not_python_numbers(tmp_path):
    """Two steps of one stage run the same code with the same tensors: what changes between
    tokens (position, cache slot, key mask) lives in the state's tensors, as a CUDA graph needs."""
    checkpoint = tiny_llama(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, "llama")
    stage = StaticCacheStage(model.plan("cuda"), batch=1, capacity=12, device="cpu", use_graph=False)
    input_ids, _ = prompts(1, 5, seed=2)
    stage.prefill(model.embeddings(input_ids), None)
    addresses = (stage.state.positions.data_ptr(), stage.state.write_index.data_ptr(),
                 stage.caches[0].keys.data_ptr())
    assert stage.state.positions.item() == 5 and stage.state.key_valid[0].tolist() == [True] * 5 + [False] * 7
    token = input_ids[:, -1:]
    for step in range(2):
        stage.decode(model.embeddings(token))
        assert stage.state.write_index.item() == 5 + step
    assert stage.state.positions.item() == 7 and stage.state.length == 7
    assert (stage.state.positions.data_ptr(), stage.state.write_index.data_ptr(),
            stage.caches[0].keys.data_ptr()) == addresses


def test_a_full_static_cache_is_an_error():
    state = StaticDecodeState(batch=1, capacity=3, device="cpu")
    cache = StaticKVCache(state)
    with pytest.raises(ValueError, match="holds 3 positions"):
        cache.update(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    state.prompt_done(None, 3)
    with pytest.raises(ValueError, match="full"):
        state.begin_token()


def test_choose_backend():
    assert choose_backend("auto", "cpu").name == "cpu"
    assert choose_backend(None, torch.device("cuda", 0)).name == "cuda"
    assert choose_backend("torch", "cpu").name == "torch"
    with pytest.raises(BackendError, match="known backends"):
        choose_backend("tpu", "cpu")
    with pytest.raises(BackendError, match="runs on the CPU"):
        choose_backend("cpu", torch.device("cuda", 0))


def test_the_pool_reuses_a_static_stage_only_for_the_same_rows_capacity_and_configuration(tmp_path):
    from dejavu_llama.modules.decode import StagePool

    checkpoint = tiny_llama(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse")
    pool = StagePool(choose_backend("cuda", "cpu").prepare(model.blocks), "cpu")
    first = pool.stage(2, 20)
    assert pool.stage(2, 100) is first  # both round up to 128 positions
    assert pool.stage(2, 20, slot=1) is not first  # another micro-batch of the same batch
    assert pool.stage(3, 20) is not first
    configure_sparse(list(model.blocks), "oracle", mlp_keep=0.5)
    assert pool.stage(2, 20) is not first  # a captured step holds the blocks' configuration
    cpu_pool = StagePool(choose_backend("cpu", "cpu").prepare(model.blocks), "cpu")
    assert cpu_pool.stage(2, 20) is not cpu_pool.stage(2, 20)


def test_a_reused_static_stage_gives_the_same_tokens(tmp_path):
    """The engine keeps its stages across batches: the second batch (other prompts, same shape)
    must not see the first one's keys."""
    from dejavu_llama.modules.decode import StagePool

    checkpoint = tiny_llama(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, "llama")
    pool = StagePool(choose_backend("cuda", "cpu").prepare(model.blocks), "cpu")

    def greedy(input_ids, mask, new_tokens):
        stage = pool.stage(*input_ids.shape)
        logits = model.head(stage.prefill(model.embeddings(input_ids, mask=mask), mask)[:, -1:])
        tokens = []
        for _ in range(new_tokens):
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            mask = torch.cat((mask, torch.ones_like(tokens[-1])), dim=1)
            logits = model.head(stage.decode(model.embeddings(tokens[-1], past_layer=stage.first_cache, mask=mask)))
        return torch.cat(tokens, dim=1)

    for seed in (1, 2):
        input_ids, mask = prompts(2, 6, seed=seed)
        assert torch.equal(greedy(input_ids, mask, 5), model.generate_greedy(input_ids, 5, mask=mask, backend="torch"))


def test_a_sequence_prepares_each_kernel_step_once(family_checkpoint, monkeypatch):
    """The cpu backend checks and prepares a block's kernel step at a sequence's first token and
    reuses it (cpu.DecodingSteps); the next sequence prepares afresh, and a new plan (prepare)
    reads a weight replaced between two calls."""
    family, checkpoint = family_checkpoint
    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    model = LocalModel.from_checkpoint(checkpoint, family)
    input_ids, _ = prompts(1, 5, seed=6)
    prepared = []
    real_kernel_step = cpu.kernel_step

    def counting(plan, block, x, layer_past):
        step = real_kernel_step(plan, block, x, layer_past)
        if step is not None:
            prepared.append(block.layer_index)
        return step

    monkeypatch.setattr(cpu, "kernel_step", counting)
    first = model.generate_greedy(input_ids, 6, backend="cpu")
    layers = [block.layer_index for block in model.blocks]
    assert prepared == layers  # one preparation per block for the 5 decoding steps
    assert torch.equal(first, model.generate_greedy(input_ids, 6, backend="torch"))
    output = model.blocks[0].self_attn.o_proj if family == "llama" else model.blocks[0].self_attn.out_proj
    with torch.no_grad():
        output.weight = nn.Parameter(output.weight * -3.0, requires_grad=False)
    model.prepare("cpu")  # replaced weights: a new plan
    prepared.clear()
    second = model.generate_greedy(input_ids, 6, backend="cpu")
    assert prepared == layers
    assert torch.equal(second, model.generate_greedy(input_ids, 6, backend="torch"))
    assert not torch.equal(second, first)


def test_cpu_decoding_steps_run_torch_on_one_thread(family_checkpoint, monkeypatch):
    """The cpu backend's batch-1 kernel steps run torch's ops on one thread (their OpenMP workers
    would spin on the kernels' cores); a block that runs its forward gets torch's threads (its
    products are torch's), and torch has its thread count back after each step."""
    family, checkpoint = family_checkpoint
    model = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")
    input_ids, _ = prompts(1, 5, seed=7)
    seen = []
    real_step, real_forward = cpu.kernel_step, type(model.blocks[0]).forward

    def recording_step(*args):
        step = real_step(*args)
        if step is None:
            return None

        def recorded(*step_args):
            seen.append(("kernel", torch.get_num_threads()))
            return step(*step_args)
        return recorded

    def recording_forward(block, x, *args, **kwargs):
        if x.shape[1] == 1:  # decoding steps only
            seen.append(("forward", torch.get_num_threads()))
        return real_forward(block, x, *args, **kwargs)

    monkeypatch.setattr(cpu, "kernel_step", recording_step)
    monkeypatch.setattr(type(model.blocks[0]), "forward", recording_forward)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        configure_sparse(list(model.blocks), "dense")
        model.generate_greedy(input_ids, 4, backend="cpu")
        assert set(seen) == {("kernel", 1)} and torch.get_num_threads() == 2
        seen.clear()  # oracle: every block runs its forward, on torch's threads
        configure_sparse(list(model.blocks), "oracle", mlp_keep=0.5)
        model.generate_greedy(input_ids, 3, backend="cpu")
        assert set(seen) == {("forward", 2)} and torch.get_num_threads() == 2
        seen.clear()  # a larger batch runs the blocks' torch forward, on torch's threads
        configure_sparse(list(model.blocks), "dense")
        model.generate_greedy(input_ids.repeat(2, 1), 3, backend="cpu")
        assert set(seen) == {("forward", 2)} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)