"""Controls of the predictor study: predictor forms, label targets computed from the checkpoint's
gate, and scoring on a second dump (other documents)."""

import json

import numpy as np
import pytest
import torch

from sparse_predictor import cli
from sparse_predictor.dump_reader import DumpReader
from sparse_predictor.label_targets import LabelTargetError, gate_values
from sparse_predictor.predictor import (PREDICTOR_FORMS, build_predictor, load_predictor, predictor_shape,
                                        save_predictor)
from sparse_predictor.synthetic import make_checkpoint_dump, make_dump
from sparse_predictor.trainer_mlp import MLPTask
from sparse_predictor.training import RunSettings, TrainConfig, train_layer
from tiny_models import tiny_llama, tiny_opt


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: threads only add overhead


# ---- predictor forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("form", PREDICTOR_FORMS)
def test_forms_shapes_and_round_trip(tmp_path, form):
    torch.manual_seed(0)
    model = build_predictor(16, 8, 40, form)
    x = torch.randn(5, 16)
    assert model(x).shape == (5, 40)
    path = str(tmp_path / f"{form}.pt")
    save_predictor(path, model)
    loaded = load_predictor(path)
    assert predictor_shape(torch.load(path, weights_only=True)) == (form, 16, None if form == "linear" else 8, 40)
    assert [type(m) for m in loaded] == [type(m) for m in model]
    torch.testing.assert_close(loaded(x), model(x))


def test_lowrank_files_keep_upstream_keys(tmp_path):
    # a file as upstream (and earlier versions of this project) wrote it
    state = {"0.weight": torch.randn(8, 16), "1.weight": torch.randn(40, 8)}
    path = tmp_path / "c4_layer0.pt"
    torch.save(state, path)
    loaded = load_predictor(str(path))
    assert len(loaded) == 2 and loaded[0].weight.shape == (8, 16) and loaded[0].bias is None


def test_bad_form_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="--predictor-form"):
        build_predictor(16, 8, 40, "conv")
    path = tmp_path / "odd.pt"
    torch.save({"0.weight": torch.randn(8, 16), "3.weight": torch.randn(40, 8)}, path)
    with pytest.raises(ValueError, match="odd.pt"):
        load_predictor(str(path))


@pytest.mark.parametrize("form", PREDICTOR_FORMS)
def test_cli_trains_each_form(tmp_path, form):
    make_dump(str(tmp_path / "dump"), rows=600, num_layers=1, seed=2)
    code = cli.main("mlp", "llama", ["--data-path", str(tmp_path / "dump"), "--ckpt-dir", str(tmp_path / "ckpt"),
                                     "--L", "0", "--D", "8", "--epochs", "2", "--device", "cpu", "--no-progress",
                                     "--predictor-form", form])
    assert code == 0
    line = json.loads((tmp_path / "ckpt" / "metrics_mlp.jsonl").read_text())
    assert line["predictor_form"] == form and line["D"] == (None if form == "linear" else 8)
    assert predictor_shape(torch.load(line["checkpoint"], weights_only=True))[0] == form


# ---- label targets --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A tiny Llama with large gate weights (so SiLU is far from linear) and a dump of its MLPs."""
    root = tmp_path_factory.mktemp("gated")
    _, checkpoint = tiny_llama(root, initializer_range=0.3, num_hidden_layers=2)
    make_checkpoint_dump(str(root / "train"), checkpoint, rows=2500, clusters=40, seed=0)
    make_checkpoint_dump(str(root / "other"), checkpoint, rows=600, clusters=40, seed=1)
    return checkpoint, DumpReader(str(root / "train")), str(root / "other")


def settings(tmp_path, **overrides):
    train = TrainConfig(D=32, lr=1e-2, epochs=25, batch_size=128, seed=0, progress=False, form="linear")
    return RunSettings(family="llama", model="tiny", ckpt_dir=str(tmp_path), k=0.1,
                       select_metric="recall_at_matched_k", train=train, **overrides)


def test_gate_values_match_the_checkpoint(gated):
    checkpoint, reader, _ = gated
    from sparse_predictor.calibration import load_block

    block = load_block(checkpoint, "llama", 1, "cpu")
    rows = np.arange(10)
    x = torch.from_numpy(np.asarray(reader.mlp_x(1)[rows], dtype=np.float32))
    with torch.no_grad():
        gate = block.mlp.gate_proj(block.post_attention_layernorm(x))
        act = block.mlp.activation(block.post_attention_layernorm(x))
    np.testing.assert_allclose(gate_values(reader, checkpoint, 1, silu=False)[rows], gate.numpy(), rtol=1e-5, atol=1e-5)
    # the dump's label is SiLU(gate) * up of those very gate values (float16 in the dump)
    np.testing.assert_allclose(np.asarray(reader.mlp_label(1)[rows], dtype=np.float32), act.numpy(), rtol=2e-3, atol=2e-3)


