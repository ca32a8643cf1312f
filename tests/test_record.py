"""The study scripts' perplexity log line (dejavu_study/record.py): typed fields, the perplexity of
the results file, the sparse stats where given, and named errors."""

import json
import subprocess
import sys

import pytest

from dejavu_study import record


def write_results(path, logprobs):
    """A runner results file of one request whose echoed prompt has these token log-probabilities."""
    line = {"request": {"prompt": "x"}, "result": {"choices": [{"logprobs": {
        "token_logprobs": [None, *logprobs], "tokens": ["t"] * (len(logprobs) + 1)}}]}}
    path.write_text(json.dumps(line) + "\n")


def test_a_line_holds_the_fields_the_perplexity_and_the_stats(tmp_path):
    results, stats, log = tmp_path / "r.jsonl", tmp_path / "s.json", tmp_path / "log.jsonl"
    write_results(results, [-1.0, -3.0])
    stats.write_text(json.dumps({"mean_kept": 0.52, "bytes_relative": 0.6}))
    assert record.main([str(log), str(results), "mode=teal", "mlp_keep=0.5", "att_keep=-",
                        "allocation=/a.json", "--stats", str(stats)]) == 0
    assert record.main([str(log), str(results), "mode=predicted", "keep=0.25", "train_rows=50000",
                        "--stats", str(tmp_path / "absent.json")]) == 0
    first, second = (json.loads(line) for line in log.read_text().splitlines())
    assert first["mode"] == "teal" and first["mlp_keep"] == 0.5 and first["att_keep"] is None
    assert first["allocation"] == "/a.json"
    assert first["perplexity"] == pytest.approx(2.718281828 ** 2.0) and first["tokens"] == 2
    assert (first["reached_keep"], first["mlp_bytes_relative"], first["sparse_stats"]) == (0.52, 0.6, str(stats))
    assert second["train_rows"] == 50000 and isinstance(second["train_rows"], int) and "reached_keep" not in second


def test_bad_input_is_named(tmp_path):
    with pytest.raises(record.RecordError, match="'mlp_keep=half'"):
        record.parse_pairs(["mlp_keep=half"])
    with pytest.raises(record.RecordError, match="KEY=VALUE"):
        record.parse_pairs(["teal"])
    missing = subprocess.run([sys.executable, "-m", "dejavu_study.record", str(tmp_path / "log"),
                              str(tmp_path / "nothing.jsonl"), "mode=dense"], capture_output=True, text=True)
    assert missing.returncode == 1 and "nothing.jsonl" in missing.stderr
    malformed = subprocess.run([sys.executable, "-m", "dejavu_study.record", str(tmp_path / "log"),
                                str(tmp_path / "nothing.jsonl"), "keep"], capture_output=True, text=True)
    assert malformed.returncode == 2 and "KEY=VALUE" in malformed.stderr
    assert not (tmp_path / "log").exists()
