"""llama-ml-att-sparse: the dense Llama modules, with blocks that keep only the top-K neurons and heads."""

from .hf_llama_module import LlamaBlock, LlamaEmbeddings, LlamaLMHead
from .sparse_execution import SparseBlockMixin, add_arguments, prepare_stage  # noqa: F401 (runner hooks)


class LlamaSparseBlock(SparseBlockMixin, LlamaBlock):
    pass


GPTEmbeddings = LlamaEmbeddings
GPTBlock = LlamaSparseBlock
GPTLMHead = LlamaLMHead
