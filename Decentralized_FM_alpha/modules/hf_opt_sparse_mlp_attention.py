"""opt-ml-att-sparse: the dense OPT modules, with blocks that keep only the top-K neurons and heads."""

from .hf_opt_module import OPTBlock, OPTEmbeddings, OPTLMHead
from .sparse_execution import SparseBlockMixin, add_arguments, prepare_stage  # noqa: F401 (runner hooks)


class OPTSparseBlock(SparseBlockMixin, OPTBlock):
    pass


GPTEmbeddings = OPTEmbeddings
GPTBlock = OPTSparseBlock
GPTLMHead = OPTLMHead
