"""Perplexity through the pipeline equals transformers' on the same tokens; request files."""

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import INFERENCE_DIR, run_python
from test_pipeline_support import read_jsonl, run_pipeline, runner_args
from dejavu_llama.task_datasets.inference_data import Entry, TokenText, build_choice, make_batches
from dejavu_llama.task_datasets.perplexity import perplexity_of_results
from dejavu_llama.pipeline_parallel.generation_utils import TokenSampler, filter_top_k_top_p

NUM_DOCS = 24
MAX_TOKENS = 64


def transformers_perplexity(model, tokenizer, prompts):
    total, count = 0.0, 0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
        total += logprobs[:-1].gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(-total / count), count


def test_smollm2_pipeline_perplexity_matches_transformers(smollm2_checkpoint, smollm2_hf, smollm2_tokenizer, tmp_path):
    requests = tmp_path / "c4_val.jsonl"
    run_python(["c4_train/getdata.py", "--offline", "--num-docs", str(NUM_DOCS), "--max-tokens", str(MAX_TOKENS),
                "--tokenizer", smollm2_checkpoint, "--output", str(requests)], check=True)
    lines = read_jsonl(requests)
    assert len(lines) == NUM_DOCS
    assert all(r["max_tokens"] == 0 and r["echo"] is True and r["logprobs"] == 1 for r in lines)

    output = tmp_path / "out.jsonl"
    args = runner_args(smollm2_checkpoint, "llama", requests, output,
                       ["--batch-size", "8", "--token-micro-batch-size", "4"])
    run_pipeline(args, 2, tmp_path, "ppl", timeout=300)
    results = read_jsonl(output)
    ours = perplexity_of_results(results)

    expected, count = transformers_perplexity(smollm2_hf, smollm2_tokenizer, [r["prompt"] for r in lines])
    assert ours["tokens"] == count and ours["documents"] == NUM_DOCS
    assert abs(ours["perplexity"] - expected) / expected <= 1e-3, (ours, expected)
    assert 1 < expected < 1000

    printed = subprocess.run([sys.executable, "-m", "task_datasets.perplexity", str(output), "--json"],
                             cwd=INFERENCE_DIR, capture_output=True, text=True, check=True)
    assert abs(json.loads(printed.stdout)["perplexity"] - ours["perplexity"]) < 1e-9


def test_perplexity_skips_the_first_token_and_errors():
    def result(logprobs):
        return {"result": {"choices": [{"logprobs": {"token_logprobs": logprobs}}]}}

    results = [result([None, -1.0, -2.0]), result([None, -3.0]), {"request": {}, "error": "line 3: bad"}]
    figures = perplexity_of_results(results)
    assert figures["tokens"] == 3 and figures["documents"] == 2 and figures["skipped"] == 1
    assert figures["perplexity"] == pytest.approx(math.exp(2.0))
    assert perplexity_of_results([{"request": {}, "error": "x"}]) is None


def test_getdata_train_and_text_dir(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(5):
        (texts / f"doc{i}.txt").write_text(f"document {i} " + "word " * (10 + i))
    out = tmp_path / "train.jsonl"
    run_python(["c4_train/getdata.py", "--text-dir", str(texts), "--num-docs", "3", "--max-words", "6",
                "--output", str(out)], check=True)
    lines = read_jsonl(out)
    assert len(lines) == 3 and all(len(r["prompt"].split()) == 6 for r in lines)
    assert all(r["request_type"] == "language-model-inference" for r in lines)
    again = tmp_path / "again.jsonl"
    run_python(["c4_train/getdata.py", "--text-dir", str(texts), "--num-docs", "3", "--max-words", "6",
                "--output", str(again)], check=True)
    assert again.read_text() == out.read_text()  # seeded shuffle


class WordTokenizer:
    def __call__(self, text):
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)

    def batch_decode(self, rows):
        return [self.decode(r) for r in rows]


def make_entry(**settings):
    entry = Entry(index=0, line=1, request={"prompt": "w5 w6"}, prompt_ids=[5, 6])
    for key, value in settings.items():
        setattr(entry, key, value)
    return entry


def output_of(generated):
    return {"generated": generated, "generated_logprobs": [-1.0] * len(generated),
            "generated_top": [None] * len(generated), "prompt_logprobs": [], "prompt_top": []}


def test_choices_stop_at_eos_and_stop_sequences():
    text = TokenText(WordTokenizer())
    choice, _ = build_choice(make_entry(max_tokens=5, logprobs=0), output_of([7, 8, 2, 9, 9]), text, {2}, 0)
    assert choice["text"] == " w7 w8" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == ["w7", "w8"] and choice["logprobs"]["text_offset"] == [5, 7]
    choice, _ = build_choice(make_entry(max_tokens=5, stop=["w9"]), output_of([7, 8, 9, 10, 11]), text, set(), 0)
    assert choice["text"] == " w7 w8 " and choice["finish_reason"] == "stop"
    choice, _ = build_choice(make_entry(max_tokens=2, echo=True), output_of([7, 8, 9]), text, set(), 0)
    assert choice["text"] == "w5 w6 w7 w8" and choice["finish_reason"] == "length"


def test_batches_keep_order_and_respect_the_budget():
    entries = [make_entry(max_tokens=4, prompt_ids=[5] * n) for n in (3, 3, 10, 2)]
    for index, entry in enumerate(entries):
        entry.index = index
    entries[1].best_of = 2
    batches = make_batches(entries, batch_size=3)
    assert [[(r.entry, r.choice) for r in b.rows] for b in batches] == [[(0, 0), (1, 0), (1, 1)], [(2, 0), (3, 0)]]
    batches = make_batches(entries, batch_size=8, budget=25)
    assert [[r.entry for r in b.rows] for b in batches] == [[0, 1, 1], [2], [3]]


def test_sampling_filters_and_is_seeded():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert torch.isinf(filter_top_k_top_p(logits, top_k=2)).tolist() == [False, False, True, True]
    kept = ~torch.isinf(filter_top_k_top_p(logits, top_p=0.7))
    assert kept.tolist() == [True, True, False, False]
    draws = [TokenSampler(3).choose(logits.repeat(6, 1), [(1.0, 1.0, 0)] * 6).tolist() for _ in range(2)]
    assert draws[0] == draws[1]
    assert TokenSampler(3).choose(logits[None], [(0.0, 1.0, 0)]).tolist() == [0]
