"""The engine as an lm-evaluation-harness model ("dejavu"), the offline tasks, the downstream table."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

from lm_eval.api.instance import Instance  # noqa: E402

from conftest import ROOT  # noqa: E402
from dejavu_llama.modules import lm_eval_adapter  # noqa: E402
from dejavu_llama.modules.lm_eval_adapter import DejaVuLM, ModelArgsError  # noqa: E402
from dejavu_study import downstream  # noqa: E402

TASKS_DIR = os.path.join(ROOT, "tests", "lm_eval_tasks")
MC_TASK, GEN_TASK = "dejavu_facts_mc", "dejavu_short_answer"

REQUESTS = [
    ("The capital of France is", " Paris"),
    ("Question: What color is the sky on a clear day?\nAnswer: ", "blue"),  # trailing space moves
    ("1, 2, 3, 4,", " 5, 6, 7"),
    ("Hello", " world! How are you today?"),
    ("A", " B"),
]
TEXTS = ["The quick brown fox jumps over the lazy dog. It was a sunny day in the park.", "One two three."]


def ll_instances(pairs=REQUESTS):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def gen_instances(items):
    return [Instance("generate_until", {}, (prompt, kwargs), i) for i, (prompt, kwargs) in enumerate(items)]


def offline_env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", DEJAVU_HUGE_PAGES="0")


@pytest.fixture(scope="module", autouse=True)
def no_huge_page_copies():
    """Each model here is loaded once and scored briefly: skip the huge-page copy at load (values
    and layout are the same; test_modules covers it)."""
    from dejavu_llama.modules.decode import huge_pages

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huge_pages, "ENABLED", False)
        yield


@pytest.fixture(scope="module")
def dense_lm(smollm2_checkpoint):
    return DejaVuLM(checkpoint=smollm2_checkpoint, batch_size=4)


@pytest.fixture(scope="module")
def dense_scores(dense_lm):
    return dense_lm.loglikelihood(ll_instances(), disable_tqdm=True)


@pytest.fixture(scope="module")
def hflm(smollm2_hf, smollm2_tokenizer):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=smollm2_hf, tokenizer=smollm2_tokenizer, batch_size=2, device="cpu")


def test_registered_with_the_harness():
    from lm_eval.api.registry import get_model

    assert get_model("dejavu") is DejaVuLM
    assert get_model("hf").__name__ == "HFLM"  # the harness's own models are still found


def test_dense_loglikelihoods_equal_the_harness_hf_model(dense_lm, dense_scores, hflm):
    reference = hflm.loglikelihood(ll_instances(), disable_tqdm=True)
    for (ours, our_greedy), (theirs, their_greedy) in zip(dense_scores, reference):
        assert ours == pytest.approx(theirs, abs=1e-4)
        assert our_greedy == their_greedy
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(TEXTS)]
    ours = dense_lm.loglikelihood_rolling(rolling, disable_tqdm=True)
    theirs = hflm.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert ours == pytest.approx(theirs, abs=1e-4)


SHARED = [("The capital of France is", " Paris"), ("The capital of France is", " a large city in Europe"),
          ("The capital of France is", " Lyon"), ("Roses are red,", " violets are blue"), ("Roses are red,", " and")]


def test_choices_sharing_a_context_score_as_the_harness_hf_model(dense_lm, hflm):
    """A multiple-choice item's context runs once and its choices read its cache: the same scores."""
    ours = dense_lm.loglikelihood(ll_instances(SHARED), disable_tqdm=True)
    theirs = hflm.loglikelihood(ll_instances(SHARED), disable_tqdm=True)
    assert [score for score, _ in ours] == pytest.approx([score for score, _ in theirs], abs=1e-4)
    assert [greedy for _, greedy in ours] == [greedy for _, greedy in theirs]
    # a context is run once per batch, however many choices it has
    calls = []
    forward = dense_lm.model.forward
    dense_lm.model.forward = lambda ids, **kw: calls.append(tuple(ids.shape)) or forward(ids, **kw)
    try:
        dense_lm.loglikelihood(ll_instances(SHARED), disable_tqdm=True)
    finally:
        del dense_lm.model.forward
    assert calls[0][0] == 2 and calls[1][0] == 5  # two contexts, then five continuations


