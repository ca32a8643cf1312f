"""scripts/drift.py and scripts/report.py on synthetic study runs (small dumps in the exact format).

Two runs are built:
  llama_run: att_x_{l+1} = att_x_l + noise (drift near a known value), a zero row (skipped),
             predictors for both inputs (metrics lines from the predictor package's own trainer
             and writer), one failed layer, a perplexity file.
  opt_run:   exact geometry (cosines 0.6, 0.8, 0 by construction), random_weights: true, only
             "same" predictors and no perplexity file (missing pieces must be reported, not crash).
"""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")

from dejavu_study import drift
from dejavu_study.report import cli, findings, markdown, plots
from dejavu_study.report import runs as report_runs  # `runs` is the fixture below

LAYERS, D, INTER, HEADS, ROWS, CAPACITY = 3, 16, 32, 4, 200, 256
NOISE = 0.1  # per-coordinate noise relative to unit-variance att_x
ZERO_ROW = 5


# ---- synthetic runs -------------------------------------------------------------------------------
def write_dump(folder, arrays, model_type, rows=ROWS, capacity=CAPACITY):
    """Raw float16 memmaps of `capacity` rows (rows past `rows` hold garbage) + meta.json."""
    os.makedirs(folder, exist_ok=True)
    widths = {"att_x": D, "mlp_x": D, "mlp_label": INTER, "att_label": HEADS}
    garbage = np.random.default_rng(99)
    for (kind, layer), values in arrays.items():
        mm = np.memmap(os.path.join(folder, f"{kind}_{layer}.mmap"), dtype=np.float16, mode="w+",
                       shape=(capacity, widths[kind]))
        mm[:rows] = values.astype(np.float16)
        mm[rows:] = (1000 * garbage.standard_normal((capacity - rows, widths[kind]))).astype(np.float16)
        mm.flush()
        del mm
    meta = {"format": "dejavu-sp-dump", "version": 1, "model": f"synthetic-{model_type}",
            "model_type": model_type, "dtype": "float16", "capacity": capacity, "hidden_size": D,
            "intermediate_size": INTER, "num_heads": HEADS, "num_layers": LAYERS,
            "layers": list(range(LAYERS)), "rows": {str(l): rows for l in range(LAYERS)}, "tokens": rows,
            "source": "synthetic.jsonl", "complete": True, "capacity_reached": False, "finished_layers": [0, 1, 2]}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def labels(rng, rows=ROWS):
    return {"mlp_label": rng.standard_normal((rows, INTER)), "att_label": np.abs(rng.standard_normal((rows, HEADS)))}


def noisy_arrays(seed=0):
    """att_x_{l+1} = att_x_l + NOISE * gaussian; mlp_x_l = att_x_l + NOISE/2 * gaussian."""
    rng = np.random.default_rng(seed)
    arrays = {}
    x = rng.standard_normal((ROWS, D))
    x[ZERO_ROW] = 0.0  # a token with no direction: skipped, not NaN
    for layer in range(LAYERS):
        arrays["att_x", layer] = x
        arrays["mlp_x", layer] = x + NOISE / 2 * rng.standard_normal((ROWS, D))
        for kind, value in labels(rng).items():
            arrays[kind, layer] = value
        x = x + NOISE * rng.standard_normal((ROWS, D))
        x[ZERO_ROW] = 0.0
    return arrays


def exact_arrays(seed=1):
    """Per token, in a plane (e_i, e_j) with scale s: att_x = s(5,0) -> s(3,4) -> s(0,5); mlp_x_l = att_x_l rotated 90°.

    Exact in float16: cos(layer0, layer1) = 0.6, cos(layer1, layer2) = 0.8, cos(att_x, mlp_x) = 0,
    |att_x_1 - att_x_0| / |att_x_0| = sqrt(20)/5, |att_x_2 - att_x_1| / |att_x_1| = sqrt(10)/5.
    """
    rng = np.random.default_rng(seed)
    scale = rng.integers(1, 8, ROWS).astype(np.float64)
    i = rng.integers(0, D, ROWS)
    j = (i + 1 + rng.integers(0, D - 1, ROWS)) % D
    arrays = {}
    for layer, (a, b) in enumerate([(5, 0), (3, 4), (0, 5)]):
        x, m = np.zeros((ROWS, D)), np.zeros((ROWS, D))
        x[np.arange(ROWS), i], x[np.arange(ROWS), j] = a * scale, b * scale
        m[np.arange(ROWS), i], m[np.arange(ROWS), j] = -b * scale, a * scale
        arrays["att_x", layer], arrays["mlp_x", layer] = x, m
        for kind, value in labels(rng).items():
            arrays[kind, layer] = value
    return arrays


