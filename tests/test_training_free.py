"""Training-free sparse MLP baselines (teal, cats, wina): dense at keep 1, calibration, planted
neurons, thresholds-file errors, bytes accounting, refusals, and the --sparse-stats file."""

import json
import math

import pytest
import torch

from dejavu_common.thresholds_format import thresholds_file
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.modules.sparse_cost import mlp_bytes_per_token
from dejavu_llama.modules.sparse_execution import SparseSetupError, configure_sparse
from dejavu_llama.modules.sparse_stats import SparseStats, stats_path
from dejavu_llama.modules.training_free import column_norms, magnitude_thresholds, wina_mask
from dump_helpers import collect, read_meta
from sparse_predictor import calibration
from tiny_models import tiny_llama, tiny_opt

WIDTH = 112  # tiny Llama's intermediate size (hidden 48, 3 layers, 6 heads)


def ids(batch, length, seed):
    return torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded(lengths, seed):
    """(input_ids, mask) of rows of the given lengths, padded on the left."""
    longest = max(lengths)
    input_ids, mask = torch.ones(len(lengths), longest, dtype=torch.long), torch.zeros(len(lengths), longest,
                                                                                       dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, longest - length:] = ids(1, length, seed + row)[0]
        mask[row, longest - length:] = 1
    return input_ids, mask


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tiny"))[1]


def sparse_model(checkpoint, family="llama"):
    return LocalModel.from_checkpoint(checkpoint, f"{family}-ml-att-sparse")


# ---- kept fraction 1.0 is dense ----------------------------------------------------------------------
@pytest.mark.parametrize("family, mode", [("llama", "teal"), ("llama", "cats"), ("llama", "wina"),
                                          ("opt", "teal"), ("opt", "wina")])
def test_keep_all_equals_dense(tmp_path, family, mode):
    checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)[1]
    dense = LocalModel.from_checkpoint(checkpoint, family)
    sparse = sparse_model(checkpoint, family)
    stats = SparseStats()
    configure_sparse(list(sparse.blocks), mode, mlp_keep=1.0, stats=stats)  # no thresholds file needed
    input_ids, mask = left_padded([9, 5], seed=1)
    assert torch.equal(sparse(input_ids, mask=mask)[0], dense(input_ids, mask=mask)[0])
    assert torch.equal(sparse.generate_greedy(input_ids[:1], 4), dense.generate_greedy(input_ids[:1], 4))
    summary = stats.summary()
    assert all(value == 1.0 for entry in summary["layers"].values() for value in entry["kept"].values())
    assert summary["bytes_relative"] == pytest.approx(1.0)  # cats at keep 1: gate, then all of up and down


