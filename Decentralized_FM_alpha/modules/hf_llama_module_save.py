"""llama-save: the dense Llama modules, with blocks that record their taps to an activation dump."""

from .activation_dump import (RecordingBlockMixin, add_arguments, prepare_stage, settings_from_args,  # noqa: F401 (hooks)
                              settings_from_values)
from .hf_llama_module import LlamaBlock, LlamaEmbeddings, LlamaLMHead


class LlamaSaveBlock(RecordingBlockMixin, LlamaBlock):
    pass


GPTEmbeddings = LlamaEmbeddings
GPTBlock = LlamaSaveBlock
GPTLMHead = LlamaLMHead
