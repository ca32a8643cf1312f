"""Tiny random-weight transformers models, saved and converted, for parity tests."""

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from dejavu_llama import convert_llama_checkpoint
from dejavu_llama import convert_opt_checkpoint

LLAMA_BASE = dict(
    vocab_size=256, hidden_size=48, intermediate_size=112, num_hidden_layers=3,
    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, tie_word_embeddings=False,
)

OPT_BASE = dict(
    vocab_size=256, hidden_size=48, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
    max_position_embeddings=256, word_embed_proj_dim=48, do_layer_norm_before=True,
    pad_token_id=1, bos_token_id=2, eos_token_id=2,
)


def save_tiny(model_class, config, folder, seed=0):
    """Save a random model (safetensors) and a word-level tokenizer so converters see a real folder."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Random init leaves norms at one; perturb them so a norm mix-up cannot pass.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    save_word_tokenizer(folder, config.vocab_size)
    return model


def save_word_tokenizer(folder, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "</s>": 2}
    for i in range(3, vocab_size):
        vocab[f"w{i}"] = i
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="</s>"
    )
    tokenizer.save_pretrained(folder)


def tiny_llama(tmp_path, name="llama", seed=0, **overrides):
    """(transformers model, converted checkpoint folder)."""
    config = LlamaConfig(**{**LLAMA_BASE, **overrides})
    return _tiny(LlamaForCausalLM, config, tmp_path, name, convert_llama_checkpoint, seed)


def tiny_opt(tmp_path, name="opt", seed=0, **overrides):
    config = OPTConfig(**{**OPT_BASE, **overrides})
    return _tiny(OPTForCausalLM, config, tmp_path, name, convert_opt_checkpoint, seed)


def _tiny(model_class, config, tmp_path, name, converter, seed):
    hf_folder = os.path.join(tmp_path, f"hf-{name}")
    model = save_tiny(model_class, config, hf_folder, seed=seed)
    save_path = os.path.join(tmp_path, name)
    converter.main(["--model-name", hf_folder, "--save-path", save_path])
    return model, save_path
