"""opt-ml-att-sparse: the dense OPT modules. The runner's prepare_stage hook (configure_sparse) puts
into each block the sparse MLP of the chosen mode and the head selection."""

from .hf_opt_module import GPTBlock, GPTEmbeddings, GPTLMHead  # noqa: F401
from .sparse_execution import add_arguments, prepare_stage, settings_from_args, settings_from_values  # noqa: F401 (hooks)
