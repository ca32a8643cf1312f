"""opt-save: the dense OPT modules, with blocks that record their taps to an activation dump."""

from .activation_dump import (RecordingBlockMixin, add_arguments, prepare_stage, settings_from_args,  # noqa: F401 (hooks)
                              settings_from_values)
from .hf_opt_module import OPTBlock, OPTEmbeddings, OPTLMHead


class OPTSaveBlock(RecordingBlockMixin, OPTBlock):
    pass


GPTEmbeddings = OPTEmbeddings
GPTBlock = OPTSaveBlock
GPTLMHead = OPTLMHead