def train_metrics(dump_dir, ckpt_dir, kind, mode, layers, family):
    """Metrics lines written by the predictor package itself (tiny, 1 epoch): the exact schema."""
    from sparse_predictor.cli import append_jsonl
    from sparse_predictor.dump_reader import DumpReader
    from sparse_predictor.predictor import metrics_path
    from sparse_predictor.trainer_att import AttentionTask
    from sparse_predictor.trainer_mlp import MLPTask
    from sparse_predictor.training import RunSettings, TrainConfig, train_layer

    reader = DumpReader(dump_dir)
    task = MLPTask() if kind == "mlp" else AttentionTask()
    settings = RunSettings(
        family=family, model=reader.model, dataset="c4", ckpt_dir=ckpt_dir, input_mode=mode,
        label=task.default_label(family), k=None, threshold=None, target_sparsity=None, val_fraction=0.2,
        max_rows=None, select_metric="recall", run_id="test",
        train=TrainConfig(D=8, epochs=1, batch_size=64, progress=False))
    for layer in layers:
        append_jsonl(metrics_path(ckpt_dir, kind), train_layer(reader, task, layer, settings))


def write_study(run, name, model_type, random_weights):
    study = {"name": name, "model": f"synthetic-{model_type}", "model_type": model_type,
             "checkpoint": f"pretrained_models/{name}", "data": "data/c4_val.jsonl", "documents": 7,
             "random_weights": random_weights, "label_rule": "topk k=0.1" if model_type == "llama" else "positive",
             "stages": 1, "device": "cpu", "notes": "synthetic test run"}
    with open(os.path.join(run, "study.json"), "w") as f:
        json.dump(study, f)


PERPLEXITY = [
    {"mode": "dense", "mlp_keep": None, "att_keep": None, "perplexity": 20.0, "tokens": 1000, "result_file": "d.jsonl"},
    {"mode": "oracle", "mlp_keep": 0.5, "att_keep": 1.0, "perplexity": 21.0, "tokens": 1000, "result_file": "o5.jsonl"},
    {"mode": "predicted", "mlp_keep": 0.5, "att_keep": 1.0, "perplexity": 24.0, "tokens": 1000, "result_file": "p5.jsonl"},
    {"mode": "oracle", "mlp_keep": 0.25, "att_keep": 1.0, "perplexity": 23.0, "tokens": 1000, "result_file": "o25.jsonl"},
    {"mode": "predicted", "mlp_keep": 0.25, "att_keep": 1.0, "perplexity": 30.0, "tokens": 1000, "result_file": "p25.jsonl"},
    {"mode": "teal", "mlp_keep": 0.5, "att_keep": None, "perplexity": 22.0, "tokens": 1000, "reached_keep": 0.47,
     "mlp_bytes_relative": 0.49},
    {"mode": "cats", "mlp_keep": 0.5, "att_keep": None, "perplexity": 21.6, "tokens": 1000, "reached_keep": 0.52,
     "mlp_bytes_relative": 0.68},
    {"mode": "teal", "mlp_keep": 0.25, "att_keep": None, "perplexity": 26.0, "tokens": 1000, "reached_keep": 0.23,
     "mlp_bytes_relative": 0.24},
    {"mode": "wina", "mlp_keep": 0.5, "att_keep": None, "perplexity": 23.0, "tokens": 1000,
     "reached_keep": {"down": 0.5, "in": 0.47}, "mlp_bytes_relative": 0.5},
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("study")
    llama, opt = str(base / "llama_run"), str(base / "opt_run")

    write_dump(os.path.join(llama, "dump"), noisy_arrays(), "llama")
    write_study(llama, "llama-synthetic", "llama", False)
    for mode in ("same", "prev"):
        folder = os.path.join(llama, "predictors", mode)
        train_metrics(os.path.join(llama, "dump"), folder, "mlp", mode, range(LAYERS), "llama")
        train_metrics(os.path.join(llama, "dump"), folder, "att", mode,
                      range(LAYERS) if mode == "same" else range(LAYERS - 1), "llama")
    # attention look-ahead layer 2: only a failed line (a killed or crashed training run)
    with open(os.path.join(llama, "predictors", "prev", "metrics_att.jsonl"), "a") as f:
        f.write(json.dumps({"status": "failed", "kind": "att", "layer": 2, "input_mode": "prev",
                            "error": "RuntimeError: boom", "run_id": "test"}) + "\n")
        f.write('{"status": "ok", "kind": "att", "lay')  # a torn line: skipped, not fatal
    with open(os.path.join(llama, "perplexity.jsonl"), "w") as f:
        for line in PERPLEXITY:
            f.write(json.dumps(line) + "\n")

    write_dump(os.path.join(opt, "dump"), exact_arrays(), "opt")
    write_study(opt, "opt-synthetic", "opt", True)
    folder = os.path.join(opt, "predictors", "same")
    train_metrics(os.path.join(opt, "dump"), folder, "mlp", "same", range(LAYERS), "opt")
    train_metrics(os.path.join(opt, "dump"), folder, "att", "same", range(LAYERS), "opt")
    return {"llama": llama, "opt": opt, "base": base}


@pytest.fixture(scope="module")
def comparison(runs):
    out = str(runs["base"] / "report_cmp")
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "report.py"), runs["llama"], runs["opt"],
                             "--out", out, "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "report.md")) as f:
        report_md = f.read()
    return {"out": out, "summary": summary, "markdown": report_md, "stdout": result.stdout}


def by_name(summary, name):
    return next(run for run in summary["runs"] if run["name"] == name)


