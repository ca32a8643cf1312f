"""Per-layer MLP budgets: the greedy over a sensitivity table, the sensitivity of a planted model
(predicted, teal, cats), the allocation file's named errors, and runs that read one."""

import json
import logging

import pytest
import torch

from dejavu_common.allocation_format import AllocationError, allocation_file, new_allocation, read_allocation
from dejavu_common.helpers import kept_count
from dejavu_llama.modules.local_model import LocalModel
from dejavu_llama.modules.sparse_config import SparseConfig, config_path_beside, from_values
from dejavu_llama.modules.sparse_execution import SparseSetupError, configure_sparse
from dejavu_llama.modules.sparse_stats import SparseStats
from dump_helpers import collect
from sparse_predictor import allocation, calibration
from sparse_predictor.predictor import build_predictor, checkpoint_path, save_predictor
from tiny_models import tiny_llama

WIDTH, HIDDEN, LAYERS = 112, 48, 3  # the tiny Llama
PLANTED = 28  # neurons carrying a planted layer's activation: a kept fraction of 0.25
GRID = [1.0, 0.75, 0.5, 0.25]


# ---- the greedy over a sensitivity table --------------------------------------------------------------
def linear_costs(layers, grid):
    return {layer: list(grid) for layer in layers}


def test_greedy_cuts_the_fragile_layer_least():
    grid = [1.0, 0.9, 0.8, 0.6, 0.4, 0.2]
    gentle = [0.0, 0.001, 0.002, 0.005, 0.01, 0.03]
    steep = [0.0, 0.05, 0.15, 0.4, 0.7, 0.9]
    errors = {0: gentle, 1: [2 * e for e in gentle], 2: steep, 3: gentle}
    for target in (0.8, 0.6, 0.45):
        kept, reached = allocation.greedy_allocation(errors, linear_costs(errors, grid), grid, target)
        assert reached <= target + 1e-9
        assert kept[2] == 1.0, (target, kept)  # the steep layer is not cut while gentler steps remain
        if target < 0.8:
            assert all(kept[2] > kept[layer] for layer in (0, 1, 3)), (target, kept)


def test_greedy_reaches_the_target_and_is_monotone():
    generator = torch.Generator().manual_seed(0)
    grid = allocation.check_grid(allocation.DEFAULT_GRID)
    errors = {}
    for layer in range(8):  # increasing errors, of different steepness per layer
        steps = torch.rand(len(grid) - 1, generator=generator) * float(layer % 3 + 1)
        errors[layer] = [0.0] + torch.cumsum(steps, 0).tolist()
    costs = linear_costs(errors, grid)
    targets = [0.9, 0.75, 0.6, 0.5, 0.3]
    results = allocation.greedy_allocations(errors, costs, grid, targets)
    largest_step = max(a - b for a, b in zip(grid, grid[1:])) / len(errors)
    for target, (kept, reached) in zip(targets, results):
        mean = sum(kept.values()) / len(kept)
        assert mean == pytest.approx(reached)
        assert target - largest_step - 1e-9 <= mean <= target + 1e-9, (target, mean)
        assert allocation.greedy_allocation(errors, costs, grid, target) == (kept, reached)  # one target alone
    for (higher, _), (lower, _) in zip(results, results[1:]):
        assert all(lower[layer] <= higher[layer] for layer in errors)


def test_greedy_bytes_target_and_unreachable_target():
    grid = [1.0, 0.5, 0.25]
    errors = {0: [0.0, 0.1, 0.2], 1: [0.0, 0.01, 0.5]}
    costs = {layer: [1 / 3 + 2 * f / 3 for f in grid] for layer in errors}  # cats: the gate is read whole
    kept, reached = allocation.greedy_allocation(errors, costs, grid, 0.7, kind="bytes")
    assert reached <= 0.7 and kept == {0: 0.5, 1: 0.5}
    with pytest.raises(AllocationError, match="--target-keep 0.3: every layer is at the grid's lowest"):
        allocation.greedy_allocation(errors, costs, grid, 0.3, kind="bytes")


