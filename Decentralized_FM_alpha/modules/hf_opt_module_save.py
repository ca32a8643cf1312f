"""opt-save: the dense OPT modules, with blocks that record their taps to an activation dump."""

from .activation_dump import RecordingBlockMixin, add_arguments, prepare_stage  # noqa: F401 (runner hooks)
from .hf_opt_module import OPTBlock, OPTEmbeddings, OPTLMHead


class OPTSaveBlock(RecordingBlockMixin, OPTBlock):
    pass


GPTEmbeddings = OPTEmbeddings
GPTBlock = OPTSaveBlock
GPTLMHead = OPTLMHead
