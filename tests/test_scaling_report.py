"""The scaling report: sizes, labels, gap to oracle and the trend, from a run folder's files."""

import json
import os

import pytest

from dejavu_study import scaling


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)


def metrics_line(layer, rows, recall_k):
    return {"status": "ok", "kind": "mlp", "layer": layer, "rows_train": rows, "rows_val": 100, "D": 64, "lr": 0.003,
            "batch_size": 1024, "patience": 2, "select_metric": "recall_at_matched_k",
            "epochs": 40, "epochs_run": 9, "best_epoch": 6, "seconds": 2.0,
            "val": {"recall": recall_k + 0.2, "precision": 0.3, "recall_at_matched_k": recall_k}}


@pytest.fixture
def run(tmp_path):
    run = tmp_path / "run"
    write_lines(run / "dump" / "meta.json", [])
    (run / "dump" / "meta.json").write_text(json.dumps({"model": "m", "layers": [1, 3], "num_layers": 4,
                                                        "tokens": 2100}))
    for rows, k, recall in ((100, 0.1, 0.4), (1000, 0.1, 0.5), (1000, 0.5, 0.45)):
        write_lines(run / "predictors" / f"rows{rows}_k{k}" / "metrics_mlp.jsonl",
                    [metrics_line(1, rows, recall), metrics_line(3, rows, recall + 0.1)])
    write_lines(run / "scaling.jsonl", [
        {"mode": "dense", "perplexity": 10.0, "tokens": 500},
        {"mode": "oracle", "keep": 0.5, "perplexity": 10.5, "tokens": 500},
        {"mode": "predicted", "keep": 0.5, "train_rows": 100, "label_k": 0.1, "perplexity": 14.0, "tokens": 500},
        {"mode": "predicted", "keep": 0.5, "train_rows": 1000, "label_k": 0.1, "perplexity": 12.0, "tokens": 500},
        {"mode": "predicted", "keep": 0.5, "train_rows": 1000, "label_k": 0.5, "perplexity": 11.0, "tokens": 500},
    ])
    write_lines(run / "timings.jsonl", [{"step": "collect", "seconds": 60}, {"step": "dump_bytes", "bytes": 2 ** 30}])
    write_lines(run / "train.jsonl", [{"prompt": "a", "source": "books"}, {"prompt": "b", "source": "docs"}])
    write_lines(run / "val.jsonl", [{"prompt": "c", "source": "books"}, {"prompt": "d", "source": "docs"}])
    return run


def test_summary_and_markdown(run, tmp_path):
    assert scaling.main([str(run), "--out", str(tmp_path / "out"), "--layers", "1,3"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sweep_label_k"] == 0.1 and summary["keeps"] == [0.5]
    sweep = [s for s in summary["sets"] if s["label_k"] == 0.1]
    assert [s["train_rows"] for s in sweep] == [100, 1000]
    assert sweep[0]["mean_recall_at_matched_k"] == pytest.approx(0.45)
    p = sweep[1]["perplexity"]["0.5"]
    assert p["predicted_change_pct"] == pytest.approx(20.0) and p["oracle_change_pct"] == pytest.approx(5.0)
    assert p["gap_to_oracle_pct"] == pytest.approx(100 * (12.0 / 10.5 - 1))
    assert summary["corpus"]["documents"]["train"] == {"books": 1, "docs": 1}
    text = (tmp_path / "out" / "scaling.md").read_text()
    assert "Between 100 and 1,000 training tokens" in text and "0.450 to 0.550" in text
    assert "label k = 0.5 gives +10.0%, label k = 0.1 gives +20.0%" in text
    assert "k = the kept fraction serves this kept fraction better" in text
    assert "nothing here is extrapolated beyond 1,000 tokens" in text
    assert "D = 64, AdamW lr 0.003, batch 1024, 100 validation rows" in text and "a cap of 40 epochs" in text
    for png in ("recall_vs_tokens.png", "perplexity_vs_tokens.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_missing_files_are_named(run, tmp_path, caplog):
    os.remove(run / "scaling.jsonl")
    assert scaling.main([str(run), "--out", str(tmp_path / "out")]) == 1
    assert "scaling.jsonl" in caplog.text
