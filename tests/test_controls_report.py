"""The controls report: Spearman's rank correlation, drift against depth, and the report written
from a small hand-made controls folder."""

import json
import os

import pytest

from dejavu_study import controls
from dejavu_study.report import depth
from sparse_predictor.synthetic import make_dump


def test_spearman_on_planted_inputs():
    assert depth.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert depth.spearman([1, 2, 3, 4], [0.9, 0.5, 0.4, -2]) == pytest.approx(-1.0)
    # monotone but not linear: ranks only
    assert depth.spearman([1, 2, 3, 4, 5], [1, 8, 27, 64, 1000]) == pytest.approx(1.0)
    # one adjacent swap among 5: 1 - 6 * 2 / (5 * 24)
    assert depth.spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9)
    # ties share their mean rank
    assert depth.ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0]
    assert depth.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(0.8944, abs=1e-4)
    # too few pairs, missing values and no variance are undefined
    assert depth.spearman([1, 2], [1, 2]) is None
    assert depth.spearman([1, 2, 3, 4], [None, 1, None, 2]) is None
    assert depth.spearman([1, 2, 3], [5, 5, 5]) is None


def drift_file(layers, cos_mlp_x):
    return {"layers": [{"layer": l, "next_layer": None, "cos_mlp_x": {"mean": c}, "rel_change_mlp_x": {"mean": 1 - c},
                        "cos_next_layer": None, "rel_change_next_layer": None} for l, c in zip(layers, cos_mlp_x)]}


def test_drift_vs_depth_and_plot(tmp_path):
    layers = [2, 7, 12, 17, 22, 27]
    recall = {2: 0.7, 7: 0.6, 12: 0.55, 17: 0.5, 22: 0.45, 27: 0.47}
    drift = drift_file(layers, [0.95, 0.9, 0.85, 0.8, 0.7, 0.75])
    result = depth.drift_vs_depth(recall, drift)
    assert result["layers"] == layers
    assert result["spearman_recall_vs_drift"]["cos_mlp_x"] == pytest.approx(1.0)
    assert result["spearman_recall_vs_drift"]["rel_change_mlp_x"] == pytest.approx(-1.0)
    assert result["spearman_recall_vs_depth"] == pytest.approx(-(1 - 6 * 2 / (6 * 35)))
    assert result["spearman_recall_vs_drift"]["cos_next_layer"] is None  # not in a dump of spread layers
    # layers missing from either side are left out
    partial = depth.drift_vs_depth({2: 0.7, 7: None, 99: 0.1}, drift)
    assert partial["layers"] == [2]
    assert controls.plot_drift_vs_depth(result, str(tmp_path / "d.png")) == "d.png"
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def metrics_line(layer, rmk, form="lowrank", D=128, target=None, other=None):
    line = {"status": "ok", "kind": "mlp", "layer": layer, "predictor_form": form, "D": D, "label_target": target,
            "label_rule": {"name": "topk", "k": 0.1}, "rows_train": 1000, "rows_val": 100, "epochs": 5,
            "best_epoch": 3, "lr": 0.003, "select_metric": "recall_at_matched_k",
            "val": {"recall_at_matched_k": rmk, "true_sparsity": 0.9, "recall": 0.8, "precision": 0.3}}
    if target:
        line["val_act_topk"] = {"recall_at_matched_k": rmk - 0.1}
    if other is not None:
        line["eval_dump"] = {"data_path": "/x/dump_val", "rows": 50, "metrics": {"recall_at_matched_k": other}}
    return line


