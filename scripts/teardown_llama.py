#!/usr/bin/env python
"""Llama teardown: regenerate a text-generation pipeline's answer step by step, comparing every stage.

After "Transformer Teardown: Llama 3": ask transformers' `text-generation` pipeline a question,
then regenerate the same answer by hand from the project's per-layer checkpoint, one stage at a
time (tokenize, embeddings, and in every layer: normalize inputs, queries/keys/values, RoPE,
grouped-query attention, output projection, residual, normalize attention, gated FFN, residual;
then the final norm, the head and the greedy next-token choice), and compare each stage with
transformers' own intermediate tensors, captured by hooks on the reference model.

    python scripts/teardown_llama.py                          # embedded SmolLM2-135M-Instruct
    python scripts/teardown_llama.py --model pretrained_models/llama-3.2-1b --layers 0,15
    python scripts/teardown_llama.py --question "Why is the sky blue?" --json teardown.json

--model takes a converted checkpoint folder (has pytorch_embs.pt), a Hugging Face folder
(config.json + weights; converted into --cache-dir first) or a .gguf file (converted likewise).
The reference model is the Hugging Face folder or GGUF itself; for a converted checkpoint it is a
transformers LlamaForCausalLM built from the checkpoint's config with its weights mapped back.

Error per stage, per token vector (a = ours, b = transformers): err = 1 - <a, b> / |b|^2; the
table shows the mean and max of |err| over tokens and the max absolute difference. Exit status:
0 when every stage is within --tolerance and the answer text equals the pipeline's, 1 when not,
2 on a usage error (a bad --model path, a model that is not Llama-family, ...).
"""

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import warnings


if __name__ == "__main__" and "--verbose" not in sys.argv:
    # GGUF loading shows tqdm bars that transformers' switches do not reach; tqdm reads this
    # variable when first imported (by torch, just below).
    os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dejavu_common.helpers import (EMBEDDED_CHECKPOINT_NAME, EMBEDDED_GGUF, EmbeddedModelMissing,  # noqa: E402
                                   LayerSpecError, embedded_gguf, parse_layers, repo_root)

logger = logging.getLogger("teardown_llama")

DEFAULT_QUESTION = "What is the capital of Massachusetts?"
CAPTURE_ATTENTION = "teardown_capture"

# (key, label, where transformers' value comes from). The order is the order of the walk-through.
EMBEDDING_STAGES = [
    ("embeddings", "embeddings", "model.embed_tokens output"),
]
LAYER_STAGES = [
    ("normalize_inputs", "normalize inputs", "input_layernorm output"),
    ("queries", "queries", "self_attn.q_proj output"),
    ("keys", "keys", "self_attn.k_proj output"),
    ("values", "values", "self_attn.v_proj output"),
    ("queries_rope", "queries + RoPE", "query passed to the attention function (after apply_rotary_pos_emb)"),
    ("keys_rope", "keys + RoPE", "key passed to the attention function (after apply_rotary_pos_emb)"),
    ("attention_weights", "attention weights", "softmax weights returned by eager_attention_forward"),
    ("attention", "attention (heads)", "self_attn.o_proj input"),
    ("attention_outputs", "attention outputs", "self_attn.o_proj output"),
    ("attention_residual", "attention residual", "post_attention_layernorm input"),
    ("normalize_attention", "normalize attention", "post_attention_layernorm output"),
    ("gate", "FFN gate", "mlp.gate_proj output"),
    ("up", "FFN up", "mlp.up_proj output"),
    ("activation", "FFN act(gate)*up", "mlp.down_proj input"),
    ("down", "FFN down", "mlp.down_proj output"),
    ("layer_output", "layer output", "decoder layer output"),
]
HEAD_STAGES = [
    ("normalize_context", "final norm", "model.norm output"),
    ("logits", "logits", "lm_head output"),
]
# Used when the attention function cannot be swapped for the capturing one: RoPE'd q/k are then
# computed from the hooked q_proj/k_proj outputs with transformers' apply_rotary_pos_emb and the
# (cos, sin) the model's rotary_emb handed to self_attn; the attention weights are not available.
FALLBACK_SOURCES = {
    "queries_rope": "apply_rotary_pos_emb(q_proj output, rotary_emb cos/sin)",
    "keys_rope": "apply_rotary_pos_emb(k_proj output, rotary_emb cos/sin)",
}