# ---- drift ------------------------------------------------------------------------------------------
def test_drift_exact_geometry(runs):
    result = drift.compute_drift(os.path.join(runs["opt"], "dump"), progress=False)
    first, second, last = result["layers"]
    for entry, cos, rel in ((first, 0.6, math.sqrt(20) / 5), (second, 0.8, math.sqrt(10) / 5)):
        stats = entry["cos_next_layer"]
        assert stats["mean"] == pytest.approx(cos, abs=1e-6)
        assert stats["p10"] == pytest.approx(cos, abs=1e-6) and stats["p90"] == pytest.approx(cos, abs=1e-6)
        assert stats["std"] == pytest.approx(0.0, abs=1e-6)
        assert entry["rel_change_next_layer"]["mean"] == pytest.approx(rel, abs=1e-6)
        assert entry["cos_mlp_x"]["mean"] == pytest.approx(0.0, abs=1e-6)
        assert entry["rel_change_mlp_x"]["mean"] == pytest.approx(math.sqrt(2), abs=1e-6)
        assert stats["count"] == ROWS and entry["rows_skipped"] == 0
    assert last["cos_next_layer"] is None and last["next_layer"] is None
    assert last["cos_mlp_x"]["mean"] == pytest.approx(0.0, abs=1e-6)


def expected_cosines(a, b):
    a, b = a.astype(np.float16).astype(np.float64), b.astype(np.float16).astype(np.float64)
    keep = np.linalg.norm(a, axis=1) > 0
    a, b = a[keep], b[keep]
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_drift_noisy_matches_numpy_and_theory(runs):
    arrays = noisy_arrays()
    result = drift.compute_drift(os.path.join(runs["llama"], "dump"), chunk_rows=7, progress=False)
    for layer in range(LAYERS - 1):
        entry = result["layers"][layer]
        want = expected_cosines(arrays["att_x", layer], arrays["att_x", layer + 1])
        stats = entry["cos_next_layer"]
        assert entry["rows"] == ROWS and entry["rows_skipped"] == 1  # the zero row; garbage rows never read
        assert stats["count"] == ROWS - 1
        assert stats["mean"] == pytest.approx(want.mean(), abs=1e-5)
        assert stats["p10"] == pytest.approx(np.percentile(want, 10), abs=1e-5)
        assert stats["p90"] == pytest.approx(np.percentile(want, 90), abs=1e-5)
        # |x| ~ sqrt(D), |noise| ~ NOISE sqrt(D): cos ~ 1 / sqrt(1 + NOISE^2)
        assert stats["mean"] == pytest.approx(1 / math.sqrt(1 + NOISE ** 2), abs=0.01)
        assert entry["rel_change_next_layer"]["mean"] == pytest.approx(NOISE, rel=0.15)
        mlp = expected_cosines(arrays["att_x", layer], arrays["mlp_x", layer])
        assert entry["cos_mlp_x"]["mean"] == pytest.approx(mlp.mean(), abs=1e-5)


def test_drift_chunking_does_not_change_results(runs):
    dump = os.path.join(runs["llama"], "dump")
    small = drift.compute_drift(dump, chunk_rows=7, progress=False)["layers"]
    large = drift.compute_drift(dump, chunk_rows=4096, progress=False)["layers"]
    for a, b in zip(small, large):
        for field in drift.METRICS:
            if a[field] is None:
                assert b[field] is None
                continue
            for stat in ("mean", "std", "p10", "p50", "p90"):
                assert a[field][stat] == pytest.approx(b[field][stat], abs=1e-6)


def test_drift_cli_writes_json(runs, tmp_path):
    out = tmp_path / "drift.json"
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "drift.py"), os.path.join(runs["opt"], "dump"),
                             "--out", str(out), "--no-progress", "--max-rows", "50"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["max_rows"] == 50 and data["layers"][0]["rows"] == 50
    assert data["layers"][0]["cos_next_layer"]["mean"] == pytest.approx(0.6, abs=1e-6)


