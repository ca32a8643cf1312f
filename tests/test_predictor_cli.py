"""Entry points and run scripts: every layer in one process, results file, failure isolation."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
from sparse_predictor.cli import main
from sparse_predictor.predictor import load_predictor, load_predictor_info
from sparse_predictor.summarize import main as summarize_main
from sparse_predictor.synthetic import make_dump

FAST = ["--D", "16", "--epochs", "3", "--lr", "1e-2", "--batch_size", "128", "--no-progress", "--threads", "1"]
SETTINGS_KEYS = {"model", "dataset", "layer", "kind", "input_mode", "input_source", "label_rule", "D", "lr",
                 "epochs", "rows_train", "rows_val", "seed", "val", "checkpoint", "d", "out"}
METRIC_KEYS = {"recall", "precision", "f1", "true_sparsity", "classifier_sparsity", "recall_at_matched_k", "loss"}


@pytest.fixture(autouse=True)
def keep_torch_threads():
    # main() applies --threads to this process; give other tests their thread count back
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def small_dump(path, family="llama", layers=3):
    make_dump(str(path), model_type=family, rows=300, hidden_size=16, intermediate_size=24, num_heads=4,
              num_layers=layers)
    return path


def read_lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("flags, message", [
    (["--L", "5"], "--L '5': layer(s) [5] not among the available 0-2"),
    (["--L", "1-x"], "--L '1-x'"),
])
def test_bad_layer_spec_is_an_error_naming_it(tmp_path, caplog, flags, message):
    dump = small_dump(tmp_path / "dump")
    assert main("mlp", "llama", ["--data-path", str(dump), "--ckpt-dir", str(tmp_path / "ckpt"), *flags, *FAST]) == 1
    assert message in caplog.text
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("k", ["0", "-0.1", "1.5", "2"])
def test_bad_label_k_is_an_error_naming_it(tmp_path, capsys, k):
    dump = small_dump(tmp_path / "dump")
    with pytest.raises(SystemExit) as exit_info:
        main("mlp", "llama", ["--data-path", str(dump), "--label", "topk", "--k", k, *FAST])
    assert exit_info.value.code == 2 and "--k" in capsys.readouterr().err


def test_all_layers_in_one_process(tmp_path):
    dump, ckpt = small_dump(tmp_path / "dump"), tmp_path / "ckpt"
    rc = main("mlp", "llama", ["--data-path", str(dump), "--ckpt-dir", str(ckpt), "--L", "all",
                               "--model", "smollm2-135m", "--k", "0.25", "--run-id", "r1", *FAST])
    assert rc == 0
    lines = read_lines(ckpt / "metrics_mlp.jsonl")
    assert [e["layer"] for e in lines] == [0, 1, 2]
    for entry in lines:
        assert SETTINGS_KEYS <= set(entry) and METRIC_KEYS | {"recall_at_k"} == set(entry["val"])
        assert entry["model"] == "smollm2-135m" and entry["run_id"] == "r1"
        assert entry["label_rule"] == {"name": "topk", "k": 0.25}
        assert Path(entry["checkpoint"]).name == f"c4_layer{entry['layer']}.pt"
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["c4_layer0.pt", "c4_layer1.pt", "c4_layer2.pt"]
    model = load_predictor(str(ckpt / "c4_layer2.pt"))
    assert model(torch.zeros(1, 16)).shape == (1, 24)
    info = load_predictor_info(str(ckpt), "mlp", 2)
    assert info["input_source"] == "mlp_x_2" and info["D"] == 16


def test_opt_attention_entry_defaults(tmp_path):
    dump, ckpt = small_dump(tmp_path / "dump", family="opt", layers=2), tmp_path / "ckpt"
    assert main("att", "opt", ["--data-path", str(dump), "--ckpt-dir", str(ckpt), "--L", "1", *FAST]) == 0
    (entry,) = read_lines(ckpt / "metrics_att.jsonl")
    assert entry["input_mode"] == "prev" and entry["input_source"] == "att_x_0"
    assert entry["label_rule"] == {"name": "topk", "k": 0.5} and entry["out"] == 4
    assert (ckpt / "c4_att_layer1.pt").is_file()


def test_a_failed_layer_is_recorded_and_the_others_run(tmp_path, caplog):
    dump, ckpt = small_dump(tmp_path / "dump"), tmp_path / "ckpt"
    with open(dump / "mlp_label_1.mmap", "r+b") as f:
        f.truncate(100)
    rc = main("mlp", "opt", ["--data-path", str(dump), "--ckpt-dir", str(ckpt), "--L", "0-2", *FAST])
    assert rc == 1
    status = {e["layer"]: e["status"] for e in read_lines(ckpt / "metrics_mlp.jsonl")}
    assert status == {0: "ok", 1: "failed", 2: "ok"}
    assert str(dump / "mlp_label_1.mmap") in caplog.text
    assert not (ckpt / "c4_layer1.pt").exists()
    assert summarize_main(["--ckpt-dir", str(ckpt), "--kind", "mlp"]) == 1


def test_bad_arguments_exit_nonzero(tmp_path):
    dump = small_dump(tmp_path / "dump", layers=1)
    assert main("mlp", "llama", ["--data-path", str(dump), "--label", "threshold", *FAST]) == 1  # no --threshold
    assert main("mlp", "llama", ["--data-path", str(tmp_path / "nowhere"), *FAST]) == 1
    with pytest.raises(SystemExit):
        main("mlp", "llama", ["--input", "sideways"])


def run_script(name, cwd, **env):
    full_env = {**os.environ, "NUM_GPUS": "0", "EPOCHS": "3", "D": "16", "LR": "1e-2", "THREADS": "1", **env}
    return subprocess.run(["bash", str(REPO / "sparse_predictor" / name), "--no-progress"], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=300)


def test_run_script_end_to_end_from_another_directory(tmp_path):
    small_dump(tmp_path / "dump")
    # relative DATA_PATH, run from outside sparse_predictor/
    proc = run_script("run_c4_att_llama.sh", cwd=tmp_path, DATA_PATH="dump", CKPT_DIR=str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "att: 3 of 3 layers ok" in proc.stdout
    assert "rec@K" in proc.stdout and "mean" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("*.pt")) == [
        "c4_att_layer0.pt", "c4_att_layer1.pt", "c4_att_layer2.pt"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_run_script_reports_a_failed_layer(tmp_path, workers):
    dump = small_dump(tmp_path / "dump", family="opt")
    os.remove(dump / "mlp_x_1.mmap")
    proc = run_script("run_c4_mlp.sh", cwd=REPO / "sparse_predictor", DATA_PATH=str(dump),
                      CKPT_DIR=str(tmp_path / "ckpt"), CPU_WORKERS=workers)
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout and str(dump / "mlp_x_1.mmap") in proc.stdout + proc.stderr
    assert "mlp: 2 of 3 layers ok, 1 failed or missing" in proc.stdout
    assert (tmp_path / "ckpt" / "c4_layer0.pt").is_file() and (tmp_path / "ckpt" / "c4_layer2.pt").is_file()


def test_cpu_workers_train_the_layers_one_process_trains(tmp_path):
    """CPU_WORKERS=2 deals the layers out over two processes: the same checkpoints and metrics
    as one process (both on one thread), the workers' lines on the terminal and in their logs."""
    small_dump(tmp_path / "dump")
    one = run_script("run_c4_mlp_llama.sh", cwd=tmp_path, DATA_PATH="dump", CKPT_DIR=str(tmp_path / "one"))
    two = run_script("run_c4_mlp_llama.sh", cwd=tmp_path, DATA_PATH="dump", CKPT_DIR=str(tmp_path / "two"),
                     CPU_WORKERS="2")
    assert one.returncode == 0 and two.returncode == 0, one.stdout + one.stderr + two.stdout + two.stderr
    assert "CPU worker 0: layers 0,2 on 1 thread(s)" in two.stdout
    assert "CPU worker 1: layers 1 on 1 thread(s)" in two.stdout
    assert "mlp layer 1: recall=" in two.stdout + two.stderr  # a worker's own line, shown as it trains
    assert "mlp: 3 of 3 layers ok" in two.stdout
    logs = sorted(p.name.split("_")[1] for p in (tmp_path / "two" / "logs").glob("mlp_cpu*.log"))
    assert logs == ["cpu0", "cpu1"]
    for layer in range(3):
        name = f"c4_layer{layer}.pt"
        first, second = torch.load(tmp_path / "one" / name), torch.load(tmp_path / "two" / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)

    def val_metrics(folder):
        entries = [json.loads(line) for line in (folder / "metrics_mlp.jsonl").read_text().splitlines()]
        return {entry["layer"]: entry["val"] for entry in entries}
    assert val_metrics(tmp_path / "one") == val_metrics(tmp_path / "two")


def test_cpu_workers_must_be_a_whole_number(tmp_path):
    small_dump(tmp_path / "dump", layers=1)
    proc = run_script("run_c4_mlp_llama.sh", cwd=tmp_path, DATA_PATH="dump", CKPT_DIR=str(tmp_path / "ckpt"),
                      CPU_WORKERS="two")
    assert proc.returncode == 2 and "CPU_WORKERS" in proc.stderr and "'two'" in proc.stderr
