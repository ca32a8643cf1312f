"""Convert a Hugging Face OPT checkpoint to per-layer files (upstream DejaVu's key names).

    python convert_opt_checkpoint.py --model-name facebook/opt-125m --save-path ../pretrained_models/opt-125m
"""

import os
import re

from dejavu_llama.checkpoint_conversion import (
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    LM_HEAD_FILE,
    ConversionError,
    TensorSource,
    base_parser,
    layer_file,
    resolve_source,
    run_converter,
    write_checkpoint,
)

LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
EMBEDDING_KEYS = ("embed_tokens.weight", "embed_positions.weight", "project_in.weight")
HEAD_KEYS = ("final_layer_norm.weight", "final_layer_norm.bias", "project_out.weight")


def decoder_key(hf_key):
    """Strip the 'model.' and 'decoder.' prefixes that OPT checkpoints carry in various forms."""
    return hf_key.removeprefix("model.").removeprefix("decoder.")


def target_of(hf_key):
    if hf_key == "lm_head.weight":
        return LM_HEAD_FILE, "lm_head.weight"
    key = decoder_key(hf_key)
    match = LAYER_KEY.match(key)
    if match:
        return layer_file(int(match.group(1))), match.group(2)
    if key in EMBEDDING_KEYS:
        return EMBEDDINGS_FILE, key
    if key in HEAD_KEYS:
        return LM_HEAD_FILE, key
    raise ConversionError(f"unrecognised OPT weight {hf_key!r}")


def conversion_plan(keys, num_layers):
    plan = {EMBEDDINGS_FILE: []}
    plan.update({layer_file(i): [] for i in range(num_layers)})
    plan[LM_HEAD_FILE] = []
    embed_key = None
    for key in sorted(keys):
        file_name, new_key = target_of(key)
        if file_name not in plan:
            raise ConversionError(f"weight {key} names a layer beyond num_hidden_layers={num_layers}")
        plan[file_name].append((key, new_key))
        if new_key == "embed_tokens.weight":
            embed_key = key
    if not any(new_key == "lm_head.weight" for _, new_key in plan[LM_HEAD_FILE]):
        if embed_key is None:
            raise ConversionError("no embed_tokens.weight found")
        plan[LM_HEAD_FILE].append((embed_key, "lm_head.weight"))  # tied
    for file_name, entries in plan.items():
        if not entries:
            raise ConversionError(f"no weights found for {file_name}")
    return plan


def main(argv=None):
    from transformers import AutoConfig, AutoTokenizer

    args = base_parser(__doc__).parse_args(argv)
    folder = resolve_source(args.model_name, args.auth_token)
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise ConversionError(f"{config_file}: not found (is --model-name an OPT checkpoint folder?)")
    config = AutoConfig.from_pretrained(folder, token=args.auth_token)
    if config.model_type != "opt":
        raise ConversionError(f"{config_file}: model_type {config.model_type!r} is not 'opt'")
    tokenizer = AutoTokenizer.from_pretrained(folder, token=args.auth_token)
    source = TensorSource(folder)
    plan = conversion_plan(source.keys(), config.num_hidden_layers)
    signature = {
        "format_version": FORMAT_VERSION,
        "family": "opt",
        "source": args.model_name,
        "dtype": args.dtype,
        "num_layers": config.num_hidden_layers,
    }
    write_checkpoint(args.save_path, signature, plan, source, (config, tokenizer), args.dtype, args.force)


def script_main():
    """The command line (also the console command)."""
    run_converter(main)


if __name__ == "__main__":
    script_main()
