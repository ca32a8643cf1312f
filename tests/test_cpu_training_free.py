"""TEAL's and CATS's C kernels (decode/cpu_training_free.py) against their masked torch ops."""

import pytest
import torch

from dejavu_llama.modules import cpu_kernels
from dejavu_llama.modules.decode import cpu_training_free
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.modules.sparse_execution import MODES, configure_sparse
from tiny_models import tiny_llama, tiny_opt

pytestmark = pytest.mark.skipif(cpu_kernels.kernel_library() is None, reason="no CPU kernels")


@pytest.fixture(scope="module", params=["llama", "opt"])
def family_model(request, tmp_path_factory):
    build = tiny_llama if request.param == "llama" else tiny_opt
    checkpoint = build(tmp_path_factory.mktemp(request.param))[1]
    return request.param, LocalModel.from_checkpoint(checkpoint, f"{request.param}-ml-att-sparse")


def mlp_inputs(model, count, seed):
    return [torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(seed + i))
            for i in range(count)]


def quantile_thresholds(model, h, mode, keep):
    """Per layer, thresholds that keep about `keep` of these inputs' entries."""
    found = {}
    for block in model.blocks:
        found[block.layer_index] = thresholds_of(block, h, mode, keep)
    return found


@torch.no_grad()
def thresholds_of(block, h, mode, keep):
    first, _, _, act_fn = block.mlp.neuron_linears()
    if mode == "cats":
        return {"t_gate": float(act_fn(first(h)).abs().quantile(1 - keep))}
    act = block.mlp.activation(h)
    return {"t_in": float(h.abs().quantile(1 - keep)), "t_down": float(act.abs().quantile(1 - keep))}


@pytest.mark.parametrize("mode", ["teal", "cats"])
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("threads", [1, 3])
def test_the_kernel_equals_the_masked_torch_ops(family_model, mode, keep, threads):
    family, model = family_model
    if mode == "cats" and family == "opt":
        pytest.skip("cats needs a gated MLP (Llama)")
    inputs = mlp_inputs(model, 4, seed=int(keep * 100))
    thresholds = None if keep == 1.0 else quantile_thresholds(model, torch.cat(inputs, 1), mode, keep)
    configure_sparse(list(model.blocks), mode, mlp_keep=keep, thresholds=thresholds)
    plan = model.plan("cpu")
    previous = cpu_kernels.num_threads()
    cpu_kernels.set_num_threads(threads)
    kernel_calls = []
    try:
        for block in model.blocks:
            mlp = block.mlp
            for h in inputs:
                with torch.inference_mode():
                    found = (cpu_training_free.teal_mlp(None, h, *mlp.neuron_linears(), mlp.thresholds["t_in"],
                                                         mlp.thresholds["t_down"]) if mode == "teal" else
                             cpu_training_free.cats_mlp(None, h, *mlp.neuron_linears(), mlp.thresholds["t_gate"]))
                    kernel_calls.append(found is not None)
                    out, kept = MODES[mode].kernels["cpu"](plan, mlp, h)  # the mode's kernel on the cpu backend
                    reference, masks = MODES[mode].mlp(mlp, h)  # its torch ops
                assert torch.allclose(out, reference, atol=1e-5, rtol=1e-4)
                assert torch.allclose(found[0], reference, atol=1e-5, rtol=1e-4)
                for name, mask in masks.items():
                    width = h.shape[-1] if name == "in" else mlp.width
                    expected = 1.0 if mask is None else mask.float().mean().item()
                    assert kept[name] == pytest.approx(expected, abs=1.5 / width), name
    finally:
        cpu_kernels.set_num_threads(previous)
    assert all(kernel_calls)


def test_the_teal_layout_keeps_values_and_keys(family_model):
    family, model = family_model
    block = model.blocks[0]
    before = {name: tensor.clone() for name, tensor in block.state_dict().items()}
    h = mlp_inputs(model, 1, seed=3)[0]
    with torch.inference_mode():
        dense = block.mlp(h)
    first, second, output, _ = block.mlp.neuron_linears()
    assert cpu_training_free.lay_out_teal(first, second, output)
    assert cpu_training_free.teal_laid_out(first, second, output)
    assert cpu_training_free.teal_weights(model.plan("cpu"), first, second, output, block.mlp.neuron_linears()[3]) is not None
    after = block.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    with torch.inference_mode():
        assert torch.allclose(block.mlp(h), dense, atol=1e-6)
    assert cpu_training_free.lay_out_teal(first, second, output)  # again: nothing to do


def test_no_kernel_for_batches_or_other_dtypes(family_model):
    family, model = family_model
    mlp = model.blocks[0].mlp
    first, second, output, act_fn = mlp.neuron_linears()
    cpu_training_free.lay_out_teal(first, second, output)
    with torch.inference_mode():
        two = torch.randn(2, 1, model.config.hidden_size)
        assert cpu_training_free.teal_mlp(None, two, first, second, output, act_fn, 0.1, 0.1) is None
        assert cpu_training_free.teal_mlp(None, two[:1].double(), first, second, output, act_fn, 0.1, 0.1) is None
