"""The continuation task: multiple-choice items from validation documents, written for lm-eval."""

import json
import os

import pytest

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

from dejavu_llama.task_datasets import continuation_task, offline_text  # noqa: E402
from dejavu_llama.task_datasets.continuation_task import TASK_NAME, CorpusTooSmall  # noqa: E402

ITEMS = 24


@pytest.fixture(scope="module")
def validation():
    return offline_text.offline_documents("validation")


@pytest.fixture(scope="module")
def built(smollm2_checkpoint, tmp_path_factory):
    """The task written twice by the command line with the same seed, once with another."""
    folders = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        folder = tmp_path_factory.mktemp(f"task-{name}")
        assert continuation_task.main(["--tokenizer", smollm2_checkpoint, "--out", str(folder),
                                       "--items", str(ITEMS), "--seed", str(seed)]) == 0
        folders[name] = folder
    return folders


def read_items(folder):
    return [json.loads(line) for line in (folder / f"{TASK_NAME}.jsonl").read_text().splitlines()]


def test_items_have_four_distinct_choices_and_the_true_continuation(built, validation):
    items = read_items(built["a"])
    assert len(items) == ITEMS
    texts = {(p.source, p.document, p.index): p.text for p in validation}
    for item in items:
        choices = item["choices"]
        assert len(choices) == 4 and len({" ".join(c.split()) for c in choices}) == 4
        assert all(choice and choice == choice.strip() for choice in choices)
        passage = texts[item["source"], item["document"], item["passage"]]
        # the context and the answer are the passage's own text, one space apart
        assert item["context"] + " " + choices[item["answer"]] in passage
        assert continuation_task.CONTEXT_TOKENS // 2 <= item["context_tokens"] <= continuation_task.CONTEXT_TOKENS
    assert {item["source"] for item in items} == set(offline_text.SOURCES)  # every source in turn
    assert len({item["answer"] for item in items}) > 1


def test_no_item_comes_from_a_training_document(built):
    train = {(p.source, p.document) for p in offline_text.offline_documents("train")}
    for item in read_items(built["a"]):
        used = [(item["source"], item["document"])]
        used += [(item["source"], d["document"]) for d in item["distractors"]]
        assert not set(used) & train
    summary = json.loads((built["a"] / "task.json").read_text())
    assert summary["items"] == ITEMS and summary["split"] == "validation" and summary["seed"] == 0
    assert sum(entry["items"] for entry in summary["sources"].values()) == ITEMS
    for name, entry in summary["sources"].items():
        assert not {(name, document) for document in entry["documents"]} & train


def test_the_same_seed_gives_the_same_files(built):
    for name in (f"{TASK_NAME}.jsonl", f"{TASK_NAME}.yaml", "task.json", "load_items.py"):
        assert (built["a"] / name).read_bytes() == (built["b"] / name).read_bytes()
    assert read_items(built["a"]) != read_items(built["other"])


def test_a_corpus_too_small_for_the_count_is_named(smollm2_checkpoint, smollm2_tokenizer, validation, tmp_path):
    with pytest.raises(CorpusTooSmall, match="--items 500: the 3 passage"):
        continuation_task.build_items(validation[:3], smollm2_tokenizer, 500)
    with pytest.raises(ValueError, match="--items"):
        continuation_task.build_items(validation[:3], smollm2_tokenizer, 0)
    # the command line reports it and writes nothing
    out = tmp_path / "out"
    assert continuation_task.main(["--tokenizer", smollm2_checkpoint, "--out", str(out),
                                   "--items", "1000000"]) == 1
    assert not out.exists()


def test_word_starts_need_a_single_space_before_the_word():
    text = "one two  three\n\nfour five"
    # byte-level BPE offsets: the space belongs to the following token
    starts, ends = [0, 3, 7, 8, 14, 16, 20], [3, 7, 8, 14, 16, 20, 25]
    assert continuation_task.word_start_tokens(text, starts, ends) == (1, 6)


def test_the_task_runs_in_lm_eval_and_reaches_the_downstream_rows(built, tmp_path, monkeypatch):
    """A random-weight tiny Llama is enough: the YAML loads, every item is scored, the rows carry
    acc and acc_norm with their standard errors."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from dejavu_llama.modules.lm_eval_adapter import DejaVuLM
    from dejavu_study import downstream
    from tiny_models import tiny_llama

    _, checkpoint = tiny_llama(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the data file resolves beside the YAML
    out = tmp_path / "results"
    tracker = EvaluationTracker(output_path=str(out))
    results = lm_eval.simple_evaluate(
        model=DejaVuLM(checkpoint=checkpoint, batch_size=8), tasks=[TASK_NAME],
        task_manager=TaskManager(include_path=str(built["a"]), include_defaults=False),
        evaluation_tracker=tracker)
    tracker.save_results_aggregated(results=results, samples=None)
    assert results["n-samples"][TASK_NAME]["effective"] == ITEMS
    scores = results["results"][TASK_NAME]
    assert 0.0 <= scores["acc,none"] <= 1.0 and 0.0 <= scores["acc_norm,none"] <= 1.0
    rows = {row["metric"]: row for row in downstream.read_results(str(out)) if row["task"] == TASK_NAME}
    assert set(rows) == {"acc", "acc_norm"}
    for metric, row in rows.items():
        assert row["dense"] and row["samples"] == ITEMS
        assert row["value"] == pytest.approx(scores[f"{metric},none"])
        assert row["stderr"] == pytest.approx(scores[f"{metric}_stderr,none"]) and row["stderr"] > 0