class TeardownError(Exception):
    """An expected failure (bad arguments, unusable model): reported in one line, exit 2."""


# --------------------------------------------------------------------------------------------
# Models: ours (the project's modules) and the reference (transformers)
# --------------------------------------------------------------------------------------------


def default_gguf():
    try:
        return embedded_gguf()
    except EmbeddedModelMissing as error:
        raise TeardownError(f"{error}; or pass --model") from None


def conversion_is_current(save_path, source_folder, gguf_file):
    """True if `save_path` holds a complete conversion of this source (saves loading a GGUF again)."""
    from dejavu_llama.checkpoint_conversion import FORMAT_VERSION, MARKER_FILE

    try:
        with open(os.path.join(save_path, MARKER_FILE)) as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return False
    expected = dict(format_version=FORMAT_VERSION, family="llama", source=source_folder,
                    gguf_file=gguf_file, dtype=None)
    return all(recorded.get(k) == v for k, v in expected.items()) and all(
        os.path.isfile(os.path.join(save_path, name)) for name in recorded.get("files", [])
    )


def convert(source_folder, save_path, gguf_file=None, force=False):
    """Convert a Hugging Face folder or GGUF into the project's per-layer layout (cached)."""
    from dejavu_llama import convert_llama_checkpoint
    from dejavu_llama.checkpoint_conversion import ConversionError

    if not force and conversion_is_current(save_path, source_folder, gguf_file):
        return save_path
    argv = ["--model-name", source_folder, "--save-path", save_path]
    if gguf_file:
        argv += ["--gguf-file", gguf_file]
    if force:
        argv.append("--force")
    logger.info("converting %s into %s", os.path.join(source_folder, gguf_file or ""), save_path)
    try:
        convert_llama_checkpoint.main(argv)
    except (ConversionError, ValueError, OSError) as error:
        raise TeardownError(f"cannot convert {source_folder} into {save_path}: {error}") from error
    return save_path


def cache_folder_for(cache_dir, path):
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    name = os.path.basename(os.path.normpath(path)) or "model"
    return os.path.join(cache_dir, f"teardown-{name}-{digest}")


def resolve_model(model, cache_dir, reconvert=False):
    """A dict: checkpoint (converted folder), kind and how to load the reference."""
    if model is None:
        folder, gguf_file = default_gguf()
        checkpoint = os.path.join(cache_dir, EMBEDDED_CHECKPOINT_NAME)
        convert(folder, checkpoint, gguf_file, force=reconvert)
        return dict(kind="gguf", checkpoint=checkpoint, folder=folder, gguf_file=gguf_file,
                    name=f"{EMBEDDED_GGUF} (embedded default)")
    path = os.path.abspath(os.path.expanduser(model))
    if not os.path.exists(path):
        raise TeardownError(f"--model {model}: no such file or folder")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise TeardownError(f"--model {model}: a file, but not a .gguf; expected a checkpoint folder")
        folder, gguf_file = os.path.split(path)
        checkpoint = convert(folder, cache_folder_for(cache_dir, path), gguf_file, force=reconvert)
        return dict(kind="gguf", checkpoint=checkpoint, folder=folder, gguf_file=gguf_file, name=model)
    if os.path.isfile(os.path.join(path, "pytorch_embs.pt")):
        return dict(kind="converted", checkpoint=path, name=model)
    if os.path.isfile(os.path.join(path, "config.json")):
        checkpoint = convert(path, cache_folder_for(cache_dir, path), force=reconvert)
        return dict(kind="huggingface", checkpoint=checkpoint, folder=path, name=model)
    raise TeardownError(
        f"--model {model}: neither a converted checkpoint (no pytorch_embs.pt) "
        "nor a Hugging Face model folder (no config.json)"
    )


