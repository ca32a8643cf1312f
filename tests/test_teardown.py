"""scripts/teardown_llama.py: our stage-by-stage regeneration matches transformers' pipeline."""

import importlib.util
import json
import os

import pytest
import torch

from conftest import CACHE_DIR, ROOT, run_python
from tiny_models import LLAMA_BASE, save_tiny, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

SCRIPT = os.path.join(ROOT, "scripts", "teardown_llama.py")
LAYER_STAGES = {
    "normalize inputs", "queries", "keys", "values", "queries + RoPE", "keys + RoPE", "attention weights",
    "attention (heads)", "attention outputs", "attention residual", "normalize attention",
    "FFN gate", "FFN up", "FFN act(gate)*up", "FFN down", "layer output",
}


def load_script():
    spec = importlib.util.spec_from_file_location("teardown_llama", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_report(report, num_layers):
    stages = report["stages"]
    failing = [row for row in stages if not row["ok"]]
    assert not failing, failing
    assert report["ok"] and report["same_answer"]
    assert report["answer"] == report["pipeline_answer"]
    assert report["prompt_tokens"] == report["pipeline_prompt_tokens"]
    assert report["answer_tokens"] == report["pipeline_answer_tokens"]
    for row in stages:
        assert isinstance(row["max_err"], float) and row["max_err"] <= report["tolerance"], row
    for layer in range(num_layers):
        assert {row["stage"] for row in stages if row["layer"] == layer} == LAYER_STAGES
    names = {row["stage"] for row in stages}
    assert {"tokens (prompt)", "embeddings", "final norm", "logits", "logits (LocalModel.forward)"} <= names
    steps = [row for row in stages if row["stage"] == "step logits"]
    assert len(steps) == len(report["answer_tokens"]) >= 1


def test_smollm2_teardown_matches_pipeline(tmp_path):
    """The embedded SmolLM2 (GGUF reference; our side its conversion, shared with the other tests)."""
    out = tmp_path / "out.json"
    result = run_python(
        [SCRIPT, "--cache-dir", CACHE_DIR, "--json", str(out), "--max-new-tokens", "8", "--layers", "0,-1"],
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["reference"] == "gguf" and report["chat_template"]
    check_report(report, num_layers=30)
    assert report["question"] == "What is the capital of Massachusetts?"
    assert "Boston" in report["answer"]
    assert "RESULT: ok" in result.stdout and "queries + RoPE" in result.stdout


def test_bad_model_path_fails_clearly(tmp_path):
    missing = str(tmp_path / "no-such-model")
    result = run_python([SCRIPT, "--model", missing], cwd=ROOT)
    assert result.returncode == 2
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr


def test_not_a_model_folder_fails_clearly(tmp_path):
    teardown = load_script()
    assert teardown.main(["--model", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]) == 2


def test_huggingface_folder_then_detects_corrupted_conversion(tmp_path):
    """A tiny Hugging Face folder (no chat template): converted, matched; then a layer weight of the
    cached conversion is nudged and the teardown points at that layer's stage."""
    teardown = load_script()
    hf_folder = tmp_path / "hf"
    save_tiny(LlamaForCausalLM, LlamaConfig(**LLAMA_BASE), str(hf_folder))
    args = ["--model", str(hf_folder), "--cache-dir", str(tmp_path / "cache"), "--question", "w5 w6 w7 w8",
            "--max-new-tokens", "4", "--verbose"]
    out = tmp_path / "hf.json"
    assert teardown.main(args + ["--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["reference"] == "huggingface" and not report["chat_template"]
    check_report(report, num_layers=3)

    layer_file = os.path.join(report["checkpoint"], "pytorch_1.pt")
    state = torch.load(layer_file)
    state["post_attention_layernorm.weight"] = state["post_attention_layernorm.weight"] * 1.01
    torch.save(state, layer_file)
    bad = tmp_path / "bad.json"
    assert teardown.main(args + ["--json", str(bad)]) == 1
    rows = json.loads(bad.read_text())["stages"]
    first_failure = next(row for row in rows if not row["ok"])
    assert (first_failure["stage"], first_failure["layer"]) == ("normalize attention", 1)
    assert all(row["ok"] for row in rows if row["layer"] == 0)


@pytest.mark.parametrize("overrides", [dict(), dict(tie_word_embeddings=True, attention_bias=True, head_dim=16)])
def test_converted_checkpoint(tmp_path, overrides):
    """A converted checkpoint: the reference is LlamaForCausalLM rebuilt from its own files."""
    teardown = load_script()
    _, checkpoint = tiny_llama(tmp_path, **overrides)
    out = tmp_path / "out.json"
    code = teardown.main(["--model", checkpoint, "--question", "w9 w10 w11", "--max-new-tokens", "3",
                          "--json", str(out), "--verbose"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["reference"] == "converted"
    check_report(report, num_layers=3)
