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
    """A model whose decoding takes the seconds `seconds_for(count)` says, on a fake clock."""

    def __init__(self, clock, seconds_for):
        self.clock, self.seconds_for = clock, seconds_for

    def generate_greedy(self, prompt, count, backend):
        self.clock[0] += self.seconds_for(count)


def test_timed_rate_subtracts_the_prompt_and_refuses_a_busy_machine(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(decode_speed.time, "perf_counter", lambda: clock[0])
    steady = _ClockedModel(clock, lambda count: 0.5 + 0.1 * (count - 1))   # 0.5 s prompt, 0.1 s a token
    assert decode_speed.timed_rate(steady, None, 32) == pytest.approx(10.0)
    busy_short_runs = _ClockedModel(clock, lambda count: 5.0 if count == 1 else 3.0)
    with pytest.raises(decode_speed.DecodeSpeedError, match="too busy"):
        decode_speed.timed_rate(busy_short_runs, None, 32)
    once = iter([5.0])   # load lands on the first short run only: timed again, then right
    flaky = _ClockedModel(clock, lambda count: next(once, 0.5) if count == 1 else 0.5 + 0.1 * (count - 1))
    assert decode_speed.timed_rate(flaky, None, 32, warm=False) == pytest.approx(10.0)