def test_opt_dense_loglikelihoods_equal_the_harness_hf_model(tmp_path):
    """OPT's positions come from the mask too (offset 2): left-padded batches score as hf does."""
    from lm_eval.models.huggingface import HFLM
    from tiny_models import tiny_opt

    model, folder = tiny_opt(tmp_path)
    lm = DejaVuLM(checkpoint=folder, model_type="opt", batch_size=3)
    pairs = [("w5 w6 w7", " w8"), ("w9", " w10 w11 w12"), ("w20 w21 w22 w23 w24", " w25 w26"), ("w3", " w4"),
             ("w9", " w13"), ("w20 w21 w22 w23 w24", " w27 w28 w29")]  # choices sharing a context
    ours = lm.loglikelihood(ll_instances(pairs), disable_tqdm=True)
    reference = HFLM(pretrained=model.float().eval(), tokenizer=lm.tokenizer, batch_size=2, device="cpu")
    theirs = reference.loglikelihood(ll_instances(pairs), disable_tqdm=True)
    assert [score for score, _ in ours] == pytest.approx([score for score, _ in theirs], abs=1e-4)
    # a text longer than max_length is scored in rolling windows, as hf does
    lm._max_length = 8
    short = HFLM(pretrained=model.float().eval(), tokenizer=lm.tokenizer, batch_size=2, device="cpu", max_length=8)
    texts = [" ".join(f"w{i}" for i in range(30, 53)), "w7 w8 w9"]
    rolling = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]
    assert lm.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(
        short.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-4)


def test_left_padding_does_not_change_scores(dense_lm, dense_scores):
    dense_lm._batch_size = 1
    try:
        alone = dense_lm.loglikelihood(ll_instances(REQUESTS[:3]), disable_tqdm=True)
    finally:
        dense_lm._batch_size = 4
    assert [score for score, _ in alone] == pytest.approx([score for score, _ in dense_scores[:3]], abs=1e-4)


def test_generate_until_stops_on_the_harness_stop_strings(dense_lm, hflm):
    items = [("Count: 1, 2, 3,", {"until": [","], "max_gen_toks": 8}),
             ("Q: Name a color.\nA:", {"until": ["\n", "."], "max_gen_toks": 8})]
    ours = dense_lm.generate_until(gen_instances(items), disable_tqdm=True)
    assert ours == hflm.generate_until(gen_instances(items), disable_tqdm=True)  # KV cache, left padding
    assert "," not in ours[0] and ours[0].strip()
    # generation stops at the token that completes a stop string, not at max_gen_toks
    prompt = dense_lm.tok_encode("Count: 1, 2, 3,")
    tokens = dense_lm.generate_tokens([prompt], 16, until=[","])[0]
    assert "," in dense_lm.tok_decode(tokens) and "," not in dense_lm.tok_decode(tokens[:-1])
    assert len(tokens) < 16
    # without a stop string in sight, max_gen_toks ends it
    assert len(dense_lm.generate_tokens([prompt], 3, until=["<never>"])[0]) == 3


def write_random_predictors(folder, config, rank=16, seed=0):
    torch.manual_seed(seed)
    d, width, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        for name, out in ((f"c4_layer{layer}.pt", width), (f"c4_att_layer{layer}.pt", heads)):
            predictor = nn.Sequential(nn.Linear(d, rank, bias=False), nn.Linear(rank, out, bias=False))
            torch.save(predictor.state_dict(), os.path.join(folder, name))


def scores_of(lm):
    return [score for score, _ in lm.loglikelihood(ll_instances(), disable_tqdm=True)]


def test_sparse_runs_differ_from_dense_and_full_oracle_equals_dense(smollm2_checkpoint, dense_lm, dense_scores,
                                                                    tmp_path):
    dense = [score for score, _ in dense_scores]
    write_random_predictors(tmp_path, dense_lm.model.config)
    # through the harness's own constructor path, model_args as the command line gives them
    predicted = DejaVuLM.create_from_arg_string(
        f"checkpoint={smollm2_checkpoint},model_type=llama-ml-att-sparse,sparse_mode=predicted,"
        f"sparse_path={tmp_path},mlp_keep=0.25,att_keep=0.5", {"batch_size": 4, "device": None})
    settings = predicted.run_args.variant_settings  # the SparseConfig the model_args made
    assert settings.mode == "predicted" and settings.mlp_keep == 0.25 and settings.att_keep == 0.5
    assert all(block.mlp.predictor is not None and block.taps.att_predictor is not None
               for block in predicted.model.blocks)
    sparse = scores_of(predicted)
    assert max(abs(a - b) for a, b in zip(sparse, dense)) > 1e-2
    del predicted
    oracle = DejaVuLM(checkpoint=smollm2_checkpoint, model_type="llama-ml-att-sparse", sparse_mode="oracle",
                      mlp_keep=1.0, att_keep=1.0, batch_size=4)
    assert scores_of(oracle) == pytest.approx(dense, abs=1e-5)