# ---- the sensitivity of a planted model ---------------------------------------------------------------
def constant_scores_predictor(scores):
    """An mlp-form predictor whose scores are `scores` on every token (a ReLU of a bias, then a linear)."""
    predictor = build_predictor(HIDDEN, 4, WIDTH, "mlp")
    with torch.no_grad():
        predictor[0].weight.zero_()
        predictor[0].bias.fill_(1.0)
        predictor[2].weight.copy_(scores[:, None].expand(WIDTH, 4) / 4)
    return predictor


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny Llama whose layers 0 and 2 carry their MLP output in 28 known neurons (robust to cuts)
    while layer 1 keeps its random, spread MLP (fragile); its dump, teal and cats thresholds for
    the grid, and predictors that rank the planted neurons first (layer 1: a random ranking)."""
    folder = tmp_path_factory.mktemp("planted")
    _, checkpoint = tiny_llama(folder, mlp_bias=True)
    planted_neurons = {}
    for layer in (0, 2):
        path = f"{checkpoint}/pytorch_{layer}.pt"
        state = torch.load(path, weights_only=True)
        chosen = torch.randperm(WIDTH, generator=torch.Generator().manual_seed(layer))[:PLANTED]
        for name, bias in (("gate_proj", 6.0), ("up_proj", 4.0)):
            state[f"{name}.weight"] = state[f"{name}.weight"] * 0.01
            state[f"{name}.bias"] = torch.zeros(WIDTH).index_fill_(0, chosen, bias)
        torch.save(state, path)
        planted_neurons[layer] = chosen
    batches = [(torch.randint(3, 256, (3, 20), generator=torch.Generator().manual_seed(seed)), None)
               for seed in (1, 2)]
    dump, predictors = folder / "dump", folder / "predictors"
    collect(checkpoint, "llama-save", dump, batches)
    for method in ("teal", "cats"):
        calibration.calibrate(str(dump), checkpoint, method, [f for f in GRID if f < 1], out=str(predictors))
    for layer in range(LAYERS):
        if layer in planted_neurons:
            scores = torch.zeros(WIDTH).index_fill_(0, planted_neurons[layer], 1.0)
        else:
            scores = torch.randn(WIDTH, generator=torch.Generator().manual_seed(7))
        save_predictor(checkpoint_path(str(predictors), "mlp", layer), constant_scores_predictor(scores))
    return {"checkpoint": checkpoint, "dump": str(dump), "predictors": str(predictors), "batches": batches,
            "folder": folder}


@pytest.mark.parametrize("method", ["predicted", "teal", "cats"])
def test_planted_fragile_layer_is_cut_least(planted, method):
    (path, data), = allocation.allocate(planted["dump"], planted["checkpoint"], method, [0.5],
                                        predictors=planted["predictors"], grid=GRID, progress=False, error="mlp")
    assert path == allocation_file(planted["predictors"], method, 0.5)
    assert data["layers"] == {"0": 0.25, "1": 1.0, "2": 0.25}
    sensitivity = data["sensitivity"]
    assert all(row["1.0"] == 0.0 for row in sensitivity.values())  # keeping everything is the dense MLP
    for robust in ("0", "2"):
        assert sensitivity[robust]["0.25"] < 1e-3 < sensitivity["1"]["0.75"], sensitivity
    assert data["model"] == {"checkpoint": planted["checkpoint"], "model_type": "llama", "hidden_size": HIDDEN,
                             "intermediate_size": WIDTH, "num_layers": LAYERS}
    assert data["target"]["kind"] == "keep" and data["target"]["value"] == 0.5 and data["mean_keep"] == 0.5
    assert data["source"]["grid"] == GRID and data["source"]["rows"] == 120 and data["source"]["dump"] == planted["dump"]
    assert json.loads(open(path).read()) == data


def test_block_error_weighs_a_layer_by_what_its_mlp_adds_to_the_stream(planted):
    """--error block divides by the block's output: with a zero residual it is the MLP's own relative
    error; with a residual 100 times the MLP's output it is about 1e-4 of it."""
    from sparse_predictor.calibration import MLP_INPUT, load_block
    from sparse_predictor.dump_reader import DumpReader

    reader = DumpReader(planted["dump"])
    block = load_block(planted["checkpoint"], "llama", 1, "cpu")
    thresholds = allocation.threshold_entries(f"{planted['predictors']}/thresholds_teal.json", "teal", GRID, [1],
                                              HIDDEN, WIDTH, planted["checkpoint"], planted["dump"],
                                              planted["predictors"])
    with torch.inference_mode():
        mlp_x = torch.from_numpy(reader.mlp_x(1)[:60].astype("float32"))
        h = MLP_INPUT["llama"](block, mlp_x)
        dense = block.mlp.output(block.mlp.activation(h[None]))[0]

        def errors(residual):
            return allocation.layer_sensitivity(block, "teal", 1, h, mlp_x, GRID, thresholds=thresholds,
                                                residual=residual)
        own = errors(None)
        assert errors(torch.zeros_like(mlp_x)) == pytest.approx(own)
        scale = 100 * dense.norm(dim=-1, keepdim=True) / mlp_x.norm(dim=-1, keepdim=True)
        far = errors(mlp_x * scale)
    assert own[0] == far[0] == 0.0
    assert all(small == pytest.approx(large * 1e-4, rel=0.05) for small, large in zip(far[1:], own[1:])), (far, own)


