"""rlhf-data: canonical records, the built-in demo task, tokenization and collators."""

from ._version import __version__
from .collate import IGNORE_INDEX, collate_pairs, collate_prompts, collate_sft
from .demo import AdditionTask, AdditionTaskConfig
from .records import ChatRecord, PreferenceRecord, PromptRecord, SFTRecord
from .tokenization import (
    TokenizeConfig,
    encode_pair,
    encode_prompt,
    encode_response,
    render_prompt,
    render_response,
    train_demo_tokenizer,
)

__all__ = [
    "IGNORE_INDEX",
    "AdditionTask",
    "AdditionTaskConfig",
    "ChatRecord",
    "PreferenceRecord",
    "PromptRecord",
    "SFTRecord",
    "TokenizeConfig",
    "__version__",
    "collate_pairs",
    "collate_prompts",
    "collate_sft",
    "encode_pair",
    "encode_prompt",
    "encode_response",
    "render_prompt",
    "render_response",
    "train_demo_tokenizer",
]
