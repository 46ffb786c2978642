"""Model construction: causal LMs from the hub / a directory / a config, and value models.

A value model (reward model or critic) is a causal LM's backbone plus a scalar head::

    hidden = lm.base_model(input_ids).last_hidden_state   # (B, L, H)
    values = v_head(hidden).squeeze(-1)                   # (B, L)

It is saved as the complete causal-LM checkpoint (so ``AutoModelForCausalLM.from_pretrained``
loads every output directory) plus ``value_head.safetensors``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int = 512, max_positions: int = 128, pad_token_id: int | None = None,
                      eos_token_id: int | None = None):
    """The demo's tiny Llama-architecture config (about 0.5M parameters at the defaults)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )


def resolve_model_path(name_or_path: str) -> str:
    """Check a local directory exists and holds a config; pass hub names through unchanged.

    Raises:
        FileNotFoundError: a path that looks local (``./x``, ``/x``, ``~/x`` or an existing
            directory) but is missing or has no ``config.json``.
    """
    p = Path(os.path.expanduser(name_or_path))
    looks_local = name_or_path.startswith((".", "/", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise FileNotFoundError(f"model directory {name_or_path!r} does not exist")
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {name_or_path!r} has no config.json (not a HF checkpoint)")
        return str(p)
    return name_or_path  # a hub name: transformers downloads it (needs internet)


class ModelNotAvailableError(FileNotFoundError):
    """A model or tokenizer name that is no local checkpoint and cannot be loaded from the Hugging Face hub
    (offline, unreachable, unknown or gated). The message is one line: the name, the hub's reason, a hint."""


@contextlib.contextmanager
def _hub_errors(what: str, name_or_path: str):
    """Turn transformers' OSError for a hub name (a local directory is checked before) into one clear line."""
    try:
        yield
    except OSError as e:
        if Path(os.path.expanduser(name_or_path)).is_dir():
            raise  # a local checkpoint's own problem (a corrupt file, ...): transformers' message stands
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = ("HF_HUB_OFFLINE is set, so nothing is downloaded: unset it, or download the model first with `hf download NAME`"
                if offline else "give a local directory, or check the name, the network and your hub login")
        raise ModelNotAvailableError(f"{what} {name_or_path!r} is not a local directory and could not be loaded from "
                                     f"the Hugging Face hub: {reason} ({hint})") from e


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    with _hub_errors("model", name_or_path):
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), dtype=dtype)


def load_tokenizer(name_or_path: str):
    """Load a tokenizer; a missing pad token becomes the EOS token (with a warning, as TRL does)."""
    from transformers import AutoTokenizer

    with _hub_errors("tokenizer of", name_or_path):
        tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r}: has neither a pad nor an eos token")
        log.warning("tokenizer of %s has no pad token; using its eos token %r for padding", name_or_path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class ValueModel(nn.Module):
    """A causal LM's backbone with a scalar value head: ``forward -> (B, L)`` values."""

    def __init__(self, lm: nn.Module, v_head: nn.Linear | None = None) -> None:
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm.config, "hidden_size") else lm.config.n_embd
        # OPT projects hidden states to word_embed_proj_dim before the LM head; the backbone's
        # last_hidden_state already has that width.
        hidden = getattr(lm.config, "word_embed_proj_dim", None) or hidden
        self.v_head = v_head if v_head is not None else nn.Linear(hidden, 1, bias=False)
        if v_head is None:
            nn.init.zeros_(self.v_head.weight)  # a fresh head scores everything 0: a neutral start
        # The LM head is unused by a value model; freeze it unless it is tied to the embeddings.
        out = lm.get_output_embeddings()
        if out is not None and out.weight is not lm.get_input_embeddings().weight:
            out.weight.requires_grad_(False)

    @property
    def config(self):
        return self.lm.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # position_ids given with attention_mask=None: packed rows (rlhf_hybrid.packed)
        out = self.lm.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids if position_ids is not None else position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return self.v_head(out.last_hidden_state).squeeze(-1).float()  # (B, L)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32) -> ValueModel:
        """Load a value model; a plain causal LM gets a fresh (zero) value head."""
        lm = load_causal_lm(name_or_path, dtype)
        model = cls(lm)
        head = Path(name_or_path) / VALUE_HEAD_FILE
        if head.is_file():
            from safetensors.torch import load_file

            model.v_head.load_state_dict({k.removeprefix("v_head."): v for k, v in load_file(head).items()})
            model.v_head.to(dtype)
        else:
            model.v_head.to(dtype)
            log.info("%s has no %s: starting from a fresh value head", name_or_path, VALUE_HEAD_FILE)
        return model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding). (B,)."""
    L = attention_mask.shape[1]
    pos = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values.clamp(min=0)