def test_command_line_writes_one_file_per_target(planted, caplog):
    out = planted["folder"] / "allocations"
    with caplog.at_level(logging.INFO):
        status = allocation.main(["--data-path", planted["dump"], "--checkpoint", planted["checkpoint"],
                                  "--method", "cats", "--thresholds", f"{planted['predictors']}/thresholds_cats.json",
                                  "--target-keep", "0.75", "0.4", "--grid", *map(str, GRID), "--out", str(out),
                                  "--max-rows", "50", "--no-progress"])
    assert status == 0
    files = [json.loads(open(allocation_file(str(out), "cats", target)).read()) for target in (0.75, 0.4)]
    assert files[0]["source"]["rows"] == 50
    for layer in ("0", "1", "2"):
        assert files[1]["layers"][layer] <= files[0]["layers"][layer]
    assert "per-layer kept fractions" in caplog.text and "keep@0.75" in caplog.text


def test_missing_threshold_fraction_names_it_and_the_command(planted):
    with pytest.raises(AllocationError, match=r"no thresholds for kept fraction\(s\) 0.6 .*calibrate.py .*--method teal"):
        allocation.allocate(planted["dump"], planted["checkpoint"], "teal", [0.5], predictors=planted["predictors"],
                            grid=[1.0, 0.75, 0.6, 0.5], progress=False)
    with pytest.raises(AllocationError, match="--method predicted needs --predictors"):
        allocation.allocate(planted["dump"], planted["checkpoint"], "predicted", [0.5], progress=False)


# ---- the allocation file's errors ---------------------------------------------------------------------
def write_allocation(path, method="teal", layers=None, **model_changes):
    model = {"checkpoint": "ckpt", "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": WIDTH,
             "num_layers": LAYERS, **model_changes}
    layers = {0: 0.75, 1: 0.25, 2: 0.5} if layers is None else layers
    data = new_allocation(method, model, {"kind": "keep", "value": 0.5, "reached": 0.5},
                          {"dump": "dump", "rows": 10, "grid": GRID, "predictors": None, "thresholds": None},
                          layers, {}, {}, 0.5, 0.5)
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("change, message", [
    (dict(layers={0: 0.5, 1: 0.5}), r"allocation\.json: layers has no kept fraction for layer 2"),
    (dict(layers={0: 0.5, 1: 1.5, 2: 0.5}), r"allocation\.json: layers\['1'\] = 1.5: a kept fraction"),
    (dict(layers={0: 0.0, 1: 0.5, 2: 0.5}), r"allocation\.json: layers\['0'\] = 0.0: a kept fraction"),
    (dict(hidden_size=64), r"allocation\.json: model\['hidden_size'\] is 64, but the model run has 48"),
    (dict(intermediate_size=96), r"allocation\.json: model\['intermediate_size'\] is 96"),
    (dict(num_layers=30), r"allocation\.json: model\['num_layers'\] is 30"),
    (dict(method="cats"), r"allocation\.json: 'method' is 'cats', but the run's sparse mode is 'teal'"),
])
def test_bad_allocation_file_is_a_named_error(tmp_path, planted, change, message):
    path = write_allocation(tmp_path / "allocation.json", **change)
    model = LocalModel.from_checkpoint(planted["checkpoint"], "llama-ml-att-sparse")
    with pytest.raises(SparseSetupError, match=f"--mlp-keep-file: .*{message}"):
        configure_sparse(list(model.blocks), "teal", mlp_keep_file=path, sparse_path=planted["predictors"])
    with pytest.raises(AllocationError, match=message):
        read_allocation(path, "teal", range(LAYERS), HIDDEN, WIDTH, LAYERS, "llama")


def test_allocation_file_not_found_and_sparse_layers_subset(tmp_path):
    with pytest.raises(AllocationError, match="allocation file not found: .*nowhere.json"):
        read_allocation(str(tmp_path / "nowhere.json"), "teal", [0])
    path = write_allocation(tmp_path / "allocation.json", layers={0: 0.5, 2: 0.25})
    assert read_allocation(path, "teal", [0, 2], HIDDEN, WIDTH, LAYERS, "llama") == {0: 0.5, 2: 0.25}