def hf_name_of(file_name, key):
    """The transformers LlamaForCausalLM name of `key` in converted file `file_name`."""
    if file_name == "pytorch_embs.pt":
        return f"model.{key}"
    if file_name == "pytorch_lm_head.pt":
        return "model.norm.weight" if key == "norm.weight" else key
    index = int(file_name.removeprefix("pytorch_").removesuffix(".pt"))
    if key.split(".")[0] in ("gate_proj", "up_proj", "down_proj"):
        key = f"mlp.{key}"
    return f"model.layers.{index}.{key}"


def reference_from_checkpoint(checkpoint):
    """transformers' LlamaForCausalLM with a converted checkpoint's weights, names mapped back."""
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(checkpoint)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF origin: the converted weights are plain tensors
    with no_init_weights():
        model = LlamaForCausalLM(config)
    files = ["pytorch_embs.pt"] + [f"pytorch_{i}.pt" for i in range(config.num_hidden_layers)]
    files.append("pytorch_lm_head.pt")
    state = {}
    for file_name in files:
        for key, tensor in torch.load(os.path.join(checkpoint, file_name), map_location="cpu",
                                      weights_only=True).items():
            state[hf_name_of(file_name, key)] = tensor.float()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    if tied:
        state.pop("lm_head.weight", None)  # the converter stored the embedding again
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise TeardownError(
            f"{checkpoint}: weights do not fit LlamaForCausalLM (missing {missing}, "
            f"unexpected {result.unexpected_keys})"
        )
    return model.float().eval()


