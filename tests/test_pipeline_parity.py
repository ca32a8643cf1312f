"""1, 2 and 3 gloo stages on CPU write the same results; greedy tokens match transformers.

The three runs also use the three decode backends (modules/decode): 1 stage the default (cpu:
C kernels), 2 stages cuda (its static-cache step, run eagerly off a GPU), 3 stages torch."""

import math

import pytest
import torch
from transformers import AutoTokenizer

from test_pipeline_support import Pipeline, read_jsonl, run_in_process, runner_args, write_requests
from tiny_models import tiny_llama, tiny_opt

REQUESTS = [
    {"prompt": "w5 w17 w200", "max_tokens": 8, "echo": True, "logprobs": 2, "temperature": 0},
    {"prompt": "w9 w10 w11 w12 w13 w14 w15 w16 w30 w31 w32 w33", "max_tokens": 6, "logprobs": 1},
    {"prompt": "w40 w41", "max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "n": 2, "logprobs": 1},
    {"prompt": " ".join(f"w{i}" for i in range(50, 70)), "max_tokens": 0, "echo": True, "logprobs": 1},
    {"prompt": "w7 w8 w9 w10 w11", "max_tokens": 5, "temperature": 0, "logprobs": 3, "echo": True},
    {"prompt": "w100 w101 w102", "max_tokens": 4, "temperature": 1.0, "best_of": 3, "n": 1, "logprobs": 0},
    {"prompt": "w120 w3 w44 w81 w90 w91 w92", "max_tokens": 7, "logprobs": 1},
]
GREEDY = [0, 1, 4, 6]  # requests whose tokens must equal transformers' greedy generate
FLAGS = ["--batch-size", "4", "--token-micro-batch-size", "2", "--ignore-eos", "--seed", "7"]
BACKEND_OF_STAGES = {2: ["--decode-backend", "cuda"], 3: ["--decode-backend", "torch"]}


def assert_same_results(expected, actual, label):
    assert len(expected) == len(actual), label
    for line, (want, got) in enumerate(zip(expected, actual), start=1):
        assert want["request"] == got["request"], (label, line)
        for a, b in zip(want["result"]["choices"], got["result"]["choices"], strict=True):
            assert a["text"] == b["text"], (label, line)
            assert a["finish_reason"] == b["finish_reason"], (label, line)
            if a["logprobs"] is None:
                assert b["logprobs"] is None
                continue
            assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"], (label, line)
            assert a["logprobs"]["text_offset"] == b["logprobs"]["text_offset"], (label, line)
            for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"], strict=True):
                assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-4), (label, line)
            tops_a, tops_b = a["logprobs"]["top_logprobs"] or [], b["logprobs"]["top_logprobs"] or []
            for x, y in zip(tops_a, tops_b, strict=True):
                assert (x is None) == (y is None), (label, line)
                if x is not None:
                    assert x.keys() == y.keys(), (label, line)
                    assert all(abs(x[k] - y[k]) <= 1e-4 for k in x), (label, line)


def hf_greedy(model, tokenizer, prompt, max_new_tokens):
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_multi_stage_results_match_one_stage_and_transformers(tmp_path, family):
    build = tiny_llama if family == "llama" else tiny_opt
    hf_model, checkpoint = build(tmp_path, num_hidden_layers=6)
    requests = write_requests(tmp_path / "requests.jsonl", REQUESTS)
    outputs = {stages: tmp_path / f"out{stages}.jsonl" for stages in (1, 2, 3)}

    # 2 and 3 stages as subprocesses (5 ranks at once), 1 stage in this process meanwhile.
    pipelines = {
        stages: Pipeline(runner_args(checkpoint, family, requests, outputs[stages], FLAGS + BACKEND_OF_STAGES[stages]),
                         stages, tmp_path, f"s{stages}")
        for stages in (2, 3)
    }
    try:
        assert run_in_process(runner_args(checkpoint, family, requests, outputs[1], FLAGS)) == 0
        for stages, pipeline in pipelines.items():
            codes = pipeline.wait(timeout=180)
            assert codes == [0] * stages, "\n".join(pipeline.log(r)[-2000:] for r in range(stages))
    finally:
        for pipeline in pipelines.values():
            pipeline.stop()

    one = read_jsonl(outputs[1])
    assert [r["request"] for r in one] == REQUESTS
    for stages in (2, 3):
        assert_same_results(one, read_jsonl(outputs[stages]), f"{stages} stages")

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    for index in GREEDY:
        request = REQUESTS[index]
        choice = one[index]["result"]["choices"][0]
        tokens = choice["logprobs"]["tokens"]
        if request.get("echo"):
            tokens = tokens[len(tokenizer(request["prompt"])["input_ids"]):]
        ours = tokenizer.convert_tokens_to_ids(tokens)
        assert ours == hf_greedy(hf_model, tokenizer, request["prompt"], request["max_tokens"]), index
        assert choice["finish_reason"] == "length"

    # Shapes of the result file (docs/formats.md "Requests and results").
    echoed = one[0]["result"]["choices"][0]["logprobs"]
    assert echoed["token_logprobs"][0] is None and echoed["top_logprobs"][0] is None
    assert len(echoed["tokens"]) == 3 + 8 and all(len(t) == 2 for t in echoed["top_logprobs"][1:])
    assert len(one[2]["result"]["choices"]) == 2 and len(one[5]["result"]["choices"]) == 1
    assert one[3]["result"]["choices"][0]["text"] == REQUESTS[3]["prompt"]
    scored = one[3]["result"]["choices"][0]["logprobs"]["token_logprobs"]
    assert len(scored) == 20 and all(math.isfinite(v) for v in scored[1:])


def test_a_bfloat16_pipeline_matches_one_stage(tmp_path):
    """--dtype bfloat16 on the CPU, one row per micro-batch (each decoded token through the C
    kernels, float32 activations): two stages, which hand each other the hidden states in
    bfloat16, write the tokens of one stage, with log-probabilities within bfloat16's rounding."""
    checkpoint = tiny_llama(tmp_path, num_hidden_layers=4)[1]
    greedy = [REQUESTS[i] for i in GREEDY]
    requests = write_requests(tmp_path / "requests.jsonl", greedy)
    flags = ["--batch-size", "2", "--token-micro-batch-size", "1", "--ignore-eos", "--dtype", "bfloat16"]
    outputs = {stages: tmp_path / f"bf16_{stages}.jsonl" for stages in (1, 2)}
    pipeline = Pipeline(runner_args(checkpoint, "llama", requests, outputs[2], flags), 2, tmp_path, "bf16")
    try:
        assert run_in_process(runner_args(checkpoint, "llama", requests, outputs[1], flags)) == 0
        codes = pipeline.wait(timeout=180)
        assert codes == [0, 0], "\n".join(pipeline.log(r)[-2000:] for r in range(2))
    finally:
        pipeline.stop()
    one, two = read_jsonl(outputs[1]), read_jsonl(outputs[2])
    for want, got in zip(one, two, strict=True):
        a, b = want["result"]["choices"][0], got["result"]["choices"][0]
        assert a["text"] == b["text"] and a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
        for x, y in zip(a["logprobs"]["token_logprobs"], b["logprobs"]["token_logprobs"], strict=True):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 2e-2 * max(1.0, abs(x)))