# ---- calibration reaches its target -------------------------------------------------------------------
def test_calibration_reaches_target_through_the_runner(tmp_path, llama_checkpoint):
    """Collect a dump with the runner, calibrate teal with the command line, run the runner with
    --sparse-stats over the same text (left-padded micro-batches): every layer keeps the target
    within 0.01, over exactly the dump's tokens."""
    from test_pipeline_support import run_in_process, runner_args, write_requests

    generator = torch.Generator().manual_seed(3)
    lengths = [40, 23, 31, 12, 37, 28, 19, 33]
    requests = write_requests(tmp_path / "train.jsonl", [
        {"prompt": " ".join(f"w{t}" for t in torch.randint(3, 256, (n,), generator=generator).tolist()),
         "max_tokens": 0, "echo": True, "logprobs": 0} for n in lengths])
    batching = ["--batch-size", "8", "--micro-batch-size", "4"]
    dump, predictors = tmp_path / "dump", tmp_path / "predictors"
    assert run_in_process(runner_args(llama_checkpoint, "llama-save", requests, tmp_path / "collect.jsonl",
                                      ["--sp-data-path", str(dump), "--sp-rows", "1000", *batching])) == 0
    tokens = read_meta(dump)["tokens"]
    assert tokens == sum(lengths)
    assert calibration.main(["--data-path", str(dump), "--checkpoint", llama_checkpoint, "--method", "teal",
                             "--keep", "0.5", "0.25", "--out", str(predictors)]) == 0
    recorded = json.loads((predictors / "thresholds_teal.json").read_text())
    assert recorded["rows"] == tokens and recorded["method"] == "teal" and recorded["layers"] == [0, 1, 2]
    for keep in ("0.5", "0.25"):
        for layer in ("0", "1", "2"):
            for name in ("in", "down"):
                assert abs(recorded["keeps"][keep][layer]["reached"][name] - float(keep)) <= 0.01
    stats_file = tmp_path / "stats.json"
    assert run_in_process(runner_args(llama_checkpoint, "llama-ml-att-sparse", requests, tmp_path / "out.jsonl",
                                      ["--sparse-mode", "teal", "--mlp-keep", "0.25", "--sparse-path", str(predictors),
                                       "--sparse-stats", str(stats_file), *batching])) == 0
    stats = json.loads(stats_file.read_text())
    assert stats["format"] == "dejavu-sparse-stats" and stats["mode"] == "teal" and stats["target_keep"] == 0.25
    assert stats["thresholds"] == str(predictors / "thresholds_teal.json")
    assert stats["tokens"] == tokens  # padding not counted
    for layer in ("0", "1", "2"):
        entry = stats["layers"][layer]
        assert entry["tokens"] == tokens and entry["mode"] == "teal"
        for name in ("in", "down"):
            assert abs(entry["kept"][name] - 0.25) <= 0.01, (layer, name, entry["kept"])
        expected = mlp_bytes_per_token("teal", 48, WIDTH, entry["kept"], dtype_bytes=4)
        assert entry["bytes_relative"] == pytest.approx(expected["relative"])
    assert abs(stats["bytes_relative"] - 0.25) <= 0.01


@pytest.mark.parametrize("family, method", [("llama", "cats"), ("opt", "teal")])
def test_calibration_reaches_target_in_process(tmp_path, family, method):
    checkpoint = (tiny_llama if family == "llama" else tiny_opt)(tmp_path)[1]
    batches = [left_padded([30, 18, 25], seed=10), left_padded([22, 29], seed=20)]
    collect(checkpoint, f"{family}-save", tmp_path / "dump", batches)
    path, data = calibration.calibrate(str(tmp_path / "dump"), checkpoint, method, [0.5, 0.2],
                                       out=str(tmp_path / "predictors"))
    assert path == thresholds_file(str(tmp_path / "predictors"), method)
    for keep in (0.5, 0.2):
        model = sparse_model(checkpoint, family)
        stats = SparseStats()
        configure_sparse(list(model.blocks), method, mlp_keep=keep, sparse_path=str(tmp_path / "predictors"),
                         stats=stats)
        for input_ids, mask in batches:
            model(input_ids, mask=mask)
        summary = stats.summary()
        assert summary["tokens"] == data["rows"] == 30 + 18 + 25 + 22 + 29
        for layer, entry in summary["layers"].items():
            for name, value in entry["kept"].items():
                assert abs(value - keep) <= 0.01, (keep, layer, name, value)
                assert abs(data["keeps"][repr(keep)][layer]["reached"][name] - keep) <= 0.01


# ---- planted neurons ----------------------------------------------------------------------------------
PLANTED_KEEP = 0.25  # 28 of 112 neurons


def planted_llama(tmp_path):
    """A tiny Llama with MLP biases in which, in every layer, 28 known neurons carry an activation
    near SiLU(6) * 4 on every token and the others about 1e-4: (checkpoint, {layer: planted})."""
    _, checkpoint = tiny_llama(tmp_path, mlp_bias=True)
    planted = {}
    for layer in range(3):
        path = f"{checkpoint}/pytorch_{layer}.pt"
        state = torch.load(path, weights_only=True)
        chosen = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(layer))[:28].sort().values
        for name, bias in (("gate_proj", 6.0), ("up_proj", 4.0)):
            state[f"{name}.weight"] = state[f"{name}.weight"] * 0.01
            state[f"{name}.bias"] = torch.zeros(WIDTH).index_fill_(0, chosen, bias)
        torch.save(state, path)
        planted[layer] = set(chosen.tolist())
    return checkpoint, planted


