"""Finding reward functions: callables registered under the entry-point group ``rlhf.rewards``.

A reward function scores decoded responses::

    def reward(responses: list[str], meta: list[dict]) -> list[float]: ...

``meta`` is each prompt's ``meta`` dict (the demo task's operands, a dataset's reference answer ...).
Register it in a package's ``pyproject.toml``::

    [project.entry-points."rlhf.rewards"]
    my_reward = "my_package.rewards:my_reward"

and select it with ``rl.reward=my_reward``. The demo task's verifier is registered this way as
``addition`` (in rlhf-data's pyproject.toml). A trained reward model becomes a reward function
through :class:`ModelReward`.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points

import torch

from .protocols import SequenceScorer

__all__ = ["REWARD_GROUP", "ModelReward", "TextReward", "available_rewards", "decode_responses", "get_reward"]

REWARD_GROUP = "rlhf.rewards"

RewardFn = Callable[[list[str], list[dict]], list[float]]


def available_rewards() -> dict[str, str]:
    """Registered reward functions: name -> ``module:attr`` (nothing is imported)."""
    return {ep.name: ep.value for ep in entry_points(group=REWARD_GROUP)}


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the available ones and the group).
        TypeError: the entry point is not callable.
    """
    eps = {ep.name: ep for ep in entry_points(group=REWARD_GROUP)}
    if name not in eps:
        available = ", ".join(sorted(eps)) or "(none)"
        raise ValueError(f"unknown reward function {name!r}; available: {available}. Reward functions are "
                         f"registered under the entry-point group {REWARD_GROUP!r}")
    fn = eps[name].load()
    if not callable(fn):
        raise TypeError(f"reward function {name} = {eps[name].value!r} (group {REWARD_GROUP!r}) is not callable")
    return fn


def decode_responses(tokenizer, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int) -> list[str]:
    """The response text of each row: the tokens after ``prompt_len`` where ``attention_mask`` is 1."""
    out = []
    for row, m in zip(sequences[:, prompt_len:], attention_mask[:, prompt_len:], strict=True):
        out.append(tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True))
    return out


class TextReward:
    """A text-level reward function (``fn(responses, meta) -> list[float]``, e.g. one registered under
    ``rlhf.rewards``) as the tensor-level :class:`rlhf_algos.RewardFunction` the algorithms call.

    Args:
        fn: the reward function.
        tokenizer: anything with ``decode(ids, skip_special_tokens=True)``.
    """

    def __init__(self, fn: RewardFn, tokenizer) -> None:
        self.fn, self.tokenizer = fn, tokenizer

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 meta: list[dict]) -> torch.Tensor:
        texts = decode_responses(self.tokenizer, sequences, attention_mask, prompt_len)
        scores = self.fn(texts, list(meta))
        if len(scores) != len(texts):
            raise ValueError(f"reward function returned {len(scores)} scores for {len(texts)} responses")
        return torch.tensor([float(x) for x in scores])  # (B,)


class ModelReward:
    """A reward model (anything with ``score(input_ids, attention_mask) -> (B,)``, e.g. a frozen
    ``rlhf_hybrid.HybridEngine`` around a ``ValueModel``) as a :class:`rlhf_algos.RewardFunction`:
    the score at each sequence's last real token, without gradients.

    Args:
        model: the reward model.
    """

    def __init__(self, model: SequenceScorer) -> None:
        self.model = model

    @torch.no_grad()
    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 meta: list[dict]) -> torch.Tensor:
        return self.model.score(sequences, attention_mask)  # (B,)
