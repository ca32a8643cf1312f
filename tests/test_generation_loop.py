"""The one generation loop (modules/decode/generation.py): LocalModel.generate_greedy, the
lm-eval adapter's generate_tokens and the pipeline engine's token phase all decode through it;
the adapter gives the same tokens through the static-cache stage (the cuda backend's, eager on
the CPU) as through the growing cache; left padding gives each row its tokens alone.
"""

import os

import pytest
import torch

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

from dejavu_llama.comm.comm_utils import LocalCommunicator  # noqa: E402
from dejavu_llama.modules.decode import DynamicCacheStage, StaticCacheStage, generation  # noqa: E402
from dejavu_llama.modules.lm_eval_adapter import DejaVuLM, ModelArgsError  # noqa: E402
from dejavu_llama.modules.local_model import LocalModel  # noqa: E402
from dejavu_llama.pipeline_parallel.dist_pipeline_inference_mask_greedy_token_pipe_sync import (  # noqa: E402
    DistInferenceMaskTokenPipeSync,
)
from tiny_models import tiny_llama, tiny_opt  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]  # different lengths: rows 1, 2 padded
PAD_ID = 1  # the tiny tokenizer's <pad>
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "logprobs": 0, "echo": False}


@pytest.fixture(scope="module", params=["llama", "opt"])
def family_checkpoint(request, tmp_path_factory):
    build = tiny_llama if request.param == "llama" else tiny_opt
    return request.param, build(tmp_path_factory.mktemp(request.param))[1]


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama"))[1]


@pytest.fixture
def decode_steps(monkeypatch):
    """The stages generation.decode_step ran, in call order (the function patched to record them)."""
    stages = []
    decode_step = generation.decode_step

    def recording(stage, *args, **kwargs):
        stages.append(stage)
        return decode_step(stage, *args, **kwargs)

    monkeypatch.setattr(generation, "decode_step", recording)
    return stages


@pytest.fixture
def padded_batches(monkeypatch):
    """The row lists generation.left_pad padded, in call order."""
    batches = []
    left_pad = generation.left_pad

    def recording(rows, *args, **kwargs):
        batches.append([list(row) for row in rows])
        return left_pad(rows, *args, **kwargs)

    monkeypatch.setattr(generation, "left_pad", recording)
    return batches


def alone(model, prompt, new_tokens, backend):
    """A row's greedy tokens generated on its own (no padding): a list of ints."""
    return model.generate_greedy(torch.tensor([prompt]), new_tokens, backend=backend)[0].tolist()


def test_left_pad():
    ids, mask = generation.left_pad([[5, 6, 7], [8]], pad_id=PAD_ID)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]] and mask.dtype == torch.long
    ids, mask = generation.left_pad([[5, 6], [7, 8]], pad_id=PAD_ID)
    assert ids.tolist() == [[5, 6], [7, 8]] and mask is None
    assert generation.left_pad([[5, 6]], always_mask=True)[1].tolist() == [[1, 1]]


