"""--model-type -> the module file of its family and variant. Adding a family is one row here."""

import importlib

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


# Variant modules (save, sparse) may export two optional hooks, which the runner calls:
#   add_arguments(parser)                    their own command-line flags
#   prepare_stage(blocks, args, config)      after a rank built its blocks; returns an object
#                                            with close(ok) (called at the end, ok=False on
#                                            error) or None
def variant_hooks(model_type):
    module = load_model_module(model_type)
    return getattr(module, "add_arguments", None), getattr(module, "prepare_stage", None)
