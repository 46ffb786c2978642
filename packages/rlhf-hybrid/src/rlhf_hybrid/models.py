"""Model construction: causal LMs from the hub / a directory / a config, and value models.

A value model (reward model or critic) is a transformers sequence-classification model with one output
(``<Arch>ForSequenceClassification``, num_labels=1) whose ``score`` head is applied at every position::

    hidden = model.base_model(input_ids).last_hidden_state   # (B, L, H)
    values = model.score(hidden).squeeze(-1)                 # (B, L)

It is saved in that class's format, so ``AutoModelForSequenceClassification.from_pretrained`` (TRL,
OpenRLHF, RewardBench) loads it with its trained head; such models from elsewhere load here too, and
so does this project's older format (a causal LM plus ``value_head.safetensors``).
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


# Settings of every from_pretrained call: model.dtype (resolved to a torch dtype by the caller),
# model.attn_implementation, model.trust_remote_code, model.revision. One home: load_causal_lm,
# load_tokenizer, ValueModel.from_pretrained and tiny models built from a config all read them here.
def hf_kwargs(*, dtype: torch.dtype | None = None, attn_implementation: str | None = None,
              trust_remote_code: bool = False, revision: str | None = None) -> dict:
    """The keyword arguments of a transformers ``from_pretrained`` (or ``from_config``) call.

    Args:
        dtype: the weights' dtype (None: not passed, transformers' default).
        attn_implementation: "eager", "sdpa", "flash_attention_2", ...; None or "" = transformers' default.
        trust_remote_code: run the model's own code from its directory / hub repository.
        revision: hub branch, tag or commit (None or "": the default branch; ignored for local directories).
    """
    kw: dict = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kw["dtype"] = dtype
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if revision:
        kw["revision"] = revision
    return kw


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, *, attn_implementation: str | None = None,
                   trust_remote_code: bool = False, revision: str | None = None):
    """``AutoModelForCausalLM.from_pretrained`` with the settings of :func:`hf_kwargs`.

    Raises:
        FileNotFoundError: a local path without a checkpoint (:func:`resolve_model_path`).
        ModelNotAvailableError: a hub name that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    kw = hf_kwargs(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                   revision=revision)
    with _hub_errors("model", name_or_path):
        return AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path), **kw)