def test_each_target_recovers_its_units(gated, tmp_path):
    checkpoint, reader, _ = gated
    lines = {}
    for target in ("act-topk", "gate-positive", "gate-topk"):
        lines[target] = train_layer(reader, MLPTask(), 1, settings(tmp_path / target, label_target=target,
                                                                     label_checkpoint=checkpoint))
    # gate > 0 is linear in the normed input: a linear predictor finds those units
    positive = lines["gate-positive"]
    assert positive["label_rule"] == {"name": "positive", "target": "gate-positive"}
    assert positive["val"]["recall"] > 0.95 and positive["val"]["precision"] > 0.95
    assert 0.3 < 1 - positive["val"]["true_sparsity"] < 0.7
    # the top-k of |SiLU(gate)| is the top-k of gate here (large gates): a ranking a linear map gets
    topk = lines["gate-topk"]
    assert topk["label_rule"]["name"] == "topk" and topk["label_rule"]["target"] == "gate-topk"
    assert topk["val"]["recall_at_matched_k"] > 0.8
    # every target is also scored against the top-k of |SiLU(gate) * up|, on the same rows
    act = lines["act-topk"]
    assert act["val_act_topk"]["recall_at_matched_k"] == pytest.approx(act["val"]["recall_at_matched_k"])
    for line in lines.values():
        assert 0.1 < line["val_act_topk"]["recall_at_matched_k"] <= 1
        assert line["val_act_topk"]["true_sparsity"] == pytest.approx(act["val"]["true_sparsity"])
    assert topk["val_act_topk"]["recall_at_matched_k"] < topk["val"]["recall_at_matched_k"]


def test_gate_target_errors_name_the_checkpoint(gated, tmp_path):
    checkpoint, reader, _ = gated
    base = ["--data-path", reader.path, "--ckpt-dir", str(tmp_path / "c"), "--L", "1", "--epochs", "1",
            "--device", "cpu", "--no-progress", "--label-target", "gate-positive"]
    args = cli.build_parser("mlp", "llama").parse_args(base)
    with pytest.raises(LabelTargetError, match="--checkpoint"):
        cli.make_settings(args, MLPTask(), "llama", reader, "cpu")
    args = cli.build_parser("mlp", "llama").parse_args(base + ["--checkpoint", str(tmp_path / "nowhere")])
    with pytest.raises(LabelTargetError, match="nowhere"):
        cli.make_settings(args, MLPTask(), "llama", reader, "cpu")
    _, wider = tiny_llama(tmp_path, name="wider", intermediate_size=96, num_hidden_layers=2)
    args = cli.build_parser("mlp", "llama").parse_args(base + ["--checkpoint", wider])
    with pytest.raises(LabelTargetError, match="intermediate_size 96 do not match"):
        cli.make_settings(args, MLPTask(), "llama", reader, "cpu")
    _, opt = tiny_opt(tmp_path)
    args = cli.build_parser("mlp", "llama").parse_args(base + ["--checkpoint", opt])
    with pytest.raises(LabelTargetError, match="model_type 'opt'"):
        cli.make_settings(args, MLPTask(), "llama", reader, "cpu")
    # the command line reports it and exits 1 before any layer runs
    assert cli.main("mlp", "llama", base + ["--checkpoint", wider]) == 1
    assert not (tmp_path / "c" / "metrics_mlp.jsonl").exists()


# ---- scoring on another dump ------------------------------------------------------------------------
def test_eval_dump_is_scored_beside_the_token_split(gated, tmp_path):
    checkpoint, reader, other = gated
    code = cli.main("mlp", "llama", ["--data-path", reader.path, "--ckpt-dir", str(tmp_path / "c"), "--L", "0,1",
                                     "--D", "16", "--epochs", "3", "--device", "cpu", "--no-progress",
                                     "--label-target", "gate-topk", "--checkpoint", checkpoint,
                                     "--eval-data-path", other, "--eval-max-rows", "500"])
    assert code == 0
    lines = [json.loads(l) for l in (tmp_path / "c" / "metrics_mlp.jsonl").read_text().splitlines()]
    for line in lines:
        ev = line["eval_dump"]
        assert ev["data_path"] == other and ev["rows"] == 500 and ev["rows_available"] == 600
        assert set(ev["metrics"]) >= {"recall", "recall_at_matched_k", "recall_at_k"}
        assert 0 < ev["act_topk"]["recall_at_matched_k"] <= 1
        assert line["rows_val"] != ev["rows"]  # the two are reported apart


def test_eval_dump_of_other_widths_is_refused(tmp_path):
    make_dump(str(tmp_path / "a"), rows=300, num_layers=1, seed=0)
    make_dump(str(tmp_path / "b"), rows=300, num_layers=1, hidden_size=16, seed=1)
    code = cli.main("mlp", "llama", ["--data-path", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "c"),
                                     "--L", "0", "--epochs", "1", "--device", "cpu", "--no-progress",
                                     "--eval-data-path", str(tmp_path / "b")])
    assert code == 1
    assert not (tmp_path / "c" / "metrics_mlp.jsonl").exists()