# ---- report -----------------------------------------------------------------------------------------
def test_report_outputs_exist(comparison):
    out = comparison["out"]
    for name in ("report.md", "summary.json", "recall.png", "sparsity.png", "drift.png", "perplexity.png",
                 "recall_vs_k.png", "frontier.png"):
        path = os.path.join(out, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name
    assert os.path.join(out, "report.md") in comparison["stdout"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temp files
    assert set(comparison["summary"]["plots"]) == {"recall", "sparsity", "drift", "recall_vs_drift", "perplexity", "recall_vs_k",
                                                   "frontier"}


def test_summary_has_every_layer_and_both_runs(comparison, runs):
    summary = comparison["summary"]
    assert [run["name"] for run in summary["runs"]] == ["llama-synthetic", "opt-synthetic"]
    assert summary["comparison"] and len(summary["comparison"]["rows"]) == 2
    for run in summary["runs"]:
        assert [l["layer"] for l in run["layers"]] == list(range(LAYERS))
        assert run["dump"]["tokens"] == ROWS and run["dump"]["complete"] is True
        for layer in run["layers"]:
            same = layer["mlp"]["same"]
            assert same["recall"] is not None and same["true_sparsity"] is not None
            assert same["classifier_sparsity"] is not None and layer["att"]["same"]["recall"] is not None
            assert layer["drift"]["cos_mlp_x"]["mean"] is not None
    opt = by_name(summary, "opt-synthetic")
    assert opt["layers"][0]["drift"]["cos_next_layer"]["mean"] == pytest.approx(0.6, abs=1e-6)


def test_summary_takes_latest_ok_metrics_line(comparison, runs):
    """Same selection as the predictor package's load_predictor_info; failed-only layers are listed."""
    from sparse_predictor.predictor import METRICS_FILES, load_predictor_info

    assert report_runs.METRICS_FILES == METRICS_FILES
    llama = by_name(comparison["summary"], "llama-synthetic")
    for kind in ("mlp", "att"):
        for mode in ("same", "prev"):
            folder = os.path.join(runs["llama"], "predictors", mode)
            for layer in llama["layers"]:
                info = load_predictor_info(folder, kind, layer["layer"])
                record = layer[kind][mode]
                if info is None:
                    assert record is None
                    continue
                for field in report_runs.PREDICTOR_FIELDS:
                    assert record[field] == info["val"][field]
                assert record["input_source"] == info["input_source"]
    curve = llama["layers"][1]["mlp"]["same"]["recall_curve"]
    info = load_predictor_info(os.path.join(runs["llama"], "predictors", "same"), "mlp", 1)
    assert [[f, r] for f, _, r in curve] == sorted([float(k), v] for k, v in info["val"]["recall_at_k"].items())
    att_curve = llama["layers"][1]["att"]["same"]["recall_curve"]  # 4 heads: 0.05 keeps 1 head
    assert att_curve[0][:2] == [0.05, 0.25]
    assert not any("expected" in w for w in llama["warnings"])  # att layer 0 falls back to "same": no false alarm
    att_prev = llama["predictors"]["att"]["prev"]
    assert att_prev["layers_failed"] == [2] and att_prev["layers_ok"] == [0, 1]
    mlp_same = llama["findings"]["predictors"]["mlp"]["same"]  # trained 1 epoch: every layer's best is the cap
    assert mlp_same["epoch_cap"] == 1 and mlp_same["max_best_epoch"] == 1
    assert mlp_same["layers_best_at_cap"] == [l["layer"] for l in llama["layers"] if l["mlp"]["same"]]
    assert any("unreadable line" in w for w in llama["warnings"])


def test_findings_are_computed_from_the_numbers(comparison):
    llama = by_name(comparison["summary"], "llama-synthetic")
    recalls = [l["mlp"]["same"]["recall"] for l in llama["layers"]]
    found = llama["findings"]["predictors"]["mlp"]["same"]
    assert found["mean_recall"] == pytest.approx(sum(recalls) / len(recalls))
    assert found["layers_recall_below_floor"] == [i for i, r in enumerate(recalls) if r < 0.9]
    # attention layer 0 with input prev falls back to its own input: not counted as look-ahead
    assert llama["findings"]["lookahead"]["att"]["layers"] == 1
    assert llama["findings"]["predictors"]["att"]["prev"]["layers_input_fallback"] == [0]
    ppl = {(p["mlp_keep"], p["oracle"], p["predicted"]): p for p in llama["findings"]["perplexity"]["at_kept_fraction"]}
    half = ppl[0.5, 21.0, 24.0]
    assert half["oracle_increase_pct"] == pytest.approx(5.0) and half["predicted_increase_pct"] == pytest.approx(20.0)
    assert llama["findings"]["perplexity"]["dense"] == 20.0
    # The answer: oracle within 5% of dense down to MLP keep 0.5 (+5.0%), not at 0.25 (+15%);
    # predicted at none (+20%, +50%).
    lowest = llama["findings"]["perplexity"]["lowest_keep_within_tolerance"]
    assert lowest["mlp_oracle"]["lowest_keep"] == 0.5 and lowest["mlp_oracle"]["kept_fractions"] == [0.25, 0.5]
    assert lowest["mlp_predicted"]["lowest_keep"] is None
    assert lowest["mlp_predicted"]["increase_pct"] == pytest.approx([50.0, 20.0])
    assert not any(key.startswith("att_") for key in lowest)  # no attention-only runs in this file
    # Every MLP method side by side: the best one without the layer's own activations per kept fraction.
    frontier = llama["findings"]["perplexity"]["mlp_frontier"]
    assert [(p["keep"], p["reached_keep"], p["bytes_relative"]) for p in frontier["methods"]["teal"]] == [
        (0.5, 0.47, 0.49), (0.25, 0.23, 0.24)]
    half, quarter = frontier["budgets"]
    assert (half["keep"], half["best"]) == (0.5, "cats") and half["best_increase_pct"] == pytest.approx(8.0)
    assert half["best_minus_oracle_pp"] == pytest.approx(3.0) and half["best_bytes_relative"] == 0.68
    assert half["best_over_oracle"] == pytest.approx(21.6 / 21.0)
    assert (quarter["best"], quarter["best_minus_oracle_pp"]) == ("teal", pytest.approx(15.0))
    assert lowest["mlp_cats"]["increase_pct"] == pytest.approx([8.0])


def test_markdown_states_runs_and_findings(comparison):
    md, summary = comparison["markdown"], comparison["summary"]
    assert ("MLP at keep 0.5: the best method without the layer's own activations is cats (+8.0% perplexity, "
            "0.68 of the dense MLP's bytes), 1.03× oracle's perplexity") in md
    assert "Deja Vu: Contextual Sparsity for Efficient LLMs at Inference Time" in md and "Reference, not measured" in md
    assert "| teal | 0.25 | 0.230 | 0.240 | +30.0% |" in md
    assert "| wina | 0.5 | in 0.470, down 0.500 | 0.500 | +15.0% |" in md
    llama, opt = by_name(summary, "llama-synthetic"), by_name(summary, "opt-synthetic")
    assert "random weights — not evidence" in md
    assert opt["evidence"] is False and llama["evidence"] is True
    for line in md.splitlines():  # the marked run's rows carry the mark, the trained run's do not
        if line.startswith("| opt-synthetic |"):
            assert "random weights — not evidence" in line
        if line.startswith("| llama-synthetic |"):
            assert "not evidence" not in line
    assert "data/c4_val.jsonl" in md and "| 7 |" in md and f"| {ROWS} |" in md and "topk k=0.1" in md
    found = llama["findings"]["predictors"]["mlp"]["same"]
    assert f"mean recall {found['mean_recall']:.3f}" in md
    assert "oracle 21.000 (+5.0% vs dense), predicted 24.000 (+20.0% vs dense)" in md
    assert ("MLP neurons cut alone (attention dense): oracle selection stays within 5% of dense perplexity "
            "down to keep 0.5 (0.25 → +15.0%, 0.5 → +5.0%); predicted selection stays within 5% of dense "
            "perplexity at none of the kept fractions run (0.25 → +50.0%, 0.5 → +20.0%)") in md
    assert f"{llama['findings']['drift']['cos_next_layer']['mean']:.3f}" in md
    assert "MLP neurons, input prev: no predictor metrics." in md  # the OPT run has no prev predictors
    assert "perplexity: no results" in md
    mean_curve = found["mean_recall_curve"]
    assert mean_curve and f"(K/width 0.0625) → {mean_curve[0][2]:.3f}" in md  # 0.05 of 32 neurons keeps 2
    assert "training failed for layers [2]" in md
    for plot in ("recall.png", "drift.png", "perplexity.png"):
        assert f"]({plot})" in md


def test_render_markdown_reads_only_the_summary(comparison):
    summary = json.loads(json.dumps(comparison["summary"]))
    assert markdown.render_markdown(summary) == comparison["markdown"]
    llama = by_name(summary, "llama-synthetic")
    llama["findings"]["predictors"]["mlp"]["same"]["mean_recall"] = 0.123456
    llama["layers"][1]["drift"]["cos_next_layer"]["mean"] = 0.654321
    md = markdown.render_markdown(summary)
    assert "mean recall 0.123" in md and "| 0.654 |" in md


def test_single_run_missing_pieces_and_drift_cache(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "ROOT", str(tmp_path))  # default out: ROOT/reports/<name>
    path = cli.write_report([runs["opt"]], progress=False)
    assert path == str(tmp_path / "reports" / "opt-synthetic" / "report.md")
    summary = json.loads((tmp_path / "reports" / "opt-synthetic" / "summary.json").read_text())
    run = summary["runs"][0]
    assert summary["name"] == "opt-synthetic" and summary["comparison"] is None
    assert run["perplexity"]["status"] == "missing"
    assert any("perplexity" in m for m in run["missing"])
    assert any("input prev" in m for m in run["missing"])
    assert "perplexity" not in summary["plots"]
    assert run["drift"]["source"] == "cache"  # computed by the comparison report before
    md = open(path).read()
    assert "perplexity: no plot" in md and "Perplexity: no results" in md


def test_deleted_mmap_files_make_drift_missing(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["opt"], run)
    os.remove(run / "dump" / "drift.json") if (run / "dump" / "drift.json").exists() else None
    os.remove(run / "dump" / "att_x_1.mmap")
    path = cli.write_report([str(run)], out_dir=str(tmp_path / "out"), progress=False, plots=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["runs"][0]["drift"]["status"] == "missing"
    assert "att_x_1.mmap" in open(path).read()


@pytest.mark.parametrize("missing", ["study.json", os.path.join("dump", "meta.json")])
def test_missing_required_file_is_a_clear_error(runs, tmp_path, missing):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["opt"], run)
    os.remove(run / missing)
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "report.py"), str(run), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert str(run / missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "report.md").exists()


def test_drift_cache_is_invalidated_by_a_changed_dump(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["opt"], run)  # copies keep mtimes: the cache stays valid
    cli.write_report([str(run)], out_dir=str(tmp_path / "a"), progress=False, plots=False)
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["runs"][0]["drift"]["source"] == "cache"
    stat = os.stat(run / "dump" / "att_x_1.mmap")
    os.utime(run / "dump" / "att_x_1.mmap", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10 ** 9))
    cli.write_report([str(run)], out_dir=str(tmp_path / "b"), progress=False, plots=False)
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["runs"][0]["drift"]["source"] == "computed"


