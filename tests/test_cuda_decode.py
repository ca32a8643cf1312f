"""The cuda decode backend on a GPU: CUDA-graph replays give the eager reference's tokens.

Skipped without CUDA (CI has none); the same static-cache step is checked eagerly on the CPU in
test_decode_backends.py. On a GPU: `pytest tests/test_cuda_decode.py`.
"""

import pytest
import torch
from torch import nn

from dejavu_llama.modules.decode import StaticCacheStage
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.modules.sparse_execution import configure_sparse
from tiny_models import tiny_llama, tiny_opt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def prompts(batch, length, seed):
    ids = torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, :row] = 0
    return ids.cuda(), mask.cuda()


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("batch", [1, 4])
def test_graph_replays_give_the_eager_tokens_and_logprobs(tmp_path, family, batch):
    checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, family, device="cuda")
    input_ids, mask = prompts(batch, 9, seed=batch)
    graphed = model.generate_greedy(input_ids, 12, mask=mask, backend="cuda", with_logprobs=True)
    stage = model.stage_pool("cuda", input_ids.device).stages
    assert any(s.graph is not None for s in stage.values()), "no CUDA graph was captured"
    eager = model.generate_greedy(input_ids, 12, mask=mask, backend="torch", with_logprobs=True)
    assert torch.equal(graphed[0], eager[0])
    assert torch.allclose(graphed[1], eager[1], atol=1e-4)
    again = model.generate_greedy(input_ids, 12, mask=mask, backend="cuda", with_logprobs=True)  # replayed graph
    assert torch.equal(again[0], graphed[0])


def test_graph_replays_of_predicted_sparse_blocks(tmp_path):
    checkpoint = tiny_llama(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse", device="cuda")
    config = model.config
    torch.manual_seed(0)
    predictors = {}
    for layer in range(config.num_hidden_layers):
        predictors["mlp", layer] = (nn.Sequential(nn.Linear(config.hidden_size, 8, bias=False),
                                                  nn.Linear(8, config.intermediate_size, bias=False)).cuda(), "same")
        predictors["att", layer] = (nn.Sequential(nn.Linear(config.hidden_size, 8, bias=False),
                                                  nn.Linear(8, config.num_attention_heads, bias=False)).cuda(), "same")
    configure_sparse(list(model.blocks), "predicted", predictors=predictors, mlp_keep=0.25, att_keep=0.5)
    input_ids, _ = prompts(1, 7, seed=3)
    graphed = model.generate_greedy(input_ids, 10, backend="cuda", with_logprobs=True)
    eager = model.generate_greedy(input_ids, 10, backend="torch", with_logprobs=True)
    assert torch.equal(graphed[0], eager[0])
    assert torch.allclose(graphed[1], eager[1], atol=1e-4)


def test_float16_graph_replays_agree_with_eager(tmp_path):
    checkpoint = tiny_llama(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, "llama", device="cuda", dtype=torch.float16)
    input_ids, _ = prompts(1, 16, seed=4)
    stage = StaticCacheStage(model.blocks, 1, 64, "cuda")
    x = stage.prefill(model.embeddings(input_ids), None)
    reference = model(input_ids)[0]
    assert torch.allclose(model.head(x).float(), reference.float(), atol=2e-2)
    graphed = model.generate_greedy(input_ids, 8, backend="cuda", with_logprobs=True)
    eager = model.generate_greedy(input_ids, 8, backend="torch", with_logprobs=True)
    assert (graphed[0] == eager[0]).float().mean() >= 0.75  # float16: ties may break apart late
    assert torch.allclose(graphed[1][:, :2], eager[1][:, :2], atol=2e-2)


def test_the_triton_predicted_mlp_gives_the_cpu_torch_path_numbers(tmp_path):
    """Batch 1: the CUDA path (predictor, top-K, Triton gathered MLP) against the CPU's masked
    torch ops, same float32 weights and predictors."""
    from dejavu_llama.modules.decode import cuda_sparse

    checkpoint = tiny_llama(tmp_path)[1]
    torch.manual_seed(1)
    config = LocalModel.from_checkpoint(checkpoint, "llama").config
    predictors = {("mlp", layer): (nn.Sequential(nn.Linear(config.hidden_size, 8, bias=False),
                                                 nn.Linear(8, config.intermediate_size, bias=False)), "same")
                  for layer in range(config.num_hidden_layers)}
    runs = []
    for device in ("cpu", "cuda"):
        model = LocalModel.from_checkpoint(checkpoint, "llama-ml-att-sparse", device=device)
        on_device = {key: (module.to(device), mode) for key, (module, mode) in predictors.items()}
        configure_sparse(list(model.blocks), "predicted", predictors=on_device, mlp_keep=0.25,
                         sparse_attention=False, use_gather=device == "cuda")
        input_ids, _ = prompts(1, 7, seed=6)
        runs.append(model.generate_greedy(input_ids.to(device), 8, backend="torch", with_logprobs=True))
        if device == "cuda":
            with torch.no_grad():
                assert cuda_sparse.usable(torch.zeros(1, device="cuda")), "the Triton path did not apply"
    assert torch.equal(runs[0][0], runs[1][0].cpu())
    assert torch.allclose(runs[0][1], runs[1][1].cpu(), atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("batch", [1, 4])
def test_graph_replays_of_the_kept_heads_path_give_the_masked_heads(tmp_path, monkeypatch, family, batch):
    """Predicted heads at keep 0.5 (MLP dense): the kept-heads path (q rows and output-projection
    columns through Triton, captured as a CUDA graph) against the masked torch heads (--no-gather),
    same weights."""
    from dejavu_llama.modules.decode import cuda_sparse

    checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)[1]
    model = LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse", device="cuda")
    config = model.config
    torch.manual_seed(5)
    predictors = {("att", layer): (nn.Sequential(nn.Linear(config.hidden_size, 8, bias=False),
                                                 nn.Linear(8, config.num_attention_heads, bias=False)).cuda(), "same")
                  for layer in range(config.num_hidden_layers)}
    calls = []
    sparse_heads_attention = cuda_sparse.sparse_heads_attention
    monkeypatch.setattr(cuda_sparse, "sparse_heads_attention",
                        lambda *args: calls.append(1) or sparse_heads_attention(*args))
    input_ids, mask = prompts(batch, 9, seed=7)
    runs = {}
    for use_gather, backend in ((False, "torch"), (True, "cuda")):
        configure_sparse(list(model.blocks), "predicted", predictors=predictors, att_keep=0.5, sparse_mlp=False,
                         use_gather=use_gather)
        calls.clear()
        runs[use_gather] = model.generate_greedy(input_ids, 10, mask=mask, backend=backend, with_logprobs=True)
        assert bool(calls) == use_gather
    assert all(cuda_sparse.output_projection(block).weight.t().is_contiguous() for block in model.blocks)
    assert torch.equal(runs[True][0], runs[False][0])
    assert torch.allclose(runs[True][1], runs[False][1], atol=1e-4)