# ---- runs that read an allocation ---------------------------------------------------------------------
def test_sparse_config_round_trip_with_allocation_file(tmp_path):
    config = from_values({"sparse_mode": "teal", "mlp_keep_file": "runs/a/allocation_teal_0.5.json"})
    assert config.mlp_keep_file == "runs/a/allocation_teal_0.5.json" and config.mlp_keep is None
    config.save(tmp_path / "config.json")
    assert SparseConfig.load(tmp_path / "config.json") == config
    filled = config.replace(layer_mlp_keep={0: 0.5, 2: 0.25})
    assert SparseConfig.from_dict(json.loads(json.dumps(filled.to_dict()))) == filled


def test_teal_reads_thresholds_per_layer_fraction(tmp_path, planted):
    """Each layer takes the thresholds of its own kept fraction and reaches it on the calibration text."""
    path = write_allocation(tmp_path / "allocation.json")
    model = LocalModel.from_checkpoint(planted["checkpoint"], "llama-ml-att-sparse")
    stats = SparseStats()
    configure_sparse(list(model.blocks), "teal", mlp_keep_file=path, sparse_path=planted["predictors"], stats=stats)
    for input_ids, mask in planted["batches"]:
        model(input_ids, mask=mask)
    for layer, keep in {0: 0.75, 1: 0.25, 2: 0.5}.items():
        assert model.blocks[layer].mlp.keep == keep
        kept = stats.summary()["layers"][str(layer)]["kept"]
        assert abs(kept["down"] - keep) <= 0.02, (layer, kept)


def test_runner_gives_each_layer_its_own_kept_fraction(tmp_path, planted):
    from test_pipeline_support import run_in_process, runner_args, write_requests

    keeps = {0: 0.75, 1: 0.25, 2: 0.5}
    path = write_allocation(tmp_path / "allocation.json", method="predicted", layers=keeps)
    requests = write_requests(tmp_path / "requests.jsonl", [
        {"prompt": " ".join(f"w{t}" for t in range(5, 5 + n)), "max_tokens": 2, "echo": True, "logprobs": 0}
        for n in (9, 14)])
    output, stats_file = tmp_path / "out.jsonl", tmp_path / "stats.json"
    assert run_in_process(runner_args(planted["checkpoint"], "llama-ml-att-sparse", requests, output,
                                      ["--sparse-mode", "predicted", "--mlp-keep-file", path,
                                       "--sparse-path", planted["predictors"], "--sparse-attention", "off",
                                       "--sparse-stats", str(stats_file)])) == 0
    stats = json.loads(stats_file.read_text())
    assert stats["mlp_keep_file"] == path and stats["target_keep"] == 0.5
    assert stats["layer_mlp_keep"] == {str(layer): keep for layer, keep in keeps.items()}
    for layer, keep in keeps.items():
        assert stats["layers"][str(layer)]["kept"]["neurons"] == pytest.approx(kept_count(keep, WIDTH) / WIDTH)
    saved = SparseConfig.load(config_path_beside(output))
    assert saved.mlp_keep_file == path and saved.mode == "predicted"


def test_allocation_of_another_mode_is_refused_through_the_runner(tmp_path, planted, caplog):
    from test_pipeline_support import run_in_process, runner_args, write_requests

    path = write_allocation(tmp_path / "allocation.json", method="predicted")
    requests = write_requests(tmp_path / "requests.jsonl", [{"prompt": "w5 w6 w7", "max_tokens": 0}])
    assert run_in_process(runner_args(planted["checkpoint"], "llama-ml-att-sparse", requests, tmp_path / "out.jsonl",
                                      ["--sparse-mode", "cats", "--mlp-keep-file", path,
                                       "--sparse-path", planted["predictors"]])) == 1
    assert "'method' is 'predicted', but the run's sparse mode is 'cats'" in caplog.text


def test_lm_eval_model_arg_reaches_the_sparse_config(tmp_path, planted):
    """model_arg mlp_keep_file: the adapter's settings carry it, and its prepare_stage fills the layers."""
    from types import SimpleNamespace

    from dejavu_llama.modules.lm_eval_adapter import variant_settings

    path = write_allocation(tmp_path / "allocation.json", method="predicted")
    settings, prepare_stage = variant_settings("llama-ml-att-sparse", {
        "sparse_mode": "predicted", "mlp_keep_file": path, "sparse_path": planted["predictors"],
        "sparse_attention": "off"})
    assert settings.mlp_keep_file == path
    model = LocalModel.from_checkpoint(planted["checkpoint"], "llama-ml-att-sparse")
    prepare_stage(list(model.blocks), SimpleNamespace(variant_settings=settings), model.config).close(True)
    assert [block.mlp.keep for block in model.blocks] == [0.75, 0.25, 0.5]