def test_diverged_and_dense_less_perplexity_is_reported(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["opt"], run)
    (run / "perplexity.jsonl").write_text(
        '{"mode": "predicted", "mlp_keep": 0.5, "att_keep": null, "perplexity": Infinity, "tokens": 10}\n'
        '{"mode": "oracle", "mlp_keep": 0.5, "att_keep": null, "perplexity": 12.0, "tokens": 10}\n')
    path = cli.write_report([str(run)], out_dir=str(tmp_path / "out"), progress=False, plots=False)
    md = open(path).read()
    assert "predicted inf (not finite)" in md and "oracle 12.000" in md
    assert "no dense run" in md
    json.loads((tmp_path / "out" / "summary.json").read_text())  # strict JSON despite the infinity


def test_runs_of_different_depth_line_up_by_relative_depth():
    def run(layers):
        return {"dump": {"layers": list(range(layers))}}

    deep, shallow = run(29), run(5)
    mixed, alike = {"runs": [deep, shallow]}, {"runs": [deep, run(29)]}
    assert plots.depth_of(alike, deep, 7) == 7 and plots.depth_label(alike) == "layer"
    assert plots.depth_of(mixed, deep, 14) == pytest.approx(0.5)
    assert plots.depth_of(mixed, shallow, 2) == pytest.approx(0.5) and plots.depth_of(mixed, shallow, 4) == 1.0
    assert plots.depth_label(mixed).startswith("relative depth")


