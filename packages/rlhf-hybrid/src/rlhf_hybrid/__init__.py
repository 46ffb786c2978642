"""rlhf-hybrid: the hybrid engine (DeepSpeed training mode + generation mode) and model builders."""

from ._version import __version__
from .checkpoint import atomic_dir, save_hf_checkpoint, write_json_atomic
from .distributed import DistInfo, all_reduce_mean, barrier, free_port, init_distributed
from .ema import ParamEMA
from .engine import EngineConfig, HybridEngine, deepspeed_config
from .guards import NonFiniteError, NonFiniteWeightsError, check_finite_state
from .models import (
    ModelNotAvailableError,
    ValueModel,
    causal_lm_from_config,
    enable_gradient_checkpointing,
    hf_kwargs,
    last_token_index,
    load_causal_lm,
    load_tokenizer,
    position_ids_from_mask,
    resolve_model_path,
    tiny_llama_config,
    trained_reward_head,
)
from .packed import padding_free_layout
from .zero_init import build_causal_lm, build_value_model

__all__ = [
    "DistInfo",
    "EngineConfig",
    "HybridEngine",
    "NonFiniteError",
    "NonFiniteWeightsError",
    "ParamEMA",
    "ModelNotAvailableError",
    "ValueModel",
    "__version__",
    "all_reduce_mean",
    "atomic_dir",
    "barrier",
    "build_causal_lm",
    "build_value_model",
    "causal_lm_from_config",
    "check_finite_state",
    "deepspeed_config",
    "enable_gradient_checkpointing",
    "hf_kwargs",
    "free_port",
    "init_distributed",
    "last_token_index",
    "load_causal_lm",
    "load_tokenizer",
    "padding_free_layout",
    "position_ids_from_mask",
    "resolve_model_path",
    "save_hf_checkpoint",
    "tiny_llama_config",
    "trained_reward_head",
    "write_json_atomic",
]
