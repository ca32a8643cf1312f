"""--model-type -> the module file of its family and variant. Adding a family is one row here."""

import importlib
from typing import Callable, NamedTuple, Optional

MODEL_TYPES = {
    "opt": "dejavu_llama.modules.hf_opt_module",
    "llama": "dejavu_llama.modules.hf_llama_module",
    "opt-save": "dejavu_llama.modules.hf_opt_module_save",
    "llama-save": "dejavu_llama.modules.hf_llama_module_save",
    "opt-ml-att-sparse": "dejavu_llama.modules.hf_opt_sparse_mlp_attention",
    "llama-ml-att-sparse": "dejavu_llama.modules.hf_llama_sparse_mlp_attention",
}

# The dense family each type reads its config and checkpoint as.
FAMILY = {name: name.split("-")[0] for name in MODEL_TYPES}


class UnknownModelType(ValueError):
    pass


def load_model_module(model_type):
    """The module exporting GPTEmbeddings, GPTBlock and GPTLMHead for `model_type`."""
    try:
        module_name = MODEL_TYPES[model_type]
    except KeyError:
        raise UnknownModelType(
            f"unknown --model-type {model_type!r}; known: {', '.join(sorted(MODEL_TYPES))}"
        ) from None
    return importlib.import_module(module_name)


def family_of(model_type):
    load_model_module(model_type)  # validates the name
    return FAMILY[model_type]


class VariantHooks(NamedTuple):
    """What a variant module (save, sparse) may export; None where it does not."""

    add_arguments: Optional[Callable]  # (parser): its own command-line flags
    settings_from_args: Optional[Callable]  # (args, environ) -> its settings, at the command's edge
    settings_from_values: Optional[Callable]  # ({model_arg: value}) -> its settings (the lm-eval adapter)
    prepare_stage: Optional[Callable]  # (blocks, args, config) after a rank built its blocks (args.variant_settings
    #                                    holds the settings); returns an object with close(ok) or None


def variant_hooks(model_type):
    module = load_model_module(model_type)
    return VariantHooks(*(getattr(module, name, None) for name in VariantHooks._fields))