def test_downstream_results_add_a_table(runs, tmp_path):
    """--downstream DIR: lm-eval results (dense and a sparse run) become a table, from summary.json."""
    def results(model_args, acc):
        return {"results": {"facts": {"alias": "facts", "acc,none": acc, "acc_stderr,none": 0.1}},
                "n-samples": {"facts": {"original": 24, "effective": 20}},
                "config": {"model": "dejavu", "model_args": model_args}, "date": 1767225600.0}
    folder = tmp_path / "lm_eval"
    for name, args, acc in (("dense", "checkpoint=/m,model_type=llama", 0.6),
                            ("oracle", "checkpoint=/m,model_type=llama-ml-att-sparse,sparse_mode=oracle,mlp_keep=0.25",
                             0.45)):
        (folder / name).mkdir(parents=True)
        (folder / name / "results_2026-01-01T00-00-00.json").write_text(json.dumps(results(args, acc)))
    assert cli.main([runs["opt"], "--out", str(tmp_path / "out"), "--no-plots", "--no-progress",
                     "--downstream", str(folder)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {(r["run"], r["value"]) for r in summary["downstream"]} == {("dense", 0.6), ("oracle mlp_keep=0.25", 0.45)}
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Downstream tasks (lm-evaluation-harness)" in md
    assert "| facts | acc | oracle mlp_keep=0.25 | 0.4500 ± 0.1000 | -0.1500 |" in md
    assert cli.main([runs["opt"], "--out", str(tmp_path / "out2"), "--no-plots", "--no-progress",
                     "--downstream", str(tmp_path / "nowhere")]) == 1


def test_decode_speed_puts_the_frontier_in_time_and_answers_where_sparsity_pays(runs, tmp_path):
    """decode_speed.json (dejavu_study.decode_speed) joins the perplexity runs by result file; an
    allocated run is a line of its own; the answer takes, per perplexity budget, the fastest
    configuration a decoder can run, never oracle (a bound) nor wina (masks), and its distance
    from oracle at the same bytes."""
    run = str(tmp_path / "timed_run")
    shutil.copytree(runs["llama"], run)
    lines = [dict(line, result_file=os.path.join(run, line.get("result_file") or f"{line['mode']}_{line['mlp_keep']}"))
             for line in PERPLEXITY]
    lines.append({"mode": "teal", "mlp_keep": 0.5, "att_keep": None, "perplexity": 20.4, "tokens": 1000,
                  "mlp_bytes_relative": 0.5, "allocation": "allocation_teal_0.5.json",
                  "result_file": os.path.join(run, "teal_alloc")})
    with open(os.path.join(run, "perplexity.jsonl"), "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")
    speeds = {("oracle", 0.5): (2.0, "bound"), ("teal", 0.5): (1.3, "kernel"), ("cats", 0.5): (1.1, "kernel"),
              ("wina", 0.5): (3.0, "masks"), ("teal", 0.25): (1.6, "kernel"), ("predicted", 0.5): (1.2, "kernel")}
    configs = [{"result_file": line["result_file"], "mode": line["mode"], "mlp_keep": line["mlp_keep"],
                "kind": speeds[line["mode"], line["mlp_keep"]][1], "ratio": speeds[line["mode"], line["mlp_keep"]][0],
                "rate": 40.0} for line in lines if (line["mode"], line["mlp_keep"]) in speeds and not line.get("allocation")]
    configs.append({"result_file": os.path.join(run, "teal_alloc"), "mode": "teal", "mlp_keep": 0.5, "kind": "kernel",
                    "ratio": 1.25, "rate": 38.0, "allocated": True})
    with open(os.path.join(run, "decode_speed.json"), "w") as f:
        json.dump({"format": "dejavu-decode-speed", "version": 1, "threads": 2, "rounds": 3, "new_tokens": 32,
                   "prompt_tokens": 64, "machine": "test", "cpus": 2, "dense_rate": 31.0, "configs": configs}, f)
    out = str(tmp_path / "report")
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "report.py"), run, "--out", out, "--no-progress"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(out, "summary.json")) as f:
        found = json.load(f)["runs"][0]["findings"]["perplexity"]
    methods = found["mlp_frontier"]["methods"]
    assert [p["speed_ratio"] for p in methods["teal"]] == [1.3, 1.6]
    assert [(p["keep"], p["increase_pct"], p["speed_ratio"]) for p in methods["teal allocated"]] == [
        (0.5, pytest.approx(2.0), 1.25)]
    assert methods["oracle"][0]["speed_kind"] == "bound"
    budgets = {b["budget_pct"]: b for b in found["where_sparsity_pays"]["budgets"]}
    assert budgets[1.0].get("method") is None  # nothing within 1%
    assert (budgets[3.0]["method"], budgets[3.0]["speed_ratio"]) == ("teal allocated", 1.25)
    # within 10%: teal 0.5 (+10%, 1.3x) and cats (+8%, 1.1x) and predicted? (+20%: no); never oracle or wina
    assert (budgets[10.0]["method"], budgets[10.0]["speed_ratio"]) == ("teal", 1.3)
    assert budgets[10.0]["faster_than_dense"] is True
    assert budgets[3.0]["oracle_increase_pct_at_bytes"] is None  # no oracle run records its bytes here
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    assert "where sparsity pays" in text and "teal allocated keep 0.5 decodes 1.25× dense" in text
    assert os.path.isfile(os.path.join(out, "frontier_time.png"))


