"""The offline corpus: two licensed sources of English prose, split by document, in every request file."""

import json
import re

import pytest

from dejavu_llama.task_datasets import c4_requests, offline_text


@pytest.fixture(scope="module")
def splits():
    return {split: offline_text.offline_documents(split) for split in ("train", "validation")}


def test_every_source_is_in_both_splits_and_no_document_in_both(splits):
    for split in ("train", "validation"):
        assert {p.source for p in splits[split]} == set(offline_text.SOURCES)
    train = {(p.source, p.document) for p in splits["train"]}
    validation = {(p.source, p.document) for p in splits["validation"]}
    assert not train & validation
    words = sum(len(p.text.split()) for split in splits.values() for p in split)
    assert words > 750_000  # about 1.3 SmolLM2 tokens a word: over a million tokens


def test_passages_are_prose_of_bounded_length(splits):
    passages = splits["train"]
    lengths = sorted(len(p.text.split()) for p in passages)
    assert lengths[len(lengths) // 2] <= offline_text.PASSAGE_WORDS
    for passage in passages[:200]:
        assert not re.search(r"</?(p|div|span|a|pre|code|li|note|w|verse)\b[^>]*>", passage.text)  # no markup left
        assert ">>>" not in passage.text  # interactive code examples are dropped


def test_html_prose_keeps_paragraphs_and_drops_code():
    page = ("<html><body><div class='sphinxsidebar'><p>Navigation text that is long enough to count here.</p></div>"
            "<p>The quick brown fox jumps over the lazy dog near the river bank.</p>"
            "<div class='highlight'><pre>def f(x):\n    return x + 1</pre></div>"
            "<p>short one.</p><p>x = [1, 2, 3] + {4: 5} * 6 / 7 % 8 & 9 | 10 ^ 11 == 12.</p></body></html>")
    assert offline_text.html_prose(page) == "The quick brown fox jumps over the lazy dog near the river bank."


def test_passages_join_paragraphs_up_to_the_limit():
    text = "\n\n".join(" ".join(["word"] * 150) for _ in range(5))
    assert [len(p.split()) for p in offline_text.passages(text, words=400)] == [300, 300, 150]


def test_requests_carry_their_source_and_draw_on_every_source(tmp_path):
    out = tmp_path / "train.jsonl"
    assert c4_requests.main("train", str(out), 10, ["--offline", "--num-docs", "6", "--output", str(out)]) == 0
    requests = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(requests) == 6
    assert [r["source"] for r in requests] == sorted(offline_text.SOURCES) * 3  # taken from the sources in turn
    train_documents = {(r["source"], r["document"]) for r in requests}
    validation = {(p.source, p.document) for p in offline_text.offline_documents("validation")}
    assert not train_documents & validation


def test_a_missing_package_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(offline_text, "BIBLE_MODULE", str(tmp_path / "nowhere"))
    with pytest.raises(offline_text.CorpusMissing, match="sword-text-web"):
        offline_text.world_english_bible()
