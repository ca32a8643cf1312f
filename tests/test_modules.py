"""Our modules against transformers' LlamaForCausalLM / OPTForCausalLM on the same weights."""

import os

import pytest
import torch

from dejavu_llama.modules.common import CheckpointError
from dejavu_llama.modules.decode.cpu_views import view_of
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.task_datasets.offline_text import offline_documents
from tiny_models import tiny_llama, tiny_opt

LLAMA_CASES = {
    "gqa-untied": dict(),
    "llama3-rope": dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }),
    "legacy-rope-scaling": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }),
    "head-dim-16": dict(head_dim=16),
    "tied": dict(tie_word_embeddings=True),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
    "mha": dict(num_key_value_heads=6),
}

OPT_CASES = {
    "pre-ln": dict(),
    "post-ln-project": dict(do_layer_norm_before=False, word_embed_proj_dim=32),
}


def build(family, tmp_path, overrides):
    return (tiny_llama if family == "llama" else tiny_opt)(tmp_path, **overrides)


def random_ids(batch, length, vocab=256, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=generator)


ALL_CASES = [("llama", name, cfg) for name, cfg in LLAMA_CASES.items()] + [
    ("opt", name, cfg) for name, cfg in OPT_CASES.items()
]


@pytest.mark.parametrize("family,name,overrides", ALL_CASES, ids=[f"{f}-{n}" for f, n, _ in ALL_CASES])
def test_logits_match_transformers(tmp_path, family, name, overrides):
    hf_model, checkpoint = build(family, tmp_path, overrides)
    ours = LocalModel.from_checkpoint(checkpoint, family, dtype="float32")
    input_ids = random_ids(2, 40)
    with torch.no_grad():
        expected = hf_model(input_ids).logits
    actual, _ = ours(input_ids)
    assert (actual - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_left_padding_matches_unpadded_rows(tmp_path, family):
    _, checkpoint = build(family, tmp_path, {})
    ours = LocalModel.from_checkpoint(checkpoint, family)
    lengths = [17, 9, 3]
    rows = [random_ids(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    input_ids = torch.full((len(rows), width), 1, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    padded_logits, _ = ours(input_ids, mask=mask)
    for i, row in enumerate(rows):
        alone, _ = ours(row[None])
        diff = (padded_logits[i, width - len(row):] - alone[0]).abs().max().item()
        assert diff <= 1e-4, f"row {i}: {diff}"


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_kv_cache_decode_matches_full_forward_and_generate(tmp_path, family):
    hf_model, checkpoint = build(family, tmp_path, {})
    ours = LocalModel.from_checkpoint(checkpoint, family)
    prompt = random_ids(1, 12, seed=3)
    tokens = ours.generate_greedy(prompt, max_new_tokens=8)
    # Step-by-step decode equals the full-sequence forward on prompt + generated tokens.
    full_ids = torch.cat((prompt, tokens), dim=1)
    full_logits, _ = ours(full_ids)
    logits, past = ours(prompt)
    for step in range(8):
        assert torch.allclose(logits[:, -1], full_logits[:, prompt.shape[1] - 1 + step], atol=1e-4)
        logits, past = ours(full_ids[:, prompt.shape[1] + step][:, None], past=past)
    # GQA: the cache is kept once per KV head.
    config = ours.config
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    assert past[0][0].shape[1] == kv_heads
    with torch.no_grad():
        expected = hf_model.generate(
            prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt), pad_token_id=1
        )
    assert tokens.tolist() == expected[:, prompt.shape[1]:].tolist()


def test_left_padded_batch_generation_matches_transformers(tmp_path):
    hf_model, checkpoint = tiny_llama(tmp_path)
    ours = LocalModel.from_checkpoint(checkpoint, "llama")
    input_ids = random_ids(2, 10, seed=4)
    mask = torch.ones_like(input_ids)
    input_ids[1, :4], mask[1, :4] = 1, 0
    ours_tokens = ours.generate_greedy(input_ids, 6, mask=mask)
    with torch.no_grad():
        expected = hf_model.generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert ours_tokens.tolist() == expected[:, 10:].tolist()


def english_text(min_tokens, tokenizer):
    text = ""
    for passage in offline_documents():
        text += passage.text + "\n\n"
        if len(tokenizer(text).input_ids) >= min_tokens:
            return text
    raise AssertionError("not enough offline text")


def test_smollm2_matches_transformers_from_same_gguf(smollm2_checkpoint, smollm2_hf, smollm2_tokenizer):
    text = english_text(220, smollm2_tokenizer)
    input_ids = smollm2_tokenizer(text, return_tensors="pt").input_ids[:, :256]
    assert input_ids.shape[1] >= 200
    ours = LocalModel.from_checkpoint(smollm2_checkpoint, "llama", dtype="float32")
    assert len(ours.blocks) == 30 and ours.config.hidden_size == 576
    with torch.no_grad():
        expected = smollm2_hf(input_ids).logits
    actual, _ = ours(input_ids)
    assert (actual - expected).abs().max().item() <= 1e-3


# Strict loading: every failure names what is wrong.

def test_missing_layer_file_is_named(tmp_path):
    _, checkpoint = tiny_llama(tmp_path)
    os.remove(os.path.join(checkpoint, "pytorch_1.pt"))
    with pytest.raises(CheckpointError, match="pytorch_1.pt"):
        LocalModel.from_checkpoint(checkpoint, "llama")


def test_removed_key_is_named(tmp_path):
    _, checkpoint = tiny_llama(tmp_path)
    path = os.path.join(checkpoint, "pytorch_0.pt")
    state = torch.load(path)
    del state["self_attn.k_proj.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"pytorch_0\.pt.*missing key\(s\) self_attn\.k_proj\.weight"):
        LocalModel.from_checkpoint(checkpoint, "llama")


def test_extra_key_is_named(tmp_path):
    _, checkpoint = tiny_opt(tmp_path)
    path = os.path.join(checkpoint, "pytorch_lm_head.pt")
    state = torch.load(path)
    state["stray.weight"] = torch.zeros(2)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"pytorch_lm_head\.pt.*unexpected key\(s\) stray\.weight"):
        LocalModel.from_checkpoint(checkpoint, "opt")


def test_wrong_shape_is_named(tmp_path):
    _, checkpoint = tiny_llama(tmp_path)
    path = os.path.join(checkpoint, "pytorch_2.pt")
    state = torch.load(path)
    state["up_proj.weight"] = torch.zeros(5, 48)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"pytorch_2\.pt: key up_proj\.weight has shape \(5, 48\)"):
        LocalModel.from_checkpoint(checkpoint, "llama")


def test_unknown_dtype_is_named(tmp_path):
    _, checkpoint = tiny_llama(tmp_path)
    with pytest.raises(ValueError, match="'float17'"):
        LocalModel.from_checkpoint(checkpoint, "llama", dtype="float17")


def test_missing_config_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        LocalModel.from_checkpoint(str(tmp_path / "nowhere"), "llama")


def test_kv_cache_appends_in_place_and_branches_safely():
    from dejavu_llama.modules.common import KVCache, extend_cache

    def kv(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(2, 3, n, 4, generator=g), torch.randn(2, 3, n, 4, generator=g)

    k0, v0 = kv(5, 0)
    first, keys, values = extend_cache(None, k0, v0)
    assert isinstance(first, KVCache) and first.length == 5 and torch.equal(keys, k0) and torch.equal(values, v0)
    k1, v1 = kv(1, 1)
    second, keys, _ = extend_cache(first, k1, v1)
    assert second.buffers is first.buffers  # written in place, no copy of the 5 earlier positions
    assert torch.equal(keys, torch.cat((k0, k1), dim=2))
    # A branch from `first` must not overwrite what `second` holds.
    k2, v2 = kv(1, 2)
    branch, branch_keys, _ = extend_cache(first, k2, v2)
    assert branch.buffers is not first.buffers
    assert torch.equal(second.keys, torch.cat((k0, k1), dim=2)) and torch.equal(branch_keys, torch.cat((k0, k2), dim=2))
    # Growing past the capacity keeps every position.
    cache, steps = second, [k1]
    for step in range(100):
        k, v = kv(1, 10 + step)
        cache, keys, _ = extend_cache(cache, k, v)
        steps.append(k)
    assert cache.length == 106 and torch.equal(keys, torch.cat([k0, *steps], dim=2))
    # A transformers-style (k, v) pair is accepted as the past.
    pair_cache, keys, _ = extend_cache((k0, v0), k1, v1)
    assert torch.equal(keys, torch.cat((k0, k1), dim=2))


@pytest.mark.parametrize("rows,width,bias", [(1536, 576, False), (7, 13, True), (33, 64, True)])
def test_decode_linear_single_row_matches_torch(rows, width, bias):
    from dejavu_llama.modules.cpu_kernels import kernel_library
    from dejavu_llama.modules.decode import choose_backend
    from dejavu_llama.modules.decode.sparse_gather import linear_forward

    torch.manual_seed(0)
    layer = torch.nn.Linear(width, rows, bias=bias)
    plan = choose_backend("cpu", "cpu").prepare([])
    with torch.no_grad():
        for x in (torch.randn(1, 1, width), torch.randn(width), torch.randn(3, 2, width)):
            torch.testing.assert_close(linear_forward(plan, layer, x),
                                       torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    if kernel_library() is not None:  # the one-row case really took the kernel (its rows derived by the plan)
        assert plan.built("rows", layer) is not None
    assert type(layer) is torch.nn.Linear


@pytest.mark.parametrize("family,name,overrides", ALL_CASES, ids=[f"{f}-{n}" for f, n, _ in ALL_CASES])
def test_fused_decode_layer_matches_torch_ops(tmp_path, family, name, overrides):
    """The C decoder layer (one token, batch 1) against the torch ops on the same model: Llama's
    GQA/MHA, biases, head_dim, RoPE scaling; OPT pre-LN and post-LN; a left-padded prompt, and
    a branch off an older cache."""
    from dejavu_llama.modules import cpu_kernels

    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    _, checkpoint = build(family, tmp_path, overrides)
    ours = LocalModel.from_checkpoint(checkpoint, family)
    prompt = random_ids(1, 9, seed=5)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0

    def decode(steps, backend):
        logits, past = ours(prompt, mask=mask, backend=backend)
        step_mask, outputs, caches = mask, [], []
        for token in steps:
            step_mask = torch.cat((step_mask, torch.ones(1, 1, dtype=mask.dtype)), dim=1)
            logits, past = ours(torch.tensor([[token]]), mask=step_mask, past=past, backend=backend)
            outputs.append(logits[:, -1])
            caches.append(past)
        # Branch: decode another token from the cache of two steps back.
        branch, _ = ours(torch.tensor([[7]]), mask=step_mask[:, :-1], past=caches[-3], backend=backend)
        return torch.cat(outputs + [branch[:, -1]])

    steps = random_ids(1, 6, seed=6)[0].tolist()
    fused, reference = decode(steps, "cpu"), decode(steps, "torch")
    assert view_of(ours.plan("cpu"), ours.blocks[0]) is not None  # the C layer really ran
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_move_to_huge_pages_keeps_values_keys_and_sharing():
    from torch import nn

    from dejavu_llama.modules.decode.huge_pages import HUGE_PAGE, move_to_huge_pages

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(512, 1024), nn.LayerNorm(1024), nn.Linear(1024, 512, bias=False))
    module[2].weight = nn.Parameter(module[0].weight.t())  # shared storage must stay shared
    module.register_buffer("steps", torch.arange(5))  # not floating point: left where it is
    before = {key: value.clone() for key, value in module.state_dict().items()}
    moved = move_to_huge_pages(module)
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(p, nn.Parameter) for p in module.parameters())
    from dejavu_llama.modules.decode import huge_pages
    if not huge_pages.ENABLED:
        assert moved == 0
        return
    assert 512 * 1024 * 4 <= moved < 2 * 512 * 1024 * 4  # the shared weight is copied once
    assert module[0].weight.data_ptr() % HUGE_PAGE == 0  # the first storage starts the buffer
    module[2].weight.data.mul_(2)  # the shared weight is still one tensor
    assert torch.equal(module[0].weight.t(), module[2].weight)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_fused_decode_layer_follows_changed_weights(tmp_path, family):
    """A new plan (prepare) reads a weight replaced, re-pointed (.data =) or a whole Linear
    swapped: each change shows in its logits as in the torch ops'."""
    from dejavu_llama.modules import cpu_kernels

    if cpu_kernels.kernel_library() is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    _, checkpoint = build(family, tmp_path, {})
    ours = LocalModel.from_checkpoint(checkpoint, family)
    block, prompt = ours.blocks[1], random_ids(1, 5, seed=8)
    attention = block.self_attn
    first_mlp = block.mlp.neuron_linears()[0]  # gate_proj / fc1
    query = attention.q_proj

    def step(backend):
        with torch.no_grad():
            _, past = ours(prompt, backend=backend)
            return ours(torch.tensor([[9]]), past=past, backend=backend)[0][:, -1]

    def swap_linear():
        twin = torch.nn.Linear(query.in_features, query.out_features, bias=query.bias is not None)
        with torch.no_grad():
            twin.weight.copy_(query.weight.flip(0))
            if twin.bias is not None:
                twin.bias.copy_(query.bias)
        attention.q_proj = twin

    changes = [
        lambda: None,
        lambda: setattr(first_mlp, "weight", torch.nn.Parameter(first_mlp.weight.detach() * 2.0, requires_grad=False)),
        lambda: setattr(query.weight, "data", query.weight.detach() * -1.0),
        swap_linear,
    ]
    before = None
    for change in changes:
        change()
        plan = ours.prepare("cpu")  # replaced weights: a new plan
        fused = step("cpu")
        assert view_of(plan, block) is not None  # the C layer really ran
        torch.testing.assert_close(fused, step("torch"), rtol=1e-5, atol=1e-5)
        assert before is None or not torch.allclose(fused, before)  # the change mattered
        before = fused