def load_reference(source):
    """(transformers model, tokenizer) the pipeline runs on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source["kind"] == "gguf":
        kwargs = dict(gguf_file=source["gguf_file"])
        model = AutoModelForCausalLM.from_pretrained(source["folder"], dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source["folder"], **kwargs)
    elif source["kind"] == "huggingface":
        model = AutoModelForCausalLM.from_pretrained(source["folder"], dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source["folder"])
    else:
        model = reference_from_checkpoint(source["checkpoint"])
        tokenizer = AutoTokenizer.from_pretrained(source["checkpoint"])
    return model.eval(), tokenizer


def load_ours(checkpoint):
    """The project's parts (embeddings, blocks, head) and the checkpoint's tokenizer."""
    from dejavu_llama.modules.common import CheckpointError
    from dejavu_llama.modules.local_model import LocalModel
    from transformers import AutoConfig, AutoTokenizer

    model_type = AutoConfig.from_pretrained(checkpoint).model_type
    if model_type != "llama":
        raise TeardownError(f"{checkpoint}: model_type {model_type!r} is not a Llama-family model")
    try:
        model = LocalModel.from_checkpoint(checkpoint, "llama", dtype=torch.float32)
    except (CheckpointError, ValueError) as error:
        raise TeardownError(str(error)) from error
    return model, AutoTokenizer.from_pretrained(checkpoint)


# --------------------------------------------------------------------------------------------
# The teardown: one forward pass written out stage by stage with the project's modules' weights
# --------------------------------------------------------------------------------------------


def normalize(x, norm):
    """RMSNorm: scale each vector to unit root-mean-square, then by the learned weight."""
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return norm.weight * (x.float() * torch.rsqrt(variance + norm.eps)).to(x.dtype)


def record(trace, key, layer, value):
    if trace is not None:
        trace[(key, layer)] = value.detach().clone()


def transformer_layer(block, x, positions, cache, trace):
    """One decoder layer on x [S, D] (the new tokens) at `positions` [S]; `cache` holds (k, v)."""
    from dejavu_llama.modules.hf_llama_module import rotate_half

    layer = block.layer_index
    seq_len = x.shape[0]
    heads, kv_heads, head_dim = block.num_heads, block.num_kv_heads, block.head_dim
    attn = block.self_attn

    # Normalize inputs
    h = normalize(x, block.input_layernorm)
    record(trace, "normalize_inputs", layer, h)

    # Queries, keys, values: one projection each; keys and values have fewer (KV) heads.
    q = F.linear(h, attn.q_proj.weight, attn.q_proj.bias)
    k = F.linear(h, attn.k_proj.weight, attn.k_proj.bias)
    v = F.linear(h, attn.v_proj.weight, attn.v_proj.bias)
    record(trace, "queries", layer, q)
    record(trace, "keys", layer, k)
    record(trace, "values", layer, v)

    # Split into heads: [heads, S, head_dim]
    q = q.view(seq_len, heads, head_dim).transpose(0, 1)
    k = k.view(seq_len, kv_heads, head_dim).transpose(0, 1)
    v = v.view(seq_len, kv_heads, head_dim).transpose(0, 1)

    # RoPE: rotate each (i, i + head_dim/2) pair of q and k by its position times a frequency.
    cos, sin = block.rope(positions[None], q.dtype)  # the module's frequencies, [1, 1, S, head_dim]
    cos, sin = cos[0, 0], sin[0, 0]
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    record(trace, "queries_rope", layer, q.transpose(0, 1).reshape(seq_len, -1))
    record(trace, "keys_rope", layer, k.transpose(0, 1).reshape(seq_len, -1))

    # KV cache: the keys and values of all earlier tokens, then ours.
    if cache[layer] is not None:
        k = torch.cat((cache[layer][0], k), dim=1)
        v = torch.cat((cache[layer][1], v), dim=1)
    cache[layer] = (k, v)
    key_positions = torch.arange(k.shape[1])

    # Grouped-query attention: each KV head serves heads / kv_heads query heads.
    k = k.repeat_interleave(heads // kv_heads, dim=0)
    v = v.repeat_interleave(heads // kv_heads, dim=0)

    # Scores, causal mask (a token sees itself and earlier tokens), softmax, weighted values.
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # [heads, S, T]
    causal = key_positions[None, :] <= positions[:, None]  # [S, T]
    scores = scores.masked_fill(~causal, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    record(trace, "attention_weights", layer, weights.transpose(0, 1).reshape(seq_len, -1))
    a = (weights @ v).transpose(0, 1).reshape(seq_len, heads * head_dim)  # heads side by side
    record(trace, "attention", layer, a)

    # Output projection, residual
    a = F.linear(a, attn.o_proj.weight, attn.o_proj.bias)
    record(trace, "attention_outputs", layer, a)
    x = x + a
    record(trace, "attention_residual", layer, x)

    # Normalize attention
    h = normalize(x, block.post_attention_layernorm)
    record(trace, "normalize_attention", layer, h)

    # FFN: down(act(gate(h)) * up(h)), residual
    mlp = block.mlp
    gate = F.linear(h, mlp.gate_proj.weight, mlp.gate_proj.bias)
    up = F.linear(h, mlp.up_proj.weight, mlp.up_proj.bias)
    record(trace, "gate", layer, gate)
    record(trace, "up", layer, up)
    act = mlp.act_fn(gate) * up
    record(trace, "activation", layer, act)
    down = F.linear(act, mlp.down_proj.weight, mlp.down_proj.bias)
    record(trace, "down", layer, down)
    x = x + down
    record(trace, "layer_output", layer, x)
    return x


@torch.inference_mode()
def teardown_forward(model, token_ids, positions, cache, trace=None):
    """Logits [S, V] for token_ids [S] at positions [S]; `trace` (a dict) gets every stage."""
    # Embeddings: Llama has token embeddings only; positions enter through RoPE in attention.
    x = model.embeddings.embed_tokens.weight[token_ids]
    record(trace, "embeddings", None, x)

    # Context layers, stacked
    for block in model.blocks:
        x = transformer_layer(block, x, positions, cache, trace)

    # Head: final norm, then the output projection to vocabulary scores.
    h = normalize(x, model.head.norm)
    record(trace, "normalize_context", None, h)
    logits = F.linear(h, model.head.lm_head.weight, getattr(model.head.lm_head, "bias", None))
    record(trace, "logits", None, logits)
    return logits


def regenerate(model, prompt_ids, max_new_tokens, eos_ids):
    """Greedy generation with the teardown forward: (new ids, per-step logits, prompt trace)."""
    cache = [None] * len(model.blocks)
    trace = {}
    positions = torch.arange(len(prompt_ids))
    logits = teardown_forward(model, torch.tensor(prompt_ids), positions, cache, trace)[-1]
    new_ids, step_logits = [], []
    while True:
        step_logits.append(logits)
        token = int(logits.argmax())  # next-token choice: greedy
        new_ids.append(token)
        if token in eos_ids or len(new_ids) >= max_new_tokens:
            return new_ids, step_logits, trace
        position = len(prompt_ids) + len(new_ids) - 1
        logits = teardown_forward(model, torch.tensor([token]), torch.tensor([position]), cache)[-1]


# --------------------------------------------------------------------------------------------
# Reference: the pipeline's answer, and transformers' intermediate tensors on the prompt
# --------------------------------------------------------------------------------------------


def prompt_input(tokenizer, question, use_chat_template):
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return [{"role": "user", "content": question}], True
    return question, False


def tokenize(tokenizer, question, chat):
    """The prompt's token ids, as the text-generation pipeline builds them."""
    if chat:
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=True
        )
        ids = encoded["input_ids"]
    else:
        ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def run_pipeline(model, tokenizer, question, chat, max_new_tokens):
    """(answer text, prompt ids the model saw, new ids, last-position logits of every step)."""
    from transformers import pipeline

    calls, step_logits = [], []

    def see_inputs(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(ids[0].tolist())

    def see_logits(module, args, output):
        step_logits.append(output[0, -1].detach().clone())

    handles = [
        model.register_forward_pre_hook(see_inputs, with_kwargs=True),
        model.lm_head.register_forward_hook(see_logits),
    ]
    try:
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
        prompt = [{"role": "user", "content": question}] if chat else question
        result = generator(prompt, max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
    finally:
        for handle in handles:
            handle.remove()
    answer = result[0]["generated_text"]
    new_ids = [call[-1] for call in calls[1:]] + [int(step_logits[-1].argmax())]
    return answer, calls[0], new_ids, step_logits


def capture_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' eager attention, recording the RoPE'd query/key and the softmax weights."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    output, weights = eager_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )
    records = getattr(capture_attention, "records", None)
    if records is not None:
        layer, seq_len = module.layer_idx, query.shape[2]
        records[("queries_rope", layer)] = query[0].transpose(0, 1).reshape(seq_len, -1).clone()
        records[("keys_rope", layer)] = key[0].transpose(0, 1).reshape(seq_len, -1).clone()
        records[("attention_weights", layer)] = weights[0].transpose(0, 1).reshape(seq_len, -1).clone()
    return output, weights


@contextlib.contextmanager
def capturing_attention(model):
    """Swap the model's attention function for `capture_attention`; yields False if impossible."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    original = model.config._attn_implementation
    try:
        AttentionInterface.register(CAPTURE_ATTENTION, capture_attention)
        AttentionMaskInterface.register(CAPTURE_ATTENTION, eager_mask)
        model.set_attn_implementation(CAPTURE_ATTENTION)
        swapped = model.config._attn_implementation == CAPTURE_ATTENTION
    except Exception as error:  # an older/newer transformers without this interface
        logger.warning("cannot swap the attention function (%s); RoPE'd q/k computed from hooks", error)
        swapped = False
    try:
        yield swapped
    finally:
        if swapped:
            model.set_attn_implementation(original)


@torch.inference_mode()
def reference_trace(model, prompt_ids):
    """{(stage, layer): tensor [tokens, features]} from hooks on transformers' modules."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    records = {}
    handles = []
    position_embeddings = {}

    def hook(module, key, layer, take="output"):
        def save(mod, args, output):
            value = args[0] if take == "input" else (output[0] if isinstance(output, tuple) else output)
            records[(key, layer)] = value[0].detach().clone()  # drop the batch dimension

        handles.append(module.register_forward_hook(save))

    base = model.model
    hook(base.embed_tokens, "embeddings", None)
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        hook(layer.input_layernorm, "normalize_inputs", i)
        hook(attn.q_proj, "queries", i)
        hook(attn.k_proj, "keys", i)
        hook(attn.v_proj, "values", i)
        hook(attn.o_proj, "attention", i, take="input")
        hook(attn.o_proj, "attention_outputs", i)
        hook(layer.post_attention_layernorm, "attention_residual", i, take="input")
        hook(layer.post_attention_layernorm, "normalize_attention", i)
        hook(mlp.gate_proj, "gate", i)
        hook(mlp.up_proj, "up", i)
        hook(mlp.down_proj, "activation", i, take="input")
        hook(mlp.down_proj, "down", i)
        hook(layer, "layer_output", i)

        def keep_rope(mod, args, kwargs, i=i):
            position_embeddings[i] = kwargs.get("position_embeddings")

        handles.append(attn.register_forward_pre_hook(keep_rope, with_kwargs=True))
    hook(base.norm, "normalize_context", None)
    hook(model.lm_head, "logits", None)

    sources = {}
    try:
        with capturing_attention(model) as swapped:
            capture_attention.records = records if swapped else None
            model(input_ids=torch.tensor([prompt_ids]), use_cache=False)
    finally:
        capture_attention.records = None
        for handle in handles:
            handle.remove()
    if not swapped:
        for i, layer in enumerate(base.layers):
            attn, seq_len = layer.self_attn, len(prompt_ids)
            q = records[("queries", i)].view(1, seq_len, -1, attn.head_dim).transpose(1, 2)
            k = records[("keys", i)].view(1, seq_len, -1, attn.head_dim).transpose(1, 2)
            cos, sin = position_embeddings[i]
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            records[("queries_rope", i)] = q[0].transpose(0, 1).reshape(seq_len, -1)
            records[("keys_rope", i)] = k[0].transpose(0, 1).reshape(seq_len, -1)
        sources.update(FALLBACK_SOURCES)
    return records, sources


# --------------------------------------------------------------------------------------------
# Comparison and report
# --------------------------------------------------------------------------------------------


def compare(ours, reference):
    """Per token vector err = 1 - <a,b>/|b|^2 (a ours, b reference): mean |err|, max |err|, max abs."""
    a = ours.detach().double().reshape(-1, ours.shape[-1])
    b = reference.detach().double().reshape(-1, reference.shape[-1])
    if a.shape != b.shape:
        raise TeardownError(f"shape mismatch: ours {tuple(ours.shape)}, reference {tuple(reference.shape)}")
    dot = (a * b).sum(-1)
    norm2 = (b * b).sum(-1)
    err = torch.where(norm2 > 0, 1.0 - dot / norm2.clamp_min(1e-300), (a.abs().amax(-1) > 0).double())
    err = err.abs()
    return float(err.mean()), float(err.max()), float((a - b).abs().max())


def make_row(stage, layer, step, mean_err, max_err, max_abs, tolerance, source, note=""):
    ok = math.isfinite(max_err) and max_err <= tolerance
    return dict(stage=stage, layer=layer, step=step, mean_err=mean_err, max_err=max_err,
                max_abs=max_abs, ok=ok, reference=source, note=note)


def token_row(stage, ours, theirs, step, tokenizer, source):
    same = ours == theirs
    if isinstance(ours, int):
        note = f"{tokenizer.decode([ours])!r}" + (" = pipeline" if same else f" != pipeline {tokenizer.decode([theirs])!r}")
    else:
        differing = sum(x != y for x, y in zip(ours, theirs)) + abs(len(ours) - len(theirs))
        note = f"{len(ours)} ids" + ("" if same else f", {differing} differ from the pipeline's {len(theirs)}")
    value = 0.0 if same else 1.0
    return dict(stage=stage, layer=None, step=step, mean_err=value, max_err=value, max_abs=value,
                ok=same, reference=source, note=note)


def build_rows(our_trace, ref_trace, sources, model, prompt_ids, tolerance):
    rows = []
    num_layers = len(model.blocks)
    plan = [(key, label, src, None) for key, label, src in EMBEDDING_STAGES]
    for layer in range(num_layers):
        plan += [(key, label, src, layer) for key, label, src in LAYER_STAGES]
    plan += [(key, label, src, None) for key, label, src in HEAD_STAGES]
    for key, label, source, layer in plan:
        if (key, layer) not in ref_trace:
            continue  # attention weights without the capturing attention function
        stats = compare(our_trace[(key, layer)], ref_trace[(key, layer)])
        rows.append(make_row(label, layer, 0, *stats, tolerance, sources.get(key, source)))
    # The project's own forward (LocalModel: embeddings, LlamaBlock.forward, head) on the prompt.
    module_logits, _ = model(torch.tensor([prompt_ids]))
    stats = compare(module_logits[0], ref_trace[("logits", None)])
    rows.append(make_row("logits (LocalModel.forward)", None, 0, *stats, tolerance, "lm_head output"))
    return rows


def shown_layers_of(spec, num_layers):
    """--layers: 'none', or a layer spec of dejavu_common.helpers.parse_layers ('all', '0,5,28-29', '-1')."""
    if spec == "none":
        return set()
    try:
        return set(parse_layers(spec, num_layers, "--layers"))
    except LayerSpecError as error:
        raise TeardownError(str(error)) from None


def format_number(value):
    return f"{value:.2e}" if value else "0"


def print_table(rows, shown_layers, out=sys.stdout):
    header = f"{'stage':<28} {'layer':>5} {'step':>4} {'mean err':>9} {'max err':>9} {'max abs':>9}  ok"
    print(header, file=out)
    print("-" * len(header), file=out)
    hidden = 0
    for row in rows:
        if row["layer"] is not None and row["layer"] not in shown_layers and row["ok"]:
            hidden += 1
            continue
        layer = "-" if row["layer"] is None else str(row["layer"])
        flag = "ok" if row["ok"] else "FAIL"
        line = (f"{row['stage']:<28} {layer:>5} {row['step']:>4} {format_number(row['mean_err']):>9} "
                f"{format_number(row['max_err']):>9} {format_number(row['max_abs']):>9}  {flag}")
        if row["note"]:
            line += f"  {row['note']}"
        print(line, file=out)
    if hidden:
        print(f"({hidden} rows of layers outside --layers not shown; all within tolerance)", file=out)


def finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="converted checkpoint folder, Hugging Face folder or .gguf file "
                             "(default: the embedded SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--cache-dir", default=os.environ.get("DEJAVU_TEARDOWN_CACHE",
                                                              os.path.join(repo_root(), "pretrained_models")),
                        help="where conversions are kept (default: %(default)s)")
    parser.add_argument("--reconvert", action="store_true",
                        help="redo the conversion of a Hugging Face folder or GGUF even if cached")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="default: %(default)r")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="default: %(default)s")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="send the question as plain text even when the tokenizer has a chat template")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest allowed |1 - <a,b>/|b|^2| of any token at any stage (default: %(default)s)")
    parser.add_argument("--layers", default="all",
                        help="layers whose rows are printed: 'all', 'none' or e.g. 0,5,28-29 "
                             "(every layer is still compared; failures are always printed)")
    parser.add_argument("--json", default=None, help="write the table, question, answers and tokens here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--verbose", action="store_true", help="also show transformers' own log messages")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not args.tolerance >= 0:
        parser.error("--tolerance must be >= 0")
    return args