def record_down_inputs(model):
    """{layer: [act as it enters down]}: the entries a mode dropped are exactly zero there."""
    seen = {}
    for block in model.blocks:
        def output(act, block=block, original=block.mlp.output):
            seen.setdefault(block.layer_index, []).append(act.detach().reshape(-1, act.shape[-1]))
            return original(act)
        block.mlp.output = output
    return seen


def test_planted_neurons_are_kept(tmp_path):
    checkpoint, planted = planted_llama(tmp_path)
    batches = [(ids(3, 20, seed=5), None)]
    collect(checkpoint, "llama-save", tmp_path / "dump", batches)
    for method in ("teal", "cats"):
        calibration.calibrate(str(tmp_path / "dump"), checkpoint, method, [PLANTED_KEEP],
                              out=str(tmp_path / "predictors"))
    for mode in ("oracle", "cats", "teal", "wina"):
        model = sparse_model(checkpoint)
        stats = SparseStats()
        configure_sparse(list(model.blocks), mode, mlp_keep=PLANTED_KEEP, sparse_path=str(tmp_path / "predictors"),
                         sparse_attention=False, stats=stats)
        seen = record_down_inputs(model)
        for input_ids, mask in batches:
            model(input_ids, mask=mask)
        assert sorted(seen) == [0, 1, 2]
        for layer, acts in seen.items():
            act = torch.cat(acts)
            expected = torch.zeros(WIDTH, dtype=torch.bool)
            expected[sorted(planted[layer])] = True
            assert torch.equal(act != 0, expected.expand_as(act)), (mode, layer)
        for layer, entry in stats.summary()["layers"].items():
            kept = entry["kept"]["down" if mode in ("teal", "wina") else "neurons"]
            assert kept == PLANTED_KEEP, (mode, layer, kept)


# ---- thresholds files: errors that name the file and the key -----------------------------------------
def good_thresholds():
    return {"format": "dejavu-mlp-thresholds", "version": 1, "method": "teal", "hidden_size": 48,
            "intermediate_size": WIDTH,
            "keeps": {"0.5": {str(layer): {"t_in": 0.1, "t_down": 0.001, "reached": {"in": 0.5, "down": 0.5}}
                              for layer in range(3)}}}


def broken(change):
    data = good_thresholds()
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize("content, message", [
    (None, "thresholds file not found: .*thresholds_teal.json"),
    ("{not json", "thresholds_teal.json: not a readable JSON file"),
    ("[1, 2]", "thresholds_teal.json: not a JSON object"),
    (broken(lambda d: d.pop("keeps")), "thresholds_teal.json: lacks key.*keeps"),
    (broken(lambda d: d.update(version=7)), "thresholds_teal.json: 'format'.*'version' 7"),
    (broken(lambda d: d.update(method="cats")), "thresholds_teal.json: 'method' is 'cats'"),
    (broken(lambda d: d.update(intermediate_size=96)), "thresholds_teal.json: 'intermediate_size' is 96"),
    (broken(lambda d: d["keeps"].update({"0.25": d["keeps"].pop("0.5")})),
     r"thresholds_teal.json: no thresholds for kept fraction 0.5 .*has 0.25"),
    (broken(lambda d: d["keeps"]["0.5"].pop("2")), r"thresholds_teal.json: keeps\['0.5'\] has no thresholds for layer 2"),
    (broken(lambda d: d["keeps"]["0.5"]["1"].pop("t_down")), r"keeps\['0.5'\]\['1'\]\['t_down'\] is missing"),
    (broken(lambda d: d["keeps"]["0.5"]["1"].update(t_in=-0.5)), r"keeps\['0.5'\]\['1'\]\['t_in'\] = -0.5"),
    (broken(lambda d: d["keeps"]["0.5"]["0"].update(t_down=float("nan"))), r"keeps\['0.5'\]\['0'\]\['t_down'\] = nan"),
    (broken(lambda d: d["keeps"]["0.5"]["0"].update(t_in="0.1")), r"keeps\['0.5'\]\['0'\]\['t_in'\] = '0.1'"),
])
def test_bad_thresholds_file_is_a_named_error(tmp_path, llama_checkpoint, content, message):
    if content is not None:
        (tmp_path / "thresholds_teal.json").write_text(content)
    model = sparse_model(llama_checkpoint)
    with pytest.raises(SparseSetupError, match=message):
        configure_sparse(list(model.blocks), "teal", mlp_keep=0.5, sparse_path=str(tmp_path))


