"""Failures end every rank promptly with a clear message; bad requests are named by line."""

import json
import os
import signal
import time

import pytest

from test_pipeline_support import Pipeline, read_jsonl, run_in_process, runner_args, write_requests
from tiny_models import tiny_llama

GOOD = {"prompt": "w5 w17 w200", "max_tokens": 3, "logprobs": 1}


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    _, checkpoint = tiny_llama(tmp_path_factory.mktemp("tiny6"), num_hidden_layers=6)
    return checkpoint


def many_requests(path, count=400):
    return write_requests(path, [
        {"prompt": " ".join(f"w{3 + (i * 7 + j) % 250}" for j in range(12)), "max_tokens": 24}
        for i in range(count)
    ])


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_and_break(tiny6, tmp_path, sig, extra=()):
    """3 ranks on many requests; once they compute, send `sig` to rank 1. (pipeline, seconds)"""
    requests = many_requests(tmp_path / "requests.jsonl")
    output = tmp_path / "out.jsonl"
    args = runner_args(tiny6, "llama", requests, output,
                       ["--batch-size", "4", "--token-micro-batch-size", "1", *extra])
    pipeline = Pipeline(args, 3, tmp_path, "kill")
    try:
        wait_until(lambda: all("loading layers" in pipeline.log(r) for r in range(3)), 120, "ranks to load")
        time.sleep(1.5)
        assert all(proc.poll() is None for proc in pipeline.procs), "the run ended before the failure"
        pipeline.kill(1, sig)
        started = time.monotonic()
        codes = {}
        for rank in (0, 2):
            codes[rank] = pipeline.procs[rank].wait(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        pipeline.stop()
    assert not output.exists(), "a failed run must not leave a result file"
    return pipeline, codes, elapsed


def test_killed_rank_ends_every_other_rank_naming_it(tiny6, tmp_path):
    pipeline, codes, elapsed = start_and_break(tiny6, tmp_path, signal.SIGKILL)
    print(f"other ranks exited {elapsed:.1f} s after the kill")
    assert elapsed < 60
    for rank in (0, 2):
        assert codes[rank] != 0, pipeline.log(rank)
        log = pipeline.log(rank)
        assert "rank 1 " in log and "lost" in log, log[-2000:]


def test_stopped_rank_is_found_by_the_heartbeat(tiny6, tmp_path):
    # A stopped (hung) process keeps its sockets open: only the heartbeat can tell.
    pipeline, codes, elapsed = start_and_break(tiny6, tmp_path, signal.SIGSTOP, ["--comm-timeout", "4"])
    print(f"other ranks exited {elapsed:.1f} s after the stop")
    assert elapsed < 30
    for rank in (0, 2):
        assert codes[rank] != 0
        log = pipeline.log(rank)
        assert "rank 1 " in log and "heartbeat" in log, log[-2000:]


BAD_LINES = {
    "malformed-json": ('{"prompt": "w5 w6", "max_tokens": 2', "line 2: malformed JSON"),
    "empty-prompt": ({"prompt": "", "max_tokens": 2}, "line 2: empty prompt"),
    "too-long": ({"prompt": " ".join(["w9"] * 300), "max_tokens": 1},
                 "line 2: prompt is 300 tokens, longer than the model's 256 positions"),
    "too-long-with-generation": ({"prompt": " ".join(["w9"] * 250), "max_tokens": 10},
                                 "line 2: prompt (250 tokens) + max_tokens (10) exceeds the model's 256 positions"),
    "negative-max-tokens": ({"prompt": "w5 w6", "max_tokens": -1}, "line 2: max_tokens must be >= 0, got -1"),
    "bad-top-p": ({"prompt": "w5 w6", "top_p": 0}, "line 2: top_p must be in (0, 1]"),
    "not-an-object": ("[1, 2]", "line 2: a request must be a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_request_line_is_an_error_naming_it(tiny6, tmp_path, caplog, case):
    line, message = BAD_LINES[case]
    requests = write_requests(tmp_path / "requests.jsonl", [GOOD, line, GOOD])
    output = tmp_path / "out.jsonl"
    assert run_in_process(runner_args(tiny6, "llama", requests, output)) == 1
    assert message in caplog.text
    assert not output.exists()


def test_skip_bad_requests_keeps_results_aligned(tiny6, tmp_path):
    lines = [GOOD] + [line for line, _ in BAD_LINES.values()] + [{**GOOD, "prompt": "w40 w41"}]
    requests = write_requests(tmp_path / "requests.jsonl", lines)
    with open(requests, "a") as handle:  # blank lines are not requests
        handle.write("\n   \n")
    output = tmp_path / "out.jsonl"
    assert run_in_process(runner_args(tiny6, "llama", requests, output, ["--skip-bad-requests"])) == 0
    results = read_jsonl(output)
    assert len(results) == len(lines)
    assert "result" in results[0] and "result" in results[-1]
    for number, ((_, message), result) in enumerate(zip(BAD_LINES.values(), results[1:-1]), start=2):
        assert result["line"] == number and message.replace("line 2", f"line {number}") in result["error"]
    # The good results are what a clean file gives.
    clean = write_requests(tmp_path / "clean.jsonl", [lines[0], lines[-1]])
    assert run_in_process(runner_args(tiny6, "llama", clean, tmp_path / "clean_out.jsonl")) == 0
    expected = read_jsonl(tmp_path / "clean_out.jsonl")
    assert [results[0], results[-1]] == expected


def test_unknown_model_type_lists_the_known(tiny6, tmp_path, caplog):
    requests = write_requests(tmp_path / "requests.jsonl", [GOOD])
    assert run_in_process(runner_args(tiny6, "gpt-9", requests, tmp_path / "out.jsonl")) == 1
    assert "unknown --model-type 'gpt-9'; known:" in caplog.text and "llama" in caplog.text


def test_layer_mismatch_is_found_before_loading_weights(tiny6, tmp_path, caplog):
    # A folder with only config.json: any weight access would fail with another message.
    folder = tmp_path / "config-only"
    folder.mkdir()
    with open(os.path.join(tiny6, "config.json")) as src:
        (folder / "config.json").write_text(src.read())
    requests = write_requests(tmp_path / "requests.jsonl", [GOOD])
    cases = [
        (["--num-layers", "2", "--pipeline-group-size", "2", "--world-size", "2"], "--num-layers 2 x --pipeline-group-size 2"),
        (["--max-layers", "8"], "--max-layers 8 does not match the checkpoint's 6 layers"),
        (["--pipeline-group-size", "4", "--world-size", "4"], "6 layers cannot be split evenly over 4 stages"),
    ]
    for extra, message in cases:
        caplog.clear()
        assert run_in_process(runner_args(folder, "llama", requests, tmp_path / "out.jsonl", extra)) == 1
        assert message in caplog.text, caplog.text


def test_missing_request_file_and_fp16_on_cpu(tiny6, tmp_path, caplog):
    assert run_in_process(runner_args(tiny6, "llama", tmp_path / "nope.jsonl", tmp_path / "out.jsonl")) == 1
    assert "request file not found" in caplog.text
    requests = write_requests(tmp_path / "requests.jsonl", [GOOD])
    caplog.clear()
    assert run_in_process(runner_args(tiny6, "llama", requests, tmp_path / "out.jsonl", ["--fp16"])) == 0
    assert "--fp16 ignored on CPU" in caplog.text
    assert json.loads((tmp_path / "out.jsonl").read_text())["result"]["choices"][0]["text"]