def test_generate_greedy_adapter_and_engine_decode_through_the_shared_step(llama_checkpoint, decode_steps,
                                                                           padded_batches):
    model = LocalModel.from_checkpoint(llama_checkpoint, "llama", backend="torch")
    input_ids, mask = generation.left_pad(PROMPTS, PAD_ID)
    tokens, logprobs = model.generate_greedy(input_ids, 4, mask=mask, backend="torch", with_logprobs=True)
    assert tokens.shape == logprobs.shape == (3, 4)
    assert len(decode_steps) == 3  # the first token comes from the prompt
    assert all(isinstance(stage, DynamicCacheStage) for stage in decode_steps)

    # the one-stage engine: two micro-batches, each through the shared step per new token
    decode_steps.clear()
    padded_batches.clear()
    engine = DistInferenceMaskTokenPipeSync(LocalCommunicator(), 0, 1, model.embeddings, model.blocks, model.head,
                                            model.config.hidden_size, "cpu", torch.float32, micro_batch_size=2,
                                            decode_backend="torch")
    outputs = engine.inference_batch(PROMPTS, 4, [dict(GREEDY) for _ in PROMPTS])
    assert padded_batches == [PROMPTS[:2], PROMPTS[2:]]
    assert len(decode_steps) == 3 * 2
    # its tokens and logprobs are the local loop's
    assert [output["generated"] for output in outputs] == tokens.tolist()
    assert torch.allclose(torch.tensor([output["generated_logprobs"] for output in outputs]), logprobs, atol=1e-5)

    decode_steps.clear()
    padded_batches.clear()
    lm = DejaVuLM(checkpoint=llama_checkpoint, batch_size=3)
    lm.decode_backend = "torch"
    lm.generate_tokens(PROMPTS, 4)
    assert padded_batches == [PROMPTS]
    assert decode_steps and all(isinstance(stage, DynamicCacheStage) for stage in decode_steps)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_left_padding_gives_each_row_its_tokens_alone(family_checkpoint, backend):
    family, checkpoint = family_checkpoint
    model = LocalModel.from_checkpoint(checkpoint, family, backend=backend)
    input_ids, mask = generation.left_pad(PROMPTS, PAD_ID)
    batch = model.generate_greedy(input_ids, 6, mask=mask, backend=backend).tolist()
    assert batch == [alone(model, prompt, 6, backend) for prompt in PROMPTS]


def expected_generation(reference, eot, stops, decode):
    """What generate_tokens returns for a row whose uncut greedy tokens are `reference`: cut
    before the end-of-text token, or after the token that completes a stop string."""
    kept = []
    for token in reference:
        if token == eot:
            break
        kept.append(token)
        if any(stop in decode(kept) for stop in stops):
            break
    return kept


def test_the_adapter_decodes_through_the_static_cache_as_through_the_growing_cache(family_checkpoint,
                                                                                   decode_steps, monkeypatch):
    family, checkpoint = family_checkpoint
    lm = DejaVuLM(checkpoint=checkpoint, model_type=family, batch_size=3)
    references = [alone(lm.model, prompt, 8, "torch") for prompt in PROMPTS]
    # an end-of-text token that ends row 1 early, a stop string that ends row 0 early
    eot = references[1][3]
    monkeypatch.setattr(DejaVuLM, "eot_token_id", property(lambda self: eot))
    stops = [lm.tok_decode([references[0][2]], skip_special_tokens=False)]

    def decode(tokens):
        return lm.tok_decode(tokens, skip_special_tokens=False)

    runs = {}
    for backend, stage_type in (("torch", DynamicCacheStage), ("cuda", StaticCacheStage)):
        lm.decode_backend = backend
        decode_steps.clear()
        runs[backend, "stop string"] = lm.generate_tokens(PROMPTS, 8, until=stops)
        runs[backend, "no stop string"] = lm.generate_tokens(PROMPTS, 8)
        assert decode_steps and all(type(stage) is stage_type for stage in decode_steps), backend
        lm.generator.manual_seed(7)
        runs[backend, "sampled"] = lm.generate_tokens(PROMPTS, 8, do_sample=True, temperature=0.8)
    assert runs["torch", "stop string"] == [expected_generation(row, eot, stops, decode) for row in references]
    assert runs["torch", "no stop string"] == [expected_generation(row, eot, [], decode) for row in references]
    assert len(runs["torch", "stop string"][0]) <= 3 and len(runs["torch", "stop string"][1]) <= 3
    for kind in ("stop string", "no stop string", "sampled"):
        assert runs["cuda", kind] == runs["torch", kind], kind


def test_a_bad_dtype_model_arg_is_named(llama_checkpoint):
    with pytest.raises(ModelArgsError, match="dtype 'float8'.*bfloat16"):
        DejaVuLM(checkpoint=llama_checkpoint, dtype="float8")