def test_explicit_thresholds_file_and_null_threshold(tmp_path, llama_checkpoint):
    """--thresholds FILE wins over --sparse-path; a null threshold keeps everything."""
    data = good_thresholds()
    data["keeps"]["0.5"]["1"]["t_down"] = None
    (tmp_path / "mine.json").write_text(json.dumps(data))
    model = sparse_model(llama_checkpoint)
    configure_sparse(list(model.blocks), "teal", mlp_keep=0.5, sparse_path=str(tmp_path / "absent"),
                     thresholds=str(tmp_path / "mine.json"))
    assert model.blocks[1].mlp.thresholds["t_in"] == 0.1 and model.blocks[1].mlp.thresholds["t_down"] is None


@pytest.mark.parametrize("argv, message", [
    (["--method", "teal", "--keep", "0.5", "--data-path", "{tmp}/nowhere"], "dump folder not found: .*nowhere"),
    (["--method", "teal", "--keep", "28"], "--keep 28: a kept fraction in \\(0, 1\\]"),
    (["--method", "teal", "--keep", "0.5", "--L", "7"], "--L '7'"),
    (["--method", "cats", "--keep", "0.5", "--checkpoint", "{opt}"], "a dump of a 'llama' model"),
])
def test_calibration_errors_name_the_flag_or_file(tmp_path, llama_checkpoint, caplog, argv, message):
    collect(llama_checkpoint, "llama-save", tmp_path / "dump", [(ids(1, 6, seed=1), None)])
    opt = tiny_opt(tmp_path)[1] if "{opt}" in argv else None
    argv = [arg.format(tmp=tmp_path, opt=opt) for arg in argv]
    defaults = {"--data-path": str(tmp_path / "dump"), "--checkpoint": llama_checkpoint}
    full = argv + [item for flag, value in defaults.items() if flag not in argv for item in (flag, value)]
    assert calibration.main(full) == 1
    assert any(__import__("re").search(message, record.getMessage()) for record in caplog.records), caplog.text


def test_cats_calibration_refuses_opt(tmp_path):
    checkpoint = tiny_opt(tmp_path)[1]
    collect(checkpoint, "opt-save", tmp_path / "dump", [(ids(1, 6, seed=1), None)])
    with pytest.raises(calibration.CalibrationError, match="--method cats needs a gated MLP"):
        calibration.calibrate(str(tmp_path / "dump"), checkpoint, "cats", [0.5], out=str(tmp_path))


# ---- the selection maths ------------------------------------------------------------------------------
def test_magnitude_thresholds_keep_the_fraction():
    values = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    (t_half, reached_half), (t_tenth, reached_tenth), (t_all, reached_all) = magnitude_thresholds(values, [0.5, 0.1, 1])
    assert (t_half, reached_half) == (50.5, 0.5)
    assert (t_tenth, reached_tenth) == (90.5, 0.1)
    assert (t_all, reached_all) == (None, 1.0)
    ties = torch.tensor([0.0] * 6 + [1.0, 2.0, 3.0, 4.0])  # ReLU-like zeros: fewer kept where values tie
    assert magnitude_thresholds(ties, [0.5])[0] == (0.0, 0.4)