def test_a_mode_added_to_the_runner_needs_no_adapter_change(smollm2_checkpoint, dense_scores, tmp_path):
    from dejavu_llama.modules.sparse_execution import SPARSE_MODES

    if "wina" not in SPARSE_MODES:
        pytest.skip("the runner has no wina mode")
    stats = tmp_path / "stats.json"
    lm = DejaVuLM(checkpoint=smollm2_checkpoint, model_type="llama-ml-att-sparse", sparse_mode="wina",
                  mlp_keep=0.5, sparse_stats=str(stats), batch_size=4)
    sparse = scores_of(lm)
    assert max(abs(a - b) for a, (b, _) in zip(sparse, dense_scores)) > 1e-3
    lm.close()  # the runner's closer: --sparse-stats is written
    assert json.loads(stats.read_text())["tokens"] > 0


def test_model_args_are_checked_by_the_runner_parser(smollm2_checkpoint):
    sparse = dict(checkpoint=smollm2_checkpoint, model_type="llama-ml-att-sparse")
    with pytest.raises(ModelArgsError, match="--mlp-keep"):
        DejaVuLM(**sparse, sparse_mode="oracle", mlp_keep=0)
    with pytest.raises(ModelArgsError, match="sparse_mdoe"):
        DejaVuLM(**sparse, sparse_mdoe="oracle")
    with pytest.raises(ModelArgsError, match="sparse type"):
        DejaVuLM(checkpoint=smollm2_checkpoint, model_type="llama", mlp_keep=0.5)
    with pytest.raises(ModelArgsError, match="checkpoint"):
        DejaVuLM()
    with pytest.raises(ModelArgsError, match="sparse_mode 'bogus'"):
        DejaVuLM(**sparse, sparse_mode="bogus")
    settings, _ = lm_eval_adapter.variant_settings(
        "llama-ml-att-sparse", {"no_gather": True, "sparse_mlp": False, "sparse_layers": [0, 3], "mlp_keep": "0.5"})
    assert (settings.use_gather, settings.sparse_mlp, settings.layers, settings.mlp_keep) == (False, False, "0,3", 0.5)


def test_harness_device_default_falls_back_to_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: cuda:0 is taken as given")
    assert DejaVuLM._pick_device("auto", "cuda:0") == "cpu"
    assert DejaVuLM._pick_device("cpu", "cuda:0") == "cpu"
    assert DejaVuLM._pick_device("auto", None) == "cpu"
    with pytest.raises(ValueError, match="cuda"):
        DejaVuLM._pick_device("cuda", None)


