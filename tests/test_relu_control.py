"""The ReLU control: fitting a ReLU MLP to a tiny Llama's SiLU MLP, the checkpoint it writes, and
the model running that checkpoint."""

import json
import os

import pytest
import torch
from torch import nn

from dejavu_common.mlp_activations import ShiftedReLU, layer_activation, parse_override
from dejavu_study import relu_control
from sparse_predictor.synthetic import make_checkpoint_dump
from tiny_models import tiny_llama, tiny_opt


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: threads only add overhead


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("relu")
    hf_model, checkpoint = tiny_llama(root, initializer_range=0.1)
    make_checkpoint_dump(str(root / "dump"), checkpoint, rows=1500, seed=0)
    return hf_model, checkpoint, str(root / "dump")


def fit_args(checkpoint, dump, out, *extra):
    return ["--checkpoint", checkpoint, "--data-path", dump, "--layers", "0,2", "--out", out, "--epochs", "40",
            "--lr", "3e-3", "--batch-size", "128", "--device", "cpu", "--no-progress", *extra]


@pytest.fixture(scope="module")
def fitted(source, tmp_path_factory):
    _, checkpoint, dump = source
    out = str(tmp_path_factory.mktemp("fitted") / "relu")
    assert relu_control.main(fit_args(checkpoint, dump, out)) == 0
    return out


def test_fit_beats_the_plain_swap(fitted):
    record = json.load(open(os.path.join(fitted, relu_control.RECORD_FILE)))
    assert sorted(record["per_layer"]) == ["0", "2"]
    for entry in record["per_layer"].values():
        swap, fit = entry["relu_swap"]["heldout_rel_mse"], entry["fitted"]["heldout_rel_mse"]
        assert fit < 0.5 * swap, (swap, fit)
        assert entry["rows_heldout"] == 150 and entry["rows_train"] == 1350
        assert 0.3 < entry["relu_swap"]["heldout_zero_fraction"] < 0.7  # plain ReLU: about half the gates


def test_written_checkpoint_marks_and_keeps_files(source, fitted):
    _, checkpoint, _ = source
    config = json.load(open(os.path.join(fitted, "config.json")))
    assert config["dejavu_mlp_activations"] == {"0": "relu", "2": "relu"}
    # the layer not fitted, the embeddings and the head are byte-for-byte the source's
    for name in ("pytorch_1.pt", "pytorch_embs.pt", "pytorch_lm_head.pt", "conversion.json", "tokenizer.json"):
        assert open(os.path.join(fitted, name), "rb").read() == open(os.path.join(checkpoint, name), "rb").read()
    old = torch.load(os.path.join(checkpoint, "pytorch_0.pt"), weights_only=True)
    new = torch.load(os.path.join(fitted, "pytorch_0.pt"), weights_only=True)
    assert set(old) == set(new)
    assert torch.equal(old["self_attn.q_proj.weight"], new["self_attn.q_proj.weight"])
    assert not torch.equal(old["gate_proj.weight"], new["gate_proj.weight"])


def test_written_checkpoint_loads_strictly_and_runs(source, fitted):
    from dejavu_llama.modules.local_model import LocalModel

    hf_model, _, _ = source
    model = LocalModel.from_checkpoint(fitted, "llama", dtype="float32")
    acts = [type(block.mlp.act_fn) for block in model.blocks]
    assert acts[0] is nn.ReLU and acts[2] is nn.ReLU and acts[1] is not nn.ReLU
    # the same change made by hand in the transformers model gives the same logits
    reference = hf_model
    for layer in (0, 2):
        state = torch.load(os.path.join(fitted, f"pytorch_{layer}.pt"), weights_only=True)
        mlp = reference.model.layers[layer].mlp
        mlp.act_fn = nn.ReLU()
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(mlp, name).weight.data.copy_(state[f"{name}.weight"])
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ours, _ = model(ids)
    with torch.no_grad():
        theirs = reference(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_target_zeros_gives_a_shifted_relu(source, tmp_path):
    _, checkpoint, dump = source
    out = str(tmp_path / "sparse")
    args = fit_args(checkpoint, dump, out, "--target-zeros", "0.9", "--l1", "0.01", "--epochs", "10")
    assert relu_control.main(args) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    record = json.load(open(os.path.join(out, relu_control.RECORD_FILE)))
    for layer in ("0", "2"):
        shift = record["per_layer"][layer]["shift"]
        assert shift > 0 and parse_override(config["dejavu_mlp_activations"][layer]) == pytest.approx(shift, rel=1e-5)
        assert record["per_layer"][layer]["relu_swap"]["heldout_zero_fraction"] == pytest.approx(0.9, abs=0.03)
    from dejavu_llama.modules.local_model import LocalModel

    model = LocalModel.from_checkpoint(out, "llama", dtype="float32")
    assert isinstance(model.blocks[0].mlp.act_fn, ShiftedReLU)
    logits, _ = model(torch.randint(3, 256, (1, 6)))
    assert torch.isfinite(logits).all()


def test_bad_inputs_are_named_errors(source, fitted, tmp_path, caplog):
    _, checkpoint, dump = source
    # a layer not in the dump
    assert relu_control.main(fit_args(checkpoint, dump, str(tmp_path / "a"), "--layers", "5")) == 1
    assert "--layers" in caplog.text and not os.path.exists(tmp_path / "a")
    # an output folder that exists, without --force
    caplog.clear()
    assert relu_control.main(fit_args(checkpoint, dump, fitted)) == 1
    assert "--force" in caplog.text
    # a checkpoint that is not Llama
    _, opt = tiny_opt(tmp_path)
    caplog.clear()
    assert relu_control.main(fit_args(opt, dump, str(tmp_path / "b"))) == 1
    assert "model_type 'opt'" in caplog.text and "config.json" in caplog.text
    with pytest.raises(ValueError, match="dejavu_mlp_activations"):
        parse_override("gelu")


def test_force_replaces_and_override_parsing(source, fitted, tmp_path):
    _, checkpoint, dump = source
    out = str(tmp_path / "again")
    os.makedirs(out)
    open(os.path.join(out, "stale.txt"), "w").write("x")
    assert relu_control.main(fit_args(checkpoint, dump, out, "--layers", "1", "--epochs", "1", "--force")) == 0
    assert not os.path.exists(os.path.join(out, "stale.txt"))
    assert json.load(open(os.path.join(out, "config.json")))["dejavu_mlp_activations"] == {"1": "relu"}
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no staging folder left

    class Config:
        dejavu_mlp_activations = {"3": "relu@0.25"}

    assert isinstance(layer_activation(Config, 3), ShiftedReLU) and layer_activation(Config, 0) is None