def test_wina_ranks_by_magnitude_times_column_norm():
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 0.1]])  # columns of norm 1, 10, 0.1
    other = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 4.0], [0.0, 0.0, 0.0]])  # adds 5 to column 2's norm
    norms = column_norms(weight, other)
    assert torch.allclose(norms, torch.tensor([1.0, 10.0, math.sqrt(0.01 + 25.0)]))
    x = torch.tensor([[2.0, 0.3, -0.5], [-9.0, 0.1, 0.2]])  # scores [2, 3, 2.5], [9, 1, 1]
    assert wina_mask(x, norms, 2).tolist() == [[False, True, True], [True, False, True]]
    assert wina_mask(x, norms, 3) is None  # all kept: no masking


# ---- bytes per token ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, family, kept, rank, expected", [
    ("dense", "llama", None, None, 240.0),  # 3 d I b = 3 * 4 * 10 * 2
    ("oracle", "llama", {"neurons": 0.3}, None, 72.0),  # 3 d K b, K = 3
    ("predicted", "llama", {"neurons": 0.3}, 2, 72.0 + (4 * 2 + 2 * 10) * 4),  # + (d D + D I) b_pred (float32)
    ("teal", "llama", {"in": 0.5, "down": 0.2}, None, (2 * 10 * 2 + 4 * 2) * 2),  # 2 I (p_in d) + d (p_down I)
    ("wina", "llama", {"in": 0.5, "down": 0.2}, None, 96.0),
    ("cats", "llama", {"neurons": 0.2}, None, (4 * 10 + 2 * 4 * 2) * 2),  # d I + 2 d K
    ("dense", "opt", None, None, 160.0),  # 2 d I b
    ("oracle", "opt", 0.3, None, 48.0),
    ("teal", "opt", {"in": 0.5, "down": 0.2}, None, (10 * 2 + 4 * 2) * 2),  # I (p_in d) + d (p_down I)
])
def test_bytes_per_token(mode, family, kept, rank, expected):
    figure = mlp_bytes_per_token(mode, 4, 10, kept, predictor_rank=rank, dtype_bytes=2, family=family,
                                 predictor_dtype_bytes=4)
    dense = (3 if family == "llama" else 2) * 4 * 10 * 2
    assert figure["bytes"] == pytest.approx(expected)
    assert figure["dense_bytes"] == dense and figure["relative"] == pytest.approx(expected / dense)


def test_bytes_per_token_refusals():
    with pytest.raises(ValueError, match="OPT has no gate"):
        mlp_bytes_per_token("cats", 4, 10, 0.5, family="opt")
    with pytest.raises(ValueError, match="predictor_rank"):
        mlp_bytes_per_token("predicted", 4, 10, 0.5)
    with pytest.raises(ValueError, match="'down' missing"):
        mlp_bytes_per_token("teal", 4, 10, {"in": 0.5})


# ---- refusals -----------------------------------------------------------------------------------------
def test_cats_refuses_opt(tmp_path):
    model = sparse_model(tiny_opt(tmp_path)[1], "opt")
    with pytest.raises(SparseSetupError, match="sparse mode cats needs a gated MLP"):
        configure_sparse(list(model.blocks), "cats", mlp_keep=0.5, sparse_path=str(tmp_path))


