"""dejavu_study.decode_speed: the frontier's time axis, measured on a run folder's saved configs."""

import json
import os

import pytest

from dejavu_llama.modules.sparse_config import SparseConfig
from dejavu_study import decode_speed
from tiny_models import tiny_llama


def make_run(tmp_path):
    """A run folder as the study leaves it: study.json, the validation requests and the configs
    its perplexity runs saved beside their results."""
    checkpoint = tiny_llama(tmp_path)[1]
    run = tmp_path / "run"
    run.mkdir()
    (run / "study.json").write_text(json.dumps({"name": "tiny", "checkpoint": checkpoint, "model_type": "llama"}))
    words = " ".join(f"w{3 + (i * 7) % 200}" for i in range(40))
    (run / "c4_val.jsonl").write_text(json.dumps({"prompt": words, "max_tokens": 0, "echo": True}) + "\n")
    configs = {
        "results_oracle_mlp_0.5.jsonl": SparseConfig(mode="oracle", mlp_keep=0.5, sparse_attention=False),
        "results_wina_mlp_0.5.jsonl": SparseConfig(mode="wina", mlp_keep=0.5, sparse_attention=False),
        "results_dense.jsonl": SparseConfig(mode="dense"),  # not a sparse MLP run: left out
        "results_oracle_att_0.5.jsonl": SparseConfig(mode="oracle", att_keep=0.5, sparse_mlp=False),  # heads: left out
    }
    for name, config in configs.items():
        config.save_beside(str(run / name))
    return run


def test_each_sparse_mlp_config_is_timed_against_dense(tmp_path):
    run = make_run(tmp_path)
    figures = decode_speed.measure(str(run), threads=1, rounds=2, new_tokens=3, prompt_tokens=8, progress=False)
    rows = {os.path.basename(row["result_file"]): row for row in figures["configs"]}
    assert set(rows) == {"results_oracle_mlp_0.5.jsonl", "results_wina_mlp_0.5.jsonl"}
    assert rows["results_oracle_mlp_0.5.jsonl"]["kind"] == "bound"  # chooses from the dense activation
    assert rows["results_wina_mlp_0.5.jsonl"]["kind"] == "masks"  # no kernel of its own
    for row in rows.values():
        assert len(row["ratios"]) == 2 and row["ratio"] > 0 and row["rate"] > 0
    assert figures["threads"] == 1 and figures["dense_rate"] > 0 and figures["new_tokens"] == 3
    bound_only = decode_speed.measure(str(run), threads=1, rounds=1, new_tokens=2, prompt_tokens=8, progress=False,
                                      kinds=("bound",))
    assert [row["mode"] for row in bound_only["configs"]] == ["oracle"] and bound_only["kinds"] == ["bound"]


def test_the_command_writes_its_file_and_names_what_is_missing(tmp_path, caplog):
    run = make_run(tmp_path)
    assert decode_speed.main([str(run), "--threads", "1", "--rounds", "1", "--new-tokens", "2",
                              "--prompt-tokens", "8"]) == 0
    with open(run / decode_speed.OUTPUT_FILE) as handle:
        assert json.load(handle)["format"] == decode_speed.FORMAT
    assert decode_speed.main([str(run), "--kinds", "kernel"]) == 1
    assert "no MLP-only sparse run of kind kernel" in caplog.text
    assert decode_speed.main([str(run), "--prompt-tokens", "500"]) == 1
    assert "--prompt-tokens 500" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "study.json").write_text(json.dumps({"checkpoint": str(tmp_path / "llama")}))
    assert decode_speed.main([str(empty)]) == 1
    assert "no results_*.jsonl" in caplog.text


def test_a_kernel_mode_is_marked_realisable():
    from dejavu_llama.modules.sparse_execution import MODES

    assert {name: decode_speed.kind_of(mode) for name, mode in MODES.items()} == {
        "predicted": "kernel", "oracle": "bound", "dense": "kernel", "teal": "kernel", "cats": "kernel",
        "wina": "masks"}


class _ClockedModel:
    """A model on a fake clock: its prompt takes `prompt_seconds`, each further token `step_seconds`."""

    def __init__(self, clock, prompt_seconds, step_seconds):
        self.clock, self.prompt_seconds, self.step_seconds = clock, prompt_seconds, step_seconds

    def generate_greedy(self, prompt, count, backend, on_token):
        for step in range(count):
            self.clock[0] += self.prompt_seconds if step == 0 else self.step_seconds
            on_token()


def test_timed_rate_times_the_decoding_steps_only(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(decode_speed.time, "perf_counter", lambda: clock[0])
    assert decode_speed.timed_rate(_ClockedModel(clock, 0.5, 0.1), None, 32) == pytest.approx(10.0)
    # a slow prompt (a busy moment, a long prompt) does not enter the rate
    assert decode_speed.timed_rate(_ClockedModel(clock, 5.0, 0.1), None, 32, warm=False) == pytest.approx(10.0)
    with pytest.raises(decode_speed.DecodeSpeedError, match="nothing to time"):
        decode_speed.timed_rate(_ClockedModel(clock, 0.5, 0.0), None, 32)


def test_a_perplexity_budget_times_only_the_configs_within_it(tmp_path, caplog):
    run = make_run(tmp_path)
    lines = [{"mode": "dense", "perplexity": 10.0, "result_file": str(run / "results_dense.jsonl")},
             {"mode": "oracle", "perplexity": 10.4, "result_file": str(run / "results_oracle_mlp_0.5.jsonl")},
             {"mode": "wina", "perplexity": 12.0, "result_file": str(run / "results_wina_mlp_0.5.jsonl")}]
    (run / "perplexity.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    figures = decode_speed.measure(str(run), threads=1, rounds=1, new_tokens=2, prompt_tokens=8, progress=False,
                                   max_change_pct=10)
    assert [row["mode"] for row in figures["configs"]] == ["oracle"]   # +4%; wina's +20% is past the budget
    assert figures["max_perplexity_change_pct"] == 10
    assert decode_speed.main([str(run), "--max-perplexity-change", "1"]) == 1
    assert "no MLP-only sparse run within +1% perplexity" in caplog.text
    (run / "perplexity.jsonl").write_text(json.dumps(lines[1]) + "\n")
    assert decode_speed.main([str(run), "--max-perplexity-change", "10"]) == 1
    assert "no dense perplexity" in caplog.text