def test_report_from_a_controls_folder(tmp_path):
    dump = str(tmp_path / "dump")
    make_dump(dump, rows=50, num_layers=3)
    json.dump(drift_file([0, 1, 2], [0.9, 0.8, 0.7]), open(os.path.join(dump, "drift.json"), "w"))
    root = tmp_path / "controls"
    sets = {"lowrank_D32": 0.4, "lowrank_D128": 0.5, "linear": 0.55, "mlp_D128": 0.6}
    for name, base in sets.items():
        folder = root / "predictors" / name
        folder.mkdir(parents=True)
        form = name.split("_")[0]
        with open(folder / "metrics_mlp.jsonl", "w") as handle:
            for layer in range(3):
                handle.write(json.dumps(metrics_line(layer, base - 0.05 * layer, form,
                                                     None if form == "linear" else 128,
                                                     other=base - 0.1 - 0.05 * layer)) + "\n")
    folder = root / "predictors" / "label_gate-positive"
    folder.mkdir(parents=True)
    (folder / "metrics_mlp.jsonl").write_text(json.dumps(metrics_line(0, 0.7, target="gate-positive")) + "\n")
    relu = root / "relu" / "plain" / "checkpoint"
    relu.mkdir(parents=True)
    (relu / "relu_control.json").write_text(json.dumps({
        "settings": {"rows": 1000, "epochs": 5, "lr": 1e-4, "l1": 0, "target_zeros": None},
        "overrides": {"0": "relu"},
        "per_layer": {"0": {"shift": 0.0, "rows_train": 900, "rows_heldout": 100,
                            "relu_swap": {"heldout_rel_mse": 0.4, "heldout_zero_fraction": 0.5},
                            "fitted": {"heldout_rel_mse": 0.05, "heldout_zero_fraction": 0.55}}}}))
    with open(root / "controls.jsonl", "w") as handle:
        for line in ({"model": "silu", "mode": "dense", "perplexity": 10.0, "tokens": 500},
                     {"model": "silu", "mode": "oracle", "keep": 0.5, "perplexity": 10.5},
                     {"model": "silu", "mode": "predicted", "keep": 0.5, "predictors": "linear", "perplexity": 12.0}):
            handle.write(json.dumps(line) + "\n")
    out = tmp_path / "report"
    assert controls.main([str(root), "--dump", dump, "--out", str(out), "--layers", "0,1,2", "--model", "tiny"]) == 0
    summary = json.load(open(out / "summary.json"))
    assert [s["name"] for s in summary["capacity"]] == ["lowrank_D32", "lowrank_D128", "linear", "mlp_D128"]
    assert summary["capacity"][2]["mean_val"] == pytest.approx(0.5)
    assert summary["capacity"][2]["mean_other_docs"] == pytest.approx(0.40)
    assert summary["labels"][0]["mean_val_act_topk"] == pytest.approx(0.6)
    assert summary["drift_vs_depth"]["spearman_recall_vs_drift"]["cos_mlp_x"] == pytest.approx(1.0)
    predicted = summary["perplexity"]["silu"]["predicted"]["linear@0.5"]
    assert predicted["change_pct"] == pytest.approx(20.0) and predicted["gap_to_oracle_pct"] == pytest.approx(
        100 * (12 / 10.5 - 1))
    text = (out / "controls.md").read_text()
    assert "tiny" in text and "layers 0,1,2" in text and "1,000 training rows" in text and "cap of 5 epochs" in text
    assert "0.400 -> 0.050" in text
    for plot in ("capacity.png", "labels.png", "drift_vs_depth.png"):
        assert (out / plot).exists()
    # a folder without predictors is a named error
    assert controls.main([str(tmp_path / "empty"), "--dump", dump, "--out", str(tmp_path / "r2")]) == 1


def ppl_lines(model, dense, oracle, predicted):
    return [{"model": model, "mode": "dense", "perplexity": dense, "tokens": 500},
            {"model": model, "mode": "oracle", "keep": 0.5, "perplexity": oracle}] + [
        {"model": model, "mode": "predicted", "keep": 0.5, "predictors": name, "perplexity": value}
        for name, value in predicted.items()]