def quiet_transformers(verbose):
    import transformers

    if not verbose:
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        warnings.filterwarnings("ignore")


def eos_ids_of(model, ours):
    ids = set()
    for value in (getattr(ours.config, "eos_token_id", None), model.generation_config.eos_token_id):
        if value is None:
            continue
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return ids


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers(args.verbose)

    source = resolve_model(args.model, os.path.abspath(args.cache_dir), args.reconvert)
    logger.info("model: %s; our checkpoint: %s", source["name"], source["checkpoint"])
    ours, tokenizer = load_ours(source["checkpoint"])
    reference, ref_tokenizer = load_reference(source)
    shown_layers = shown_layers_of(args.layers, len(ours.blocks))

    # 1. The off-the-shelf pipeline's answer
    _, chat = prompt_input(ref_tokenizer, args.question, not args.no_chat_template)
    logger.info("asking the text-generation pipeline%s: %r", " (chat template)" if chat else "", args.question)
    answer_ref, prompt_ref, new_ref, logits_ref = run_pipeline(
        reference, ref_tokenizer, args.question, chat, args.max_new_tokens
    )

    # 2. Tokenize (with the checkpoint's tokenizer), then regenerate the answer stage by stage
    prompt_ids = tokenize(tokenizer, args.question, chat)
    eos_ids = eos_ids_of(reference, ours)
    new_ids, step_logits, our_trace = regenerate(ours, prompt_ids, args.max_new_tokens, eos_ids)
    answer = tokenizer.decode(new_ids, skip_special_tokens=True)

    # 3. Compare: the prompt stage by stage, then every generation step's logits and token
    ref_trace, sources = reference_trace(reference, prompt_ids)
    rows = [token_row("tokens (prompt)", prompt_ids, prompt_ref, 0, tokenizer,
                      "input_ids the pipeline gave the model")]
    rows += build_rows(our_trace, ref_trace, sources, ours, prompt_ids, args.tolerance)
    for step in range(max(len(new_ids), len(new_ref))):
        if step < len(new_ids) and step < len(new_ref):
            stats = compare(step_logits[step], logits_ref[step])
            rows.append(make_row("step logits", None, step, *stats, args.tolerance,
                                 "lm_head output during the pipeline's generate"))
            rows.append(token_row("step token", new_ids[step], new_ref[step], step, tokenizer,
                                  "token the pipeline generated"))
        else:
            who = "ours" if step < len(new_ids) else "the pipeline"
            rows.append(dict(stage="step token", layer=None, step=step, mean_err=1.0, max_err=1.0, max_abs=1.0,
                             ok=False, reference="token the pipeline generated",
                             note=f"only {who} generated a token here"))

    same_answer = answer == answer_ref
    failures = [row for row in rows if not row["ok"]]
    ok = same_answer and not failures
    if args.json:
        report = dict(
            ok=ok, question=args.question, model=source["name"], checkpoint=source["checkpoint"],
            reference=source["kind"], chat_template=chat, tolerance=args.tolerance,
            max_new_tokens=args.max_new_tokens, pipeline_answer=answer_ref, answer=answer,
            same_answer=same_answer, prompt_tokens=prompt_ids,
            prompt_token_strings=[tokenizer.decode([i]) for i in prompt_ids],
            pipeline_prompt_tokens=prompt_ref, answer_tokens=new_ids, pipeline_answer_tokens=new_ref,
            eos_token_ids=sorted(eos_ids),
            stages=[{k: finite(v) for k, v in row.items()} for row in rows],
        )
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
        logger.info("wrote %s", args.json)
    print(f"question:        {args.question!r}")
    print(f"pipeline answer: {answer_ref!r}")
    print(f"our answer:      {answer!r}  ({'same' if same_answer else 'DIFFERENT'})")
    print(f"prompt tokens:   {len(prompt_ids)}; new tokens: {len(new_ids)}; tolerance {args.tolerance:g}")
    if sources:
        print("note: " + "; ".join(f"{k}: {v}" for k, v in sources.items()))
    print()
    print_table(rows, shown_layers)
    print()
    worst = max((row for row in rows if row["stage"] not in ("tokens (prompt)", "step token")),
                key=lambda row: row["max_err"])
    print(f"worst stage: {worst['stage']} (layer {worst['layer']}, step {worst['step']}): "
          f"max err {worst['max_err']:.2e}")
    print("RESULT: " + ("ok" if ok else f"FAIL ({len(failures)} stage(s) off"
                                        f"{'' if same_answer else ', answer differs'})"))
    if not ok and source["kind"] != "converted":
        print(f"(our side is the cached conversion {source['checkpoint']}; "
              "if the source changed since, rerun with --reconvert)")

    return 0 if ok else 1


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        return run(args)
    except TeardownError as error:
        logger.error("%s", error)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    from dejavu_llama.modules.decode.environment import apply_environment

    apply_environment(os.environ)  # DEJAVU_CPU_KERNELS, DEJAVU_HUGE_PAGES, ...: read at the command's edge
    sys.exit(main())