@pytest.mark.parametrize("mode, kwargs, message", [
    ("teal", {"mlp_keep": 0.5, "att_keep": 0.5}, "--att-keep .*sparse mode teal is MLP-only"),
    ("wina", {"mlp_keep": 0.5, "att_keep": 3}, "--att-keep .*sparse mode wina is MLP-only"),
    ("wina", {"mlp_keep": 28}, "--mlp-keep 28: sparse mode wina takes a kept fraction"),
    ("cats", {}, "sparse mode cats needs --mlp-keep"),
    ("teal", {"mlp_keep": 0.5}, "needs calibrated thresholds: --thresholds FILE, or --sparse-path"),
])
def test_mode_refusals(llama_checkpoint, mode, kwargs, message):
    model = sparse_model(llama_checkpoint)
    with pytest.raises(SparseSetupError, match=message):
        configure_sparse(list(model.blocks), mode, **kwargs)


def test_att_keep_with_teal_is_refused_through_the_runner(tmp_path, llama_checkpoint, caplog):
    from test_pipeline_support import run_in_process, runner_args, write_requests

    requests = write_requests(tmp_path / "requests.jsonl", [{"prompt": "w5 w6 w7", "max_tokens": 0}])
    output = tmp_path / "out.jsonl"
    args = runner_args(llama_checkpoint, "llama-ml-att-sparse", requests, output,
                       ["--sparse-mode", "teal", "--mlp-keep", "0.5", "--att-keep", "0.5",
                        "--sparse-stats", str(tmp_path / "stats.json")])
    assert run_in_process(args) == 1
    assert "sparse mode teal is MLP-only" in caplog.text
    assert not output.exists() and not (tmp_path / "stats.json").exists()


# ---- the stats of the other modes ---------------------------------------------------------------------
def test_stats_of_oracle_and_predicted_count_real_tokens(llama_checkpoint):
    """K / width per token over real tokens only (left padding excluded), heads too; predicted
    decoding through the C decoder layer (batch 1) is counted as well."""
    from torch import nn

    input_ids, mask = left_padded([11, 4, 7], seed=30)
    model = sparse_model(llama_checkpoint)
    stats = SparseStats()
    configure_sparse(list(model.blocks), "oracle", mlp_keep=0.25, att_keep=0.5, layers={0, 2}, stats=stats)
    model(input_ids, mask=mask)
    summary = stats.summary()
    assert summary["tokens"] == 22
    assert summary["layers"]["0"]["kept"] == {"heads": 0.5, "neurons": 28 / WIDTH}
    assert summary["layers"]["1"] == {"tokens": 22, "kept": {"neurons": 1.0}, "mode": "dense",
                                      "bytes_per_token": 3 * 48 * WIDTH * 4.0,
                                      "dense_bytes_per_token": 3 * 48 * WIDTH * 4.0, "bytes_relative": 1.0}
    assert summary["bytes_relative"] == pytest.approx((2 * 0.25 + 1) / 3)

    torch.manual_seed(0)
    predictors = {("mlp", layer): (nn.Sequential(nn.Linear(48, 8, bias=False), nn.Linear(8, WIDTH, bias=False)),
                                   "same") for layer in range(3)}
    model = sparse_model(llama_checkpoint)
    stats = SparseStats()
    configure_sparse(list(model.blocks), "predicted", mlp_keep=0.1, predictors=predictors, sparse_attention=False,
                     stats=stats)
    model.generate_greedy(input_ids[:1], 5)
    summary = stats.summary()
    assert summary["tokens"] == 11 + 4  # the prompt, then every new token but the last (chosen, never fed)
    expected = mlp_bytes_per_token("predicted", 48, WIDTH, 12 / WIDTH, predictor_rank=8, dtype_bytes=4)
    for entry in summary["layers"].values():
        assert entry["kept"] == {"neurons": pytest.approx(12 / WIDTH)}
        assert entry["bytes_relative"] == pytest.approx(expected["relative"])


def test_stats_file_per_rank():
    assert stats_path("runs/x/stats.json", 0, 1) == "runs/x/stats.json"
    assert stats_path("runs/x/stats.json", 1, 2) == "runs/x/stats.rank1.json"
    assert stats_path("runs/x/stats", 0, 3) == "runs/x/stats.rank0"
