"""The records an online iteration passes around: the rollout being scored, the advantage estimate
and the experience batch learned from, plus :func:`response_mask_from`.

Re-exported by :mod:`rlhf_algos.base`, whose :class:`~rlhf_algos.base.OnlineAlgorithm` builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["AdvantageEstimate", "Experience", "Rollout", "response_mask_from"]


@dataclass
class Experience:
    """One rollout batch. Response-aligned tensors are ``(N, R)``; ``sequences`` is ``(N, P + R)``.

    ``N = B * samples_per_prompt`` rows, the samples of one prompt contiguous. Critic-free
    algorithms store zeros in ``values`` and the (un-whitened) discounted returns in ``returns``.
    ``sample_logprobs`` are the generator's own log-probs of its tokens (0 after EOS), for the
    sampling/training mismatch metrics; ``monitor_scores`` ``(N,)`` are the scores of the
    algorithm's ``monitor_fn`` (logged, never trained on), None without one.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    sample_logprobs: torch.Tensor | None = None
    monitor_scores: torch.Tensor | None = None

    def rows(self, idx: list[int]) -> Experience:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
        return Experience(**out)


@dataclass(frozen=True, eq=False)
class Rollout:
    """What :meth:`OnlineAlgorithm.estimate_advantages` receives (all on the CPU, float32).

    Attributes:
        prompt_ids: ``(N, P)`` left-padded prompts, already repeated ``samples_per_prompt`` times.
        prompt_mask: ``(N, P)``.
        meta: ``N`` per-row dicts for the reward function.
        sequences: ``(N, P + R)`` prompts and sampled responses.
        attention_mask: ``(N, P + R)``.
        response_mask: ``(N, R)`` 1 up to and including the first EOS.
        logprobs: ``(N, R)`` actor log-probs at sampling time (unmasked).
        ref_logprobs: ``(N, R)`` reference log-probs (unmasked).
        values: ``(N, R)`` critic values ``V(s_t)`` (zeros without a critic; unmasked).
        scores: ``(N,)`` sequence scores after clipping and ``reward_norm``.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    meta: list[dict]
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor


@dataclass(frozen=True, eq=False)
class AdvantageEstimate:
    """What :meth:`OnlineAlgorithm.estimate_advantages` returns; all ``(N, R)``, 0 on padding.

    Attributes:
        rewards: Per-token rewards (KL-shaped when ``kl_placement == "reward"``).
        kl: Per-token KL estimate (for metrics; in the reward or the loss, depending on config).
        advantages: What the policy loss multiplies the ratio by.
        returns: Value targets (PPO) or discounted returns (critic-free).
    """

    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def response_mask_from(sequences: torch.Tensor, prompt_len: int, eos_token_id: int | None) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after. (B, R) float."""
    resp = sequences[:, prompt_len:]
    if eos_token_id is None:
        return torch.ones_like(resp, dtype=torch.float32)
    is_eos = (resp == eos_token_id).long()
    before_or_at_first_eos = (is_eos.cumsum(dim=1) - is_eos) == 0
    return before_or_at_first_eos.float()