def test_answer_configs_run_downstream_and_their_accuracy_joins_the_answer(runs, tmp_path):
    """--chosen-configs prints the saved SparseConfig of each configuration the Answer picks (each
    once); lm-eval results made from those files (their sparse_config model_arg) land in the
    Answer's table beside dense's accuracy; a budget whose run has none shows a dash."""
    run = str(tmp_path / "answer_run")
    shutil.copytree(runs["llama"], run)
    lines = [{"mode": "dense", "mlp_keep": None, "att_keep": None, "perplexity": 20.0, "tokens": 1000,
              "result_file": os.path.join(run, "results_dense.jsonl")}]
    for mode, keep, ppl, ratio in (("teal", 0.9, 20.1, 1.05), ("teal", 0.5, 21.8, 1.4), ("cats", 0.5, 21.0, 1.2)):
        lines.append({"mode": mode, "mlp_keep": keep, "att_keep": None, "perplexity": ppl, "tokens": 1000,
                      "mlp_bytes_relative": keep, "result_file": os.path.join(run, f"results_{mode}_mlp_{keep}.jsonl")})
    with open(os.path.join(run, "perplexity.jsonl"), "w") as f:
        f.write("".join(json.dumps(line) + "\n" for line in lines))
    for line in lines[1:]:
        with open(line["result_file"] + ".sparse_config.json", "w") as f:
            json.dump({"mode": line["mode"], "mlp_keep": line["mlp_keep"]}, f)
    configs = [{"result_file": line["result_file"], "mode": line["mode"], "mlp_keep": line["mlp_keep"], "kind": "kernel",
                "ratio": ratio, "rate": 40.0} for line, ratio in zip(lines[1:], (1.05, 1.4, 1.2))]
    with open(os.path.join(run, "decode_speed.json"), "w") as f:
        json.dump({"format": "dejavu-decode-speed", "version": 1, "threads": 2, "rounds": 3, "new_tokens": 32,
                   "prompt_tokens": 64, "machine": "test", "cpus": 2, "dense_rate": 31.0, "configs": configs}, f)
    printed = subprocess.run([sys.executable, os.path.join(SCRIPTS, "report.py"), run, "--chosen-configs"],
                             capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    teal_09, cats_05, teal_05 = (os.path.join(run, f"results_{name}.jsonl.sparse_config.json")
                                 for name in ("teal_mlp_0.9", "cats_mlp_0.5", "teal_mlp_0.5"))
    # +1%: teal 0.9 (+0.5%); +3%: none better than... teal 0.9 still (cats +5%); +10%: teal 0.5 (+9%, 1.4x)
    assert printed.stdout.split() == [teal_09, teal_05]

    def results(model_args, acc):
        return {"results": {"dejavu_continuation": {"alias": "dejavu_continuation", "acc,none": acc,
                                                    "acc_stderr,none": 0.011}},
                "n-samples": {"dejavu_continuation": {"original": 1200, "effective": 1200}},
                "config": {"model": "dejavu", "model_args": model_args}, "date": 1767225600.0}
    folder = tmp_path / "downstream"
    for name, args, acc in (("dense", "checkpoint=/m,model_type=llama,label=dense", 0.84),
                            ("teal_mlp_0.9", f"checkpoint=/m,model_type=llama-ml-att-sparse,sparse_config={teal_09},"
                                             "label=teal_mlp_0.9", 0.83)):
        (folder / name).mkdir(parents=True)
        (folder / name / "results_2026-01-01T00-00-00.json").write_text(json.dumps(results(args, acc)))
    assert cli.main([run, "--out", str(tmp_path / "out"), "--no-plots", "--no-progress",
                     "--downstream", str(folder)]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    pays = summary["runs"][0]["findings"]["perplexity"]["where_sparsity_pays"]
    assert pays["downstream_dense"]["value"] == 0.84
    by_budget = {b["budget_pct"]: b for b in pays["budgets"]}
    assert by_budget[1.0]["downstream"]["value"] == 0.83 and "downstream" not in by_budget[10.0]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "dense 0.840 ± 0.011" in md
    assert "| +1% | teal keep 0.9 | 1.05× |" in md and md.count("| 0.830 ± 0.011 |") == 2  # +1% and +3%


def test_predictor_record_prefers_the_other_documents_and_keeps_the_token_split():
    line = {"kind": "mlp", "layer": 0, "out": 8, "status": "ok",
            "val": {"recall": 0.9, "recall_at_matched_k": 0.7, "true_sparsity": 0.9},
            "eval_dump": {"rows": 123, "metrics": {"recall": 0.8, "recall_at_matched_k": 0.6, "true_sparsity": 0.9}}}
    record = report_runs.predictor_record(line)
    assert record["recall_source"] == "other_documents" and record["rows_other_documents"] == 123
    assert record["recall_at_matched_k"] == 0.6 and record["recall"] == 0.8
    assert record["token_split"] == {"recall": 0.9, "recall_at_matched_k": 0.7}
    del line["eval_dump"]
    record = report_runs.predictor_record(line)
    assert record["recall_source"] == "token_split" and record["recall_at_matched_k"] == 0.7
    found = findings.predictor_findings([{"layer": 0, "mlp": {"same": record}}], "mlp", "same")
    assert found["recall_sources"] == ["token_split"] and "held-out tokens" in markdown.md_recall_source(found)


def test_depth_findings_rank_recall_against_the_next_layers_similarity():
    recall = [0.8, 0.7, 0.75, 0.5, 0.4]
    cosine = [0.95, 0.9, 0.92, 0.7, 0.6]  # the same order as recall: Spearman 1
    layers = [{"layer": l, "mlp": {"same": {"recall_at_matched_k": r}},
               "drift": {"cos_next_layer": {"mean": c}, "cos_mlp_x": {"mean": 1 - c}}}
              for l, (r, c) in enumerate(zip(recall, cosine))]
    layers.append({"layer": 5, "mlp": {"same": None}, "drift": None})  # no predictor, no drift: left out
    depth = findings.depth_findings(layers)
    assert depth["layers"] == [0, 1, 2, 3, 4]
    assert depth["spearman_recall_vs_drift"]["cos_next_layer"] == pytest.approx(1.0)
    assert depth["spearman_recall_vs_drift"]["cos_mlp_x"] == pytest.approx(-1.0)
    assert depth["spearman_recall_vs_depth"] == pytest.approx(-0.9)
    assert findings.depth_findings([{"layer": 0, "mlp": {"same": None}, "drift": None}]) is None


def test_the_answer_names_the_controls_reports_decisive_control(runs, tmp_path):
    controls = tmp_path / "reports" / "controls-x"
    controls.mkdir(parents=True)
    sentence = "The decisive control is the training label: planted."
    (controls / "summary.json").write_text(json.dumps({
        "format": "dejavu-llama-controls", "model": "tiny", "layer_spec": "2,7",
        "answer": {"sentence": sentence, "decisive": "label"}}))
    out = tmp_path / "reports" / "study"
    assert cli.main([runs["opt"], "--out", str(out), "--no-plots", "--no-progress", "--controls", str(controls)]) == 0
    md = (out / "report.md").read_text()
    answer = md.split("## Answer")[1].split("## Runs")[0]
    assert sentence in answer and "(../controls-x/controls.md)" in answer
    # not a controls summary, or one without an answer: a named error
    (controls / "summary.json").write_text(json.dumps({"format": "dejavu-llama-report"}))
    assert cli.main([runs["opt"], "--out", str(out), "--no-plots", "--no-progress", "--controls", str(controls)]) == 1


def test_an_allocated_run_does_not_stand_in_for_the_uniform_one(runs, tmp_path):
    """Oracle against predicted at a kept fraction compares one fraction for every layer: an
    allocated predicted run at the same mean (written after the uniform one) stays out of it and
    out of the perplexity plot's lines, and keeps its own line on the frontier."""
    run = tmp_path / "run"
    shutil.copytree(runs["llama"], run)
    lines = PERPLEXITY + [{"mode": "predicted", "mlp_keep": 0.5, "att_keep": 1.0, "perplexity": 40.0,
                           "tokens": 1000, "allocation": "allocation_predicted_0.5.json", "result_file": "pa5.jsonl"}]
    (run / "perplexity.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cli.write_report([str(run)], out_dir=str(tmp_path / "out"), progress=False, plots=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    found = summary["runs"][0]["findings"]["perplexity"]
    at_half = [c for c in found["at_kept_fraction"] if c["mlp_keep"] == 0.5]
    assert [c["predicted"] for c in at_half if c["predicted_run"]] == [24.0]
    assert found["mlp_frontier"]["methods"]["predicted allocated"][0]["increase_pct"] == pytest.approx(100.0)
    series = plots.perplexity_series(summary["runs"][0])
    assert (0.5, 40.0) not in series[("predicted", "mlp", 1.0)] and (0.5, 24.0) in series[("predicted", "mlp", 1.0)]
