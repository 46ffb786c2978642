"""Test helpers that ship with rlhf-hybrid."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from .distributed import DistInfo, init_distributed

TINY_VOCAB, TINY_PAD = 97, 0
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_group_env: dict[str, str] | None = None


@contextlib.contextmanager
def world_of_one() -> Iterator[DistInfo]:
    """A one-process gloo world for in-process tests.

    The environment variables ``init_distributed`` sets (RANK, WORLD_SIZE, ...) are restored on
    exit, so later subprocesses and launcher checks do not mistake this process for a torchrun
    worker. The process group itself stays for the rest of the process: DeepSpeed caches its
    groups at the first ``deepspeed.initialize``, and engines built after a destroy and re-init
    would broadcast over a group that no longer exists.
    """
    global _group_env
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    info = init_distributed()
    if _group_env is None:  # the variables of the group's first init; DeepSpeed reads LOCAL_RANK ...
        _group_env = {k: os.environ[k] for k in _DIST_ENV if k in os.environ}
    os.environ.update(_group_env)  # ... at every deepspeed.initialize, so set them again for each user
    try:
        yield info
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ragged_prompts(vocab: int, lengths: Sequence[int] = (5, 2, 7), *, pad: int = 0, low: int = 1,
                   seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given ``lengths``: ids and mask, each (B, max(lengths)).

    Token ids are drawn from ``[low, vocab)``, so choose ``low`` above the pad and EOS ids to keep
    them out of the prompts.
    """
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(low, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask


# -- one micro-batch's gradients, kept for comparison -------------------------------------------


class GradOnly:
    """Forwards to a :class:`~rlhf_hybrid.HybridEngine`, except ``step``, which does nothing: the gradients
    of one micro-batch stay in the module's ``.grad`` to be compared (with :func:`grad_only`'s engine:
    ZeRO-0, fp32, accumulation 1, so DeepSpeed leaves them unscaled). Implements the rlhf-algos
    protocols the engine does (policy, value function, scorer)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def token_logprobs(self, *a, **kw):
        return self.engine.token_logprobs(*a, **kw)

    def values(self, *a, **kw):
        return self.engine.values(*a, **kw)

    def score(self, *a, **kw):
        return self.engine.score(*a, **kw)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        pass

    def train(self) -> None:
        self.engine.module.train()

    def eval(self) -> None:
        self.engine.module.eval()


def grad_only(module: torch.nn.Module) -> GradOnly:
    """``module`` in a ZeRO-0 fp32 :class:`~rlhf_hybrid.HybridEngine` (SGD, lr 0), wrapped in :class:`GradOnly`.
    Call inside :func:`world_of_one`."""
    from .engine import EngineConfig, HybridEngine

    return GradOnly(HybridEngine(module, EngineConfig(lr=0.0, micro_batch_size=2, optimizer="sgd", weight_decay=0.0)))


def param_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{name: a copy of .grad}`` of every parameter of ``module`` that has a gradient."""
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


# -- tiny models of every family the fast generation path supports ----------------------------


def _llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return LlamaForCausalLM(LlamaConfig(**_common(cfg | kw)))


def _mistral(**kw):
    from transformers import MistralConfig, MistralForCausalLM

    # head_dim 16 != hidden / heads = 8: the layout must read head_dim from the config.
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=4096)
    return MistralForCausalLM(MistralConfig(**_common(cfg | kw)))


def _qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=1, tie_word_embeddings=True)  # q/k/v biases are Qwen2's own
    return Qwen2ForCausalLM(Qwen2Config(**_common(cfg | kw)))


def _opt(**kw):
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32,
               max_position_embeddings=128)
    return OPTForCausalLM(OPTConfig(**_common(cfg | kw)))


def _gpt2(**kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = dict(n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(GPT2Config(**_common(cfg | kw)))


def _common(cfg: dict) -> dict:
    # No EOS in the config: HF generate would otherwise stop on the config's EOS when a test passes
    # eos_token_id=None.
    return cfg | dict(vocab_size=TINY_VOCAB, pad_token_id=TINY_PAD, eos_token_id=None, bos_token_id=None)


_BUILDERS = {"llama": _llama, "mistral": _mistral, "qwen2": _qwen2, "opt": _opt, "gpt2": _gpt2}


def tiny_family(kind: str, **overrides):
    """A tiny random model of ``kind`` ("llama", "mistral", "qwen2", "opt", "gpt2"), its config's
    defaults replaced by ``overrides`` (HF's own initialisation; :func:`tiny_model` re-draws)."""
    return _BUILDERS[kind](**overrides)


TINY_FAMILIES = {
    "llama-gqa": lambda: _llama(),
    "llama-mqa-bias-tied": lambda: _llama(num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                          tie_word_embeddings=True),
    "mistral": lambda: _mistral(),
    "qwen2": lambda: _qwen2(),
    "opt": lambda: _opt(),
    "opt-proj-postnorm": lambda: _opt(word_embed_proj_dim=16, do_layer_norm_before=False),
    "gpt2": lambda: _gpt2(),
    "gpt2-layer-scaled": lambda: _gpt2(scale_attn_by_inverse_layer_idx=True),
}


def tiny_model(name: str, seed: int = 0):
    """A tiny random causal LM of family ``name`` (:data:`TINY_FAMILIES`), weights re-drawn with std 0.3
    (norm weights around 1, biases around 0) so that greedy tokens vary; no EOS in its config.
    Vocabulary :data:`TINY_VOCAB`, pad id :data:`TINY_PAD`."""
    torch.manual_seed(seed)
    model = TINY_FAMILIES[name]().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
            else:  # norm weights around 1, biases around 0
                p.copy_((1.0 if torch.all(p == 1) else 0.0) + 0.1 * torch.randn_like(p))
    model.generation_config.eos_token_id = None
    return model
