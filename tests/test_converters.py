"""Converter behaviour: output layout, atomicity, refusal to overwrite, clear failures."""

import json
import os

import torch

from conftest import run_python
from tiny_models import LLAMA_BASE, save_tiny, tiny_llama, tiny_opt
from transformers import LlamaConfig, LlamaForCausalLM


def test_llama_layout(tmp_path):
    _, checkpoint = tiny_llama(tmp_path)
    files = set(os.listdir(checkpoint))
    assert {"config.json", "pytorch_embs.pt", "pytorch_lm_head.pt", "conversion.json", "tokenizer.json"} <= files
    assert {f"pytorch_{i}.pt" for i in range(3)} <= files
    layer = torch.load(os.path.join(checkpoint, "pytorch_0.pt"))
    assert set(layer) == {
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "gate_proj.weight", "up_proj.weight", "down_proj.weight",
        "input_layernorm.weight", "post_attention_layernorm.weight",
    }
    assert set(torch.load(os.path.join(checkpoint, "pytorch_lm_head.pt"))) == {"norm.weight", "lm_head.weight"}
    assert set(torch.load(os.path.join(checkpoint, "pytorch_embs.pt"))) == {"embed_tokens.weight"}


def test_opt_layout_post_ln(tmp_path):
    _, checkpoint = tiny_opt(tmp_path, do_layer_norm_before=False, word_embed_proj_dim=32)
    assert set(torch.load(os.path.join(checkpoint, "pytorch_embs.pt"))) == {
        "embed_tokens.weight", "embed_positions.weight", "project_in.weight"
    }
    assert set(torch.load(os.path.join(checkpoint, "pytorch_lm_head.pt"))) == {"project_out.weight", "lm_head.weight"}


def test_nonexistent_model_path_fails_clearly(tmp_path):
    missing = str(tmp_path / "no-such-model")
    result = run_python(["convert_llama_checkpoint.py", "--model-name", missing, "--save-path", str(tmp_path / "out")])
    assert result.returncode != 0
    assert "no-such-model" in result.stderr and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out")


def test_existing_different_checkpoint_needs_force(tmp_path):
    _, checkpoint = tiny_llama(tmp_path, name="a")
    hf_b = tmp_path / "hf-b"
    save_tiny(LlamaForCausalLM, LlamaConfig(**LLAMA_BASE), str(hf_b), seed=5)
    args = ["convert_llama_checkpoint.py", "--model-name", str(hf_b), "--save-path", checkpoint]
    refused = run_python(args)
    assert refused.returncode != 0 and "--force" in refused.stderr
    assert json.load(open(os.path.join(checkpoint, "conversion.json")))["source"] != str(hf_b)
    assert run_python(args + ["--force"]).returncode == 0
    assert json.load(open(os.path.join(checkpoint, "conversion.json")))["source"] == str(hf_b)


def test_unknown_dtype_fails_and_writes_nothing(tmp_path):
    hf_folder = tmp_path / "hf"
    save_tiny(LlamaForCausalLM, LlamaConfig(**LLAMA_BASE), str(hf_folder))
    out = tmp_path / "out"
    result = run_python(["convert_llama_checkpoint.py", "--model-name", str(hf_folder), "--save-path", str(out),
                         "--dtype", "float17"])
    assert result.returncode != 0 and "float17" in result.stderr
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if "partial" in p]


def test_wrong_family_is_refused(tmp_path):
    _, _ = tiny_opt(tmp_path)
    result = run_python(["convert_llama_checkpoint.py", "--model-name", str(tmp_path / "hf-opt"),
                         "--save-path", str(tmp_path / "x")])
    assert result.returncode != 0 and "'opt'" in result.stderr


def test_fp16_conversion(tmp_path):
    hf_folder = tmp_path / "hf"
    save_tiny(LlamaForCausalLM, LlamaConfig(**LLAMA_BASE), str(hf_folder))
    out = tmp_path / "out"
    run_python(["convert_llama_checkpoint.py", "--model-name", str(hf_folder), "--save-path", str(out),
                "--dtype", "fp16"], check=True)
    assert torch.load(out / "pytorch_0.pt")["gate_proj.weight"].dtype == torch.float16