def test_offline_tasks_end_to_end_and_downstream_table(smollm2_checkpoint, dense_lm, tmp_path, monkeypatch):
    """Dense in process (an instance), sparse through the console command (the registry name) from
    outside the repository; both write the harness's results files; the table compares them."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    out = tmp_path / "results"
    monkeypatch.chdir(tmp_path)  # the tasks' data files resolve from their own folder
    tracker = EvaluationTracker(output_path=str(out))
    results = lm_eval.simple_evaluate(
        model=dense_lm,
        tasks=[MC_TASK, GEN_TASK], task_manager=TaskManager(include_path=TASKS_DIR, include_defaults=False),
        limit=4, evaluation_tracker=tracker)
    tracker.save_results_aggregated(results=results, samples=None)
    mc, gen = results["results"][MC_TASK], results["results"][GEN_TASK]
    assert 0.0 <= mc["acc,none"] <= 1.0 and 0.0 <= mc["acc_norm,none"] <= 1.0
    assert 0.0 <= gen["exact_match,strip"] <= 1.0
    assert results["n-samples"][MC_TASK]["effective"] == 4 and results["n-samples"][GEN_TASK]["effective"] == 4
    assert all(isinstance(r[0], str) and "\n" not in r[0] for r in
               (s["filtered_resps"] for s in results["samples"][GEN_TASK]))

    command = [os.path.join(os.path.dirname(sys.executable), "dejavu-lm-eval"), "--model", "dejavu",
               "--model_args", f"checkpoint={smollm2_checkpoint},model_type=llama-ml-att-sparse,sparse_mode=oracle,"
                               "mlp_keep=0.25,att_keep=0.5",
               "--tasks", MC_TASK, "--include_path", TASKS_DIR, "--limit", "4", "--batch_size", "8",
               "--output_path", str(out)]
    run = subprocess.run(command, cwd=tmp_path, env=offline_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert MC_TASK in run.stdout and "acc" in run.stdout

    rows = downstream.read_results(str(out))
    runs = {row["run"] for row in rows}
    assert runs == {"dense", "oracle mlp_keep=0.25 att_keep=0.5"}
    sparse_acc = [r for r in rows if not r["dense"] and r["task"] == MC_TASK and r["metric"] == "acc"]
    dense_acc = [r for r in rows if r["dense"] and r["task"] == MC_TASK and r["metric"] == "acc"]
    assert len(sparse_acc) == 1 and len(dense_acc) == 1
    assert dense_acc[0]["value"] == pytest.approx(mc["acc,none"])
    assert sparse_acc[0]["checkpoint"] == dense_acc[0]["checkpoint"] == smollm2_checkpoint
    assert sparse_acc[0]["model_args"]["sparse_mode"] == "oracle" and sparse_acc[0]["samples"] == 4
    table = downstream.render_table(rows)
    delta = sparse_acc[0]["value"] - dense_acc[0]["value"]
    assert f"| {MC_TASK} | acc | oracle mlp_keep=0.25 att_keep=0.5 | {sparse_acc[0]['value']:.4f}" in table
    assert f"{delta:+.4f} |" in table
    assert f"| {GEN_TASK} | exact_match,strip | dense |" in table


def harness_results(model_args, results, config_extra=None, n=20):
    """A results file as lm-eval 0.4 writes it (the fields the reader uses)."""
    return {
        "results": results,
        "groups": {},
        "configs": {},
        "versions": {task: 1.0 for task in results},
        "n-samples": {task: {"original": 24, "effective": n} for task in results},
        "higher_is_better": {task: {"acc": True} for task in results},
        "config": {"model": "dejavu", "model_args": model_args, "batch_size": 1, **(config_extra or {})},
        "date": 1767225600.0,
    }


def test_downstream_rows_and_table_from_harness_json(tmp_path):
    task = {"alias": MC_TASK, "acc,none": 0.6, "acc_stderr,none": 0.1, "acc_norm,none": 0.65,
            "acc_norm_stderr,none": "N/A"}
    files = {
        "dense/results_2026-01-01T00-00-00.json": harness_results("checkpoint=/m,model_type=llama", {MC_TASK: task}),
        "sparse/results_2026-01-01T00-10-00.json": harness_results(
            {"checkpoint": "/m", "model_type": "llama-ml-att-sparse", "sparse_mode": "predicted",
             "sparse_path": "/p", "mlp_keep": 0.5},
            {MC_TASK: dict(task, **{"acc,none": 0.45, "acc_norm,none": 0.5})},
            {"dejavu_flags": {"sparse_mode": "predicted", "mlp_keep": 0.5, "att_keep": None,
                              "sparse_mlp": "on", "sparse_attention": "off", "sparse_layers": "all"}}),
        "other/results_2026-01-01T00-20-00.json": harness_results(
            "checkpoint=/m,model_type=llama-ml-att-sparse,sparse_mode=oracle,mlp_keep=0.25,label=my run",
            {MC_TASK: dict(task, **{"acc,none": 0.55})}),
        "not_results.json": {"unrelated": True},
    }
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(json.dumps(data))
    rows = downstream.read_results(str(tmp_path))
    keyed = {(r["run"], r["metric"]): r for r in rows}
    assert set(keyed) == {(run, metric) for run in ("dense", "predicted mlp_keep=0.5 heads dense", "my run")
                          for metric in ("acc", "acc_norm")}
    dense = keyed["dense", "acc"]
    assert dense["dense"] and dense["value"] == 0.6 and dense["stderr"] == 0.1 and dense["samples"] == 20
    assert dense["model_args"] == {"checkpoint": "/m", "model_type": "llama"} and dense["task"] == MC_TASK
    assert keyed["dense", "acc_norm"]["stderr"] is None  # "N/A"
    assert not keyed["my run", "acc"]["dense"]
    table = downstream.render_table(rows)
    assert f"| {MC_TASK} | acc | dense | 0.6000 ± 0.1000 | (dense) |" in table
    assert f"| {MC_TASK} | acc | predicted mlp_keep=0.5 heads dense | 0.4500 ± 0.1000 | -0.1500 |" in table
    assert f"| {MC_TASK} | acc | my run | 0.5500 ± 0.1000 | -0.0500 |" in table
    assert f"| {MC_TASK} | acc_norm | predicted mlp_keep=0.5 heads dense | 0.5000 | -0.1500 |" in table
    (tmp_path / "empty").mkdir()
    with pytest.raises(downstream.DownstreamError, match="no results_"):
        downstream.read_results(str(tmp_path / "empty"))
