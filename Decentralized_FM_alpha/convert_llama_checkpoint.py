"""Convert a Hugging Face Llama-family checkpoint (safetensors, .bin or GGUF) to per-layer files.

    python convert_llama_checkpoint.py --model-name meta-llama/Llama-3.2-3B \
        --save-path ../pretrained_models/llama-3.2-3b --auth-token $HF_TOKEN

With --gguf-file and --gguf-out OUT, the GGUF is also written again as OUT with its weight
matrices in --gguf-type (f32, f16, bf16; gguf_precision.py): the same weights for llama.cpp.
"""

import logging
import os
import re

import torch

from dejavu_llama.checkpoint_conversion import (
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    LM_HEAD_FILE,
    ConversionError,
    TensorSource,
    base_parser,
    existing_checkpoint_state,
    layer_file,
    resolve_source,
    run_converter,
    write_checkpoint,
)

from dejavu_llama.gguf_precision import GGUF_TYPES, GGUFPrecisionError, write_gguf

logger = logging.getLogger(__name__)

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def target_of(hf_key):
    """(file, key) of a transformers LlamaForCausalLM parameter name, or None to skip it."""
    match = LAYER_KEY.match(hf_key)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        if rest.endswith("rotary_emb.inv_freq"):
            return None  # a buffer some old checkpoints saved; recomputed from the config
        return layer_file(index), rest.removeprefix("mlp.")
    if hf_key == "model.embed_tokens.weight":
        return EMBEDDINGS_FILE, "embed_tokens.weight"
    if hf_key == "model.norm.weight":
        return LM_HEAD_FILE, "norm.weight"
    if hf_key == "lm_head.weight":
        return LM_HEAD_FILE, "lm_head.weight"
    raise ConversionError(f"unrecognised Llama weight {hf_key!r}")


def conversion_plan(keys, num_layers):
    plan = {EMBEDDINGS_FILE: []}
    plan.update({layer_file(i): [] for i in range(num_layers)})
    plan[LM_HEAD_FILE] = []
    for key in sorted(keys):
        target = target_of(key)
        if target is None:
            continue
        file_name, new_key = target
        if file_name not in plan:
            raise ConversionError(f"weight {key} names a layer beyond num_hidden_layers={num_layers}")
        plan[file_name].append((key, new_key))
    if not any(new_key == "lm_head.weight" for _, new_key in plan[LM_HEAD_FILE]):
        # Tied embeddings: the head is the embedding matrix.
        plan[LM_HEAD_FILE].append(("model.embed_tokens.weight", "lm_head.weight"))
    for file_name, entries in plan.items():
        if not entries:
            raise ConversionError(f"no weights found for {file_name}")
    return plan


def load_gguf(folder, gguf_file, auth_token):
    """Dequantise a GGUF model through transformers (whole model in memory)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(folder, gguf_file)
    if not os.path.isfile(path):
        raise ConversionError(f"--gguf-file {gguf_file}: not found in {folder}")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32, token=auth_token)
    if model.config.model_type != "llama":
        raise ConversionError(f"{path}: model type {model.config.model_type!r} is not a Llama model")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, token=auth_token)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return model.config, tokenizer, TensorSource.from_state_dict(state, path)


def load_folder(folder, auth_token):
    from transformers import AutoConfig, AutoTokenizer

    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"{config_file}: not found (is --model-name a Llama checkpoint folder?)")
    config = AutoConfig.from_pretrained(folder, token=auth_token)
    if config.model_type != "llama":
        raise ConversionError(f"{config_file}: model_type {config.model_type!r} is not 'llama'")
    tokenizer = AutoTokenizer.from_pretrained(folder, token=auth_token)
    return config, tokenizer, TensorSource(folder)


def main(argv=None):
    parser = base_parser(__doc__, with_gguf=True)
    parser.add_argument("--gguf-out", default=None,
                        help="also write --gguf-file again here, its weight matrices in --gguf-type (for llama.cpp)")
    parser.add_argument("--gguf-type", default="f16", choices=sorted(GGUF_TYPES),
                        help="the weight matrices' type in --gguf-out")
    args = parser.parse_args(argv)
    if args.gguf_out and not args.gguf_file:
        parser.error("--gguf-out writes a GGUF file again: give the source with --gguf-file")
    folder = resolve_source(args.model_name, args.auth_token)
    if args.gguf_out:
        try:
            write_gguf(os.path.join(folder, args.gguf_file), args.gguf_out, args.gguf_type)
        except GGUFPrecisionError as error:
            raise ConversionError(str(error)) from None
    settings = {"format_version": FORMAT_VERSION, "family": "llama", "source": args.model_name,
                "gguf_file": args.gguf_file, "dtype": args.dtype}
    if args.gguf_file and not args.force and existing_checkpoint_state(args.save_path, settings) == "same":
        # De-quantizing a GGUF takes a while; the marker already says this exact conversion is done.
        logger.info("%s already holds this conversion; nothing to do (--force redoes it)", args.save_path)
        return
    if args.gguf_file:
        config, tokenizer, source = load_gguf(folder, args.gguf_file, args.auth_token)
    else:
        config, tokenizer, source = load_folder(folder, args.auth_token)
    plan = conversion_plan(source.keys(), config.num_hidden_layers)
    signature = {**settings, "num_layers": config.num_hidden_layers}
    write_checkpoint(args.save_path, signature, plan, source, (config, tokenizer), args.dtype, args.force)


def script_main():
    """The command line (also the console command)."""
    run_converter(main)


if __name__ == "__main__":
    script_main()