def answer_of(tmp_path, lines):
    root = tmp_path / "c"
    if root.exists():
        import shutil
        shutil.rmtree(root)
    folder = root / "predictors"
    for name in ("lowrank_D128", "linear", "label_gate-positive"):
        (folder / name).mkdir(parents=True)
        (folder / name / "metrics_mlp.jsonl").write_text(json.dumps(metrics_line(0, 0.5)) + "\n")
    (root / "controls.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    dump = str(tmp_path / "dump")
    if not os.path.exists(dump):
        make_dump(dump, rows=20, num_layers=1)
    return controls.build_summary(str(root), dump, "tiny", "0", "lowrank_D128")["answer"]


def test_the_decisive_control_is_the_one_closing_most_of_the_gap(tmp_path):
    # SiLU: oracle +5%, the reference predictors +30% (gap 25 points), linear +20% (gap 15: 40% closed)
    silu = ppl_lines("silu", 10.0, 10.5, {"lowrank_D128": 13.0, "linear": 12.0, "label_gate-positive": 12.9})
    answer = answer_of(tmp_path, silu)
    assert answer["gap_points"] == pytest.approx(25.0)
    assert answer["controls"]["capacity"]["best"] == "linear"
    assert answer["controls"]["capacity"]["share_closed"] == pytest.approx(0.4)
    assert answer["controls"]["label"]["share_closed"] == pytest.approx(0.04)
    assert answer["decisive"] is None and answer["sentence"].startswith("No control decides")
    # a ReLU stand-in whose own predictors sit 2 points from its own oracle closes 92% of the gap;
    # one whose dense perplexity is 20% off the original is not counted
    relu = ppl_lines("relu-plain", 10.5, 10.8, {"relu-plain_topk": 11.01})
    far = ppl_lines("relu-sparse", 12.0, 12.0, {"relu-sparse_topk": 12.0})
    answer = answer_of(tmp_path, silu + relu + far)
    assert answer["decisive"] == "activation function"
    assert answer["controls"]["activation function"]["model"] == "relu-plain"
    assert answer["controls"]["activation function"]["share_closed"] == pytest.approx(
        1 - (100 * (11.01 / 10.5 - 10.8 / 10.5)) / 25.0)
    assert "relu-sparse" in answer["sentence"] and "activation function" in answer["sentence"]
    # no gap: nothing to explain
    answer = answer_of(tmp_path, ppl_lines("silu", 10.0, 10.5, {"lowrank_D128": 10.4}))
    assert answer["sentence"].startswith("No gap to explain")


def test_the_study_reports_depth_finding_is_carried_over(tmp_path):
    layers = list(range(6))
    depth_result = depth.drift_vs_depth({l: 0.8 - 0.05 * l for l in layers},
                                        {"layers": [{"layer": l, "cos_next_layer": {"mean": 0.9 - 0.01 * l}}
                                                    for l in layers]})
    study = tmp_path / "summary.json"
    study.write_text(json.dumps({"runs": [{"name": "demo", "model": "tiny", "findings": {"depth": depth_result}}]}))
    found = controls.study_depth(str(study))
    assert found["run"] == "demo" and found["layers"] == layers
    assert found["spearman_recall_vs_drift"]["cos_next_layer"] == pytest.approx(1.0)
    assert controls.plot_drift_vs_depth(found, str(tmp_path / "s.png")) == "s.png"
    study.write_text(json.dumps({"runs": [{"name": "demo", "findings": {}}]}))
    assert controls.study_depth(str(study)) is None
    assert controls.study_depth(None) is None


def test_the_answer_repeats_at_the_other_kept_fractions_and_flags_relu_zeros(tmp_path):
    silu = ppl_lines("silu", 10.0, 10.5, {"lowrank_D128": 13.0, "linear": 12.0})
    quarter = [{"model": "silu", "mode": "oracle", "keep": 0.25, "perplexity": 11.0},
               {"model": "silu", "mode": "predicted", "keep": 0.25, "predictors": "lowrank_D128", "perplexity": 15.0},
               {"model": "silu", "mode": "predicted", "keep": 0.25, "predictors": "linear", "perplexity": 12.0}]
    answer_of(tmp_path, silu + quarter)
    summary = controls.build_summary(str(tmp_path / "c"), str(tmp_path / "dump"), "tiny", "0", "lowrank_D128")
    (other,) = summary["answer_other_keeps"]
    assert other["keep"] == 0.25 and other["gap_points"] == pytest.approx(40.0)
    assert other["controls"]["capacity"]["share_closed"] == pytest.approx(0.75)   # linear: 10 of 40 points left
    lines = "\n".join(controls.answer_lines(summary))
    assert "At keep 0.25: The decisive control is predictor capacity" in lines
    # a ReLU stand-in with 60% exact zeros keeps every non-zero neuron at keep 0.5: flagged; at 30% it is not
    summary["relu_fits"] = {"plain": {"mean_fitted_zero_fraction": 0.6}}
    assert "relu-plain leaves 40% of its neurons non-zero" in "\n".join(controls.answer_lines(summary))
    summary["relu_fits"] = {"plain": {"mean_fitted_zero_fraction": 0.3}}
    assert "Read with care" not in "\n".join(controls.answer_lines(summary))
