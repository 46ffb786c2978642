"""The ``model`` section of the run configuration: which models, how transformers loads them, the demo model.

Moved out of :mod:`rlhf_cli.config_sections` (same base class and helpers) to keep each module small.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config_sections import Section, option

__all__ = ["ATTN_IMPLEMENTATIONS", "MODEL_DTYPES", "ModelSection"]

# model.dtype -> the torch dtype's name; "auto" follows deepspeed.dtype (see ModelSection.torch_dtype_name)
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEEPSPEED_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# transformers' attention implementations; a hub kernel ("<org>/<repo>", transformers' kernels integration)
# is passed through as well
ATTN_IMPLEMENTATIONS = ("", "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class ModelSection(Section):
    """Models."""

    section: ClassVar[str] = "model"

    actor_model: str = option("", "HF hub name or local directory of a causal LM; \"\" = the demo's tiny Llama.")
    reward_model: str = option("", "HF hub name or local directory of the reward model. A trained one (a "
                                   "sequence-classification checkpoint with num_labels=1, e.g. "
                                   "LlamaForSequenceClassification from TRL or OpenRLHF, or this project's older "
                                   "causal LM + value_head.safetensors) is used as is: stage 3 scores with it and "
                                   "starts the critic from it, and --stage all runs no rm stage. A plain causal LM "
                                   "is the backbone the rm stage trains (fresh value head). \"\" = the rm stage "
                                   "starts from the SFT model.")
    dtype: str = option("auto", "dtype every model is loaded and held in: auto, float32, bfloat16 or float16. auto "
                                "= the precision DeepSpeed trains in (deepspeed.dtype: fp32 -> float32, bf16 -> "
                                "bfloat16, fp16 -> float16), not the checkpoint's dtype; an explicit value must "
                                "name that same precision (it is a check: weights load directly in it, never "
                                "first in float32).")
    attn_implementation: str = option("", "transformers' attention implementation of every model: eager, sdpa, "
                                          "flash_attention_2, flash_attention_3, flex_attention or a hub kernel "
                                          "('<org>/<repo>'); \"\" = transformers' default for the model.")
    gradient_checkpointing: bool = option(False, "recompute each layer's activations in the backward pass (HF "
                                                 "activation checkpointing, non-reentrant) in every trained model: "
                                                 "less activation memory, about one more forward pass of compute; "
                                                 "same loss and gradients.")
    trust_remote_code: bool = option(False, "let transformers run code shipped with a model or tokenizer (every "
                                            "model and tokenizer load of the run, stage outputs included); only "
                                            "for models you trust.")
    revision: str = option("", "hub branch, tag or commit of model.actor_model and model.reward_model (\"\" = the "
                               "default branch; ignored for local directories).")
    hidden_size: int = option(256, "tiny demo model: hidden width.")
    num_layers: int = option(2, "tiny demo model: transformer layers.")
    num_heads: int = option(8, "tiny demo model: attention heads.")
    intermediate_size: int = option(1024, "tiny demo model: MLP width.")
    tokenizer_vocab_size: int = option(0, "tiny demo model: vocabulary of the byte-level BPE tokenizer trained on the "
                                          "data in-process; 0 = 320 for the demo task, 2048 for other data.")

    # the byte-level BPE's 256 byte tokens plus its special tokens: the smallest vocabulary it can have
    MIN_VOCAB: ClassVar[int] = 260

    def __post_init__(self) -> None:
        self._check_min(1, "hidden_size", "num_layers", "num_heads", "intermediate_size")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            self._fail("num_heads", f"{self.num_heads} is not allowed with model.hidden_size={self.hidden_size}; "
                                    f"allowed: a divisor of hidden_size that leaves an even head size (rotary)")
        if self.tokenizer_vocab_size != 0 and not self.MIN_VOCAB <= self.tokenizer_vocab_size <= 1_000_000:
            self._fail("tokenizer_vocab_size", f"{self.tokenizer_vocab_size} is not allowed; allowed: 0 (auto) or "
                                               f"{self.MIN_VOCAB}..1000000")
        self._check_choice("dtype", MODEL_DTYPES)
        a = self.attn_implementation
        if a not in ATTN_IMPLEMENTATIONS and not (a.count("/") == 1 and all(a.split("/")) and a.strip() == a):
            self._fail("attn_implementation", f"{a!r} is not allowed; allowed: "
                                              f"{', '.join(map(repr, ATTN_IMPLEMENTATIONS))} or a hub kernel "
                                              f"'<org>/<repo>'")
        if self.revision != self.revision.strip() or any(c.isspace() for c in self.revision):
            self._fail("revision", f"{self.revision!r} is not allowed; allowed: \"\" or a hub branch, tag or commit "
                                   f"(no spaces)")

    def torch_dtype_name(self, deepspeed_dtype: str) -> str:
        """The torch dtype's name ("float32", ...) the models are loaded in: ``dtype``, or for "auto" the one of
        ``deepspeed_dtype`` (deepspeed.dtype). A run checks they agree (:meth:`check_dtype`)."""
        return _DEEPSPEED_DTYPES[deepspeed_dtype] if self.dtype == "auto" else self.dtype

    def check_dtype(self, deepspeed_dtype: str) -> None:
        """An explicit ``dtype`` names deepspeed.dtype's precision: DeepSpeed holds the trained weights in its own
        precision (bf16/fp16 with fp32 master weights in the optimizer), so another would be cast away."""
        want = _DEEPSPEED_DTYPES[deepspeed_dtype]
        if self.dtype not in ("auto", want):
            self._fail("dtype", f"{self.dtype!r} is not allowed with deepspeed.dtype={deepspeed_dtype!r}; allowed: "
                                f"'auto' or {want!r} (or set deepspeed.dtype="
                                f"{next(k for k, v in _DEEPSPEED_DTYPES.items() if v == self.dtype)!r} too)")

    def load_kwargs(self, deepspeed_dtype: str, *, user_model: bool = False) -> dict:
        """Keyword arguments of ``rlhf_hybrid.load_causal_lm`` / ``ValueModel.from_pretrained`` /
        ``causal_lm_from_config`` (the last takes dtype and attn_implementation only): the torch dtype, the
        attention implementation, trust_remote_code, and ``revision`` for ``user_model`` (model.actor_model or
        model.reward_model itself; a stage output is a local directory without revisions)."""
        import torch

        kw = {"dtype": getattr(torch, self.torch_dtype_name(deepspeed_dtype)),
              "attn_implementation": self.attn_implementation or None}
        return kw | self.tokenizer_kwargs(user_model=user_model)

    def tokenizer_kwargs(self, *, user_model: bool = False) -> dict:
        """Keyword arguments of ``rlhf_hybrid.load_tokenizer``: trust_remote_code, and ``revision`` for
        ``user_model`` (see :meth:`load_kwargs`)."""
        return {"trust_remote_code": self.trust_remote_code,
                "revision": (self.revision or None) if user_model else None}