def causal_lm_from_config(config, dtype: torch.dtype = torch.float32, *, attn_implementation: str | None = None):
    """A causal LM with fresh weights (drawn from the global RNG) from ``config``, in ``dtype`` and with
    ``attn_implementation`` (None or "": transformers' default), as :func:`load_causal_lm` would load it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config, **hf_kwargs(dtype=dtype, attn_implementation=attn_implementation))


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    """Load a tokenizer; a missing pad token becomes the EOS token (with a warning, as TRL does)."""
    from transformers import AutoTokenizer

    with _hub_errors("tokenizer of", name_or_path):
        tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path),
                                            **hf_kwargs(trust_remote_code=trust_remote_code, revision=revision))
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {name_or_path!r}: has neither a pad nor an eos token")
        log.warning("tokenizer of %s has no pad token; using its eos token %r for padding", name_or_path, tok.eos_token)
        tok.pad_token = tok.eos_token
    return tok


def enable_gradient_checkpointing(module: nn.Module) -> None:
    """Recompute each transformer layer's activations in the backward pass instead of keeping them
    (transformers' activation checkpointing, non-reentrant ``torch.utils.checkpoint``) on a causal LM,
    a :class:`ValueModel` or a peft model around either. Same loss and gradients, less activation memory,
    about one more forward pass of compute. Only in train mode; generation and scoring are unaffected.

    Non-reentrant checkpointing needs no input that requires grad (frozen embeddings and LoRA work) and
    works under DeepSpeed ZeRO 0-3 (its parameter gathering hooks run again in the recomputation).

    Raises:
        ValueError: the model does not support it (transformers' message names the class).
    """
    target = module.model if isinstance(module, ValueModel) else module
    kwargs = {"use_reentrant": False}
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
        target.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them. (B, L)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _classifier_from_causal_lm(lm: nn.Module) -> nn.Module:
    """The transformers sequence-classification model (num_labels=1) of ``lm``'s architecture around
    ``lm``'s own backbone (shared, not copied) with a fresh all-zero ``score`` head; the LM head is dropped."""
    import copy

    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(lm.config)
    config.num_labels = 1
    with torch.device("meta"):  # the class's own backbone is replaced: allocate nothing for it
        seq = AutoModelForSequenceClassification.from_config(config)
    setattr(seq, seq.base_model_prefix, lm.base_model)
    ref = next(lm.base_model.parameters())
    old = seq.score
    seq.score = nn.Linear(old.in_features, 1, bias=old.bias is not None, device=ref.device, dtype=ref.dtype)
    nn.init.zeros_(seq.score.weight)  # a fresh head scores everything 0: a neutral start
    if seq.score.bias is not None:
        nn.init.zeros_(seq.score.bias)
    left = [n for n, p in seq.named_parameters() if p.is_meta]
    if left:
        raise ValueError(f"{type(seq).__name__}: parameters besides the backbone and the score head ({left[:3]}); "
                         f"not supported as a value model")
    return seq


def _is_classifier(model: nn.Module) -> bool:
    return isinstance(getattr(model, "score", None), nn.Linear) and hasattr(model, "base_model_prefix")


class ValueModel(nn.Module):
    """A scalar value at every position: a transformers ``<Arch>ForSequenceClassification`` (num_labels=1)
    whose backbone and ``score`` head are applied to every token, not only the last::

        hidden = model.base_model(input_ids, attention_mask, position_ids).last_hidden_state   # (B, L, H)
        values = model.score(hidden).squeeze(-1)                                             # (B, L)

    The reward of a sequence is the value at its last real token (``HybridEngine.score``), which is what
    ``AutoModelForSequenceClassification`` returns for the same sequence (see :meth:`from_pretrained` for
    the conditions). Saved as that class's checkpoint (``save_hf_checkpoint``), so
    ``AutoModelForSequenceClassification.from_pretrained`` loads the trained head.

    Args:
        model: a sequence-classification model with a one-output ``score`` head, or a causal LM: its
            backbone is used with a fresh all-zero head (its LM head is dropped).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model if _is_classifier(model) else _classifier_from_causal_lm(model)
        if self.model.score.out_features != 1:
            raise ValueError(f"{type(self.model).__name__}: a value model has one output (num_labels=1), this one "
                             f"has {self.model.score.out_features}")

    @property
    def config(self):
        return self.model.config

    @property
    def head(self) -> nn.Linear:
        """The value head: transformers' ``score`` layer, hidden -> 1 (no bias in transformers' classes)."""
        return self.model.score

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # position_ids given with attention_mask=None: packed rows (rlhf_hybrid.packed). Otherwise positions
        # are counted over real tokens (left padding does not shift them); transformers'
        # sequence-classification forward counts them from the first column instead.
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids if position_ids is not None else position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return self.model.score(out.last_hidden_state).squeeze(-1).float()  # (B, L)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: torch.dtype = torch.float32, *,
                        attn_implementation: str | None = None, trust_remote_code: bool = False,
                        revision: str | None = None) -> ValueModel:
        """Load a reward model or critic with ``AutoModelForSequenceClassification`` (settings: :func:`hf_kwargs`).

        Accepted checkpoints:
          - a sequence-classification one with ``num_labels=1`` (ours, or e.g. a ``LlamaForSequenceClassification``
            from TRL / OpenRLHF): its trained ``score`` head;
          - the older format of this project, a causal LM plus ``value_head.safetensors`` (``v_head.weight``):
            the backbone and that head;
          - a plain causal LM: its backbone and a fresh all-zero head (logged).

        Scores equal transformers' ``AutoModelForSequenceClassification(...).logits`` for the same sequence
        when the batch is right-padded or unpadded (transformers counts positions from column 0, we over
        real tokens: equal without left padding) and the tokenizer's pad token is not the sequence's last
        token (transformers scores the last token that is not ``config.pad_token_id``; we the last token of
        the attention mask: they differ when the pad token is EOS and the sequence ends with EOS).

        Raises:
            ValueError: a sequence-classification checkpoint with ``num_labels`` != 1, a backbone weight missing
                from the checkpoint, or a ``value_head.safetensors`` holding anything but ``v_head.weight``.
            FileNotFoundError / ModelNotAvailableError: as :func:`load_causal_lm`.
        """
        from transformers import AutoConfig, AutoModelForSequenceClassification

        path = resolve_model_path(name_or_path)
        kw = hf_kwargs(dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                       revision=revision)
        with _hub_errors("reward model", name_or_path):
            config = AutoConfig.from_pretrained(path, **hf_kwargs(trust_remote_code=trust_remote_code,
                                                                   revision=revision))
            if reward_head_of(config, path) == "sequence_classification" and config.num_labels != 1:
                raise ValueError(f"reward model {name_or_path!r}: a sequence-classification model with num_labels="
                                 f"{config.num_labels}; a reward model or critic has one output (num_labels=1)")
            config.num_labels = 1
            model, info = AutoModelForSequenceClassification.from_pretrained(path, config=config,
                                                                             output_loading_info=True, **kw)
        missing = set(info["missing_keys"])
        if missing - {"score.weight", "score.bias"}:
            raise ValueError(f"reward model {name_or_path!r}: weights missing from the checkpoint: "
                             f"{sorted(missing - {'score.weight', 'score.bias'})[:5]}")
        if "score.weight" in missing:
            _init_head(model.score, Path(path) / VALUE_HEAD_FILE, name_or_path)
        return cls(model)


def _init_head(score: nn.Linear, legacy: Path, name: str) -> None:
    """A checkpoint without a ``score`` head: the older format's ``value_head.safetensors``, else zeros.
    A head built ZeRO-3 partitioned (``rlhf_hybrid.zero_init``) is written whole and re-partitioned
    (``deepspeed.zero.GatheredParameters``: collective; every rank reads the small head file)."""
    params = list(score.parameters())
    whole = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        whole = deepspeed.zero.GatheredParameters(params, modifier_rank=0)
    with whole, torch.no_grad():
        score.weight.zero_()
        if score.bias is not None:
            score.bias.zero_()
        if not legacy.is_file():
            log.info("%s has no value head: starting from a fresh (all-zero) one", name)
            return
        from safetensors.torch import load_file

        state = load_file(legacy)
        if set(state) != {"v_head.weight"} or state["v_head.weight"].shape != score.weight.shape:
            got = {k: tuple(v.shape) for k, v in state.items()}
            raise ValueError(f"{legacy}: expected exactly v_head.weight of shape {tuple(score.weight.shape)} (a "
                             f"bias-free value head, as this project saved it before), got {got}")
        score.weight.copy_(state["v_head.weight"].to(score.weight.dtype))


def reward_head_of(config, path: str | None = None) -> str | None:
    """Where a checkpoint's trained value head is: "sequence_classification" (its architecture is a
    ``...ForSequenceClassification``), "value_head" (the older format: ``value_head.safetensors`` beside a
    causal LM in local directory ``path``) or None (a plain model: no trained head)."""
    if any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])):
        return "sequence_classification"
    if path is not None and (Path(path) / VALUE_HEAD_FILE).is_file():
        return "value_head"
    return None


def trained_reward_head(name_or_path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> str | None:
    """:func:`reward_head_of` a model name or directory, reading only its config; None also when the config
    cannot be read (the preflight and the loaders report that)."""
    from transformers import AutoConfig

    try:
        path = resolve_model_path(name_or_path)
        config = AutoConfig.from_pretrained(path, **hf_kwargs(trust_remote_code=trust_remote_code, revision=revision))
    except (OSError, ValueError):
        return None
    return reward_head_of(config, path)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (works for left and right padding). (B,)."""
    L = attention_mask.shape[1]
    pos = torch.arange(L, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values.clamp(min=0)
