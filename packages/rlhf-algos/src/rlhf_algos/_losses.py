"""Losses of the online stages: the PPO policy and value losses, the pairwise reward-model loss, SFT.

Part of :mod:`rlhf_algos.functional` (import from there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._kl import _LOG_RATIO_CLAMP
from ._pairs import pair_accuracy
from ._stats import _valid, _zero_invalid, aggregate_loss, masked_mean


@dataclass(frozen=True, eq=False)
class PolicyLossOutput:
    """Result of :func:`ppo_policy_loss`.

    Attributes:
        loss: 0-dim differentiable loss.
        clip_frac: Detached fraction of valid tokens where the clip was active.
        approx_kl: Detached token-mean of ``0.5 * (logprobs - old_logprobs)**2``.
    """

    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    loss_agg: str = "token-mean",
    norm_len: int | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``ratio = exp(clamp(logprobs - old_logprobs, -20, 20))`` and, per token,
    ``max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))``, reduced with
    :func:`aggregate_loss` (default ``"token-mean"``: averaged over the valid tokens of the whole
    batch, as DeepSpeed-Chat; GRPO's paper uses ``"seq-mean-token-mean"``, Dr. GRPO
    ``"seq-mean-token-sum-norm"``). The clamp on the log-ratio is a deviation that keeps ``exp``
    finite for broken inputs; it never binds for ratios PPO can use. The same surrogate serves
    every online algorithm here (GRPO, RLOO, REINFORCE++, ReMax): only the advantages differ.

    ``old_logprobs`` and ``advantages`` are treated as constants (detached). The metrics
    ``clip_frac`` and ``approx_kl`` are token means whatever ``loss_agg`` is.

    Args:
        logprobs: Current-policy log-probs of the sampled tokens ``(B, T)``; carries the graph.
        old_logprobs: Rollout-time log-probs ``(B, T)``.
        advantages: Advantages ``(B, T)``, usually whitened.
        mask: Response mask ``(B, T)``, float or bool, 1 = valid.
        clip_eps: Clip range ``eps``.
        loss_agg: One of :data:`LOSS_AGG_MODES`.
        norm_len: Constant length for ``"seq-mean-token-sum-norm"`` (default ``T``).

    Returns:
        :class:`PolicyLossOutput`.

    Raises:
        ValueError: If ``loss_agg`` is not one of :data:`LOSS_AGG_MODES`.
    """
    valid = _valid(mask)
    advantages = _zero_invalid(advantages.detach(), valid)
    log_ratio = _zero_invalid(logprobs - old_logprobs.detach(), valid)  # (B, T), 0 on padding
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, loss_agg, norm_len=norm_len)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLossOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl)


@dataclass(frozen=True, eq=False)
class ValueLossOutput:
    """Result of :func:`ppo_value_loss`.

    Attributes:
        loss: 0-dim differentiable loss.
        clip_frac: Detached fraction of valid tokens where the clipped error was the larger one.
    """

    loss: torch.Tensor
    clip_frac: torch.Tensor


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
) -> ValueLossOutput:
    """Clipped value loss, as in OpenAI baselines PPO2 and DeepSpeed-Chat.

    Not in the PPO paper (which uses a plain squared error, Schulman et al. 2017 eq. 9): the new
    value is kept within ``eps`` of the rollout value, pessimistically::

        v_clip = old_values + clamp(values - old_values, -eps, eps)
        loss   = 0.5 * masked_mean(max((values - returns)**2, (v_clip - returns)**2))

    ``old_values`` and ``returns`` are treated as constants (detached).

    Args:
        values: Current value predictions ``(B, T)``; carries the graph.
        old_values: Rollout-time value predictions ``(B, T)``.
        returns: Value targets ``(B, T)``, e.g. :attr:`GAEOutput.returns`.
        mask: Response mask ``(B, T)``, float or bool, 1 = valid.
        clip_eps: Clip range ``eps``; None disables clipping (plain 0.5 * MSE, clip_frac 0).

    Returns:
        :class:`ValueLossOutput`.
    """
    valid = _valid(mask)
    values = _zero_invalid(values, valid)
    old_values = _zero_invalid(old_values.detach(), valid)
    returns = _zero_invalid(returns.detach(), valid)
    err = (values - returns) ** 2
    if clip_eps is None:
        no_clip = torch.zeros((), dtype=values.dtype, device=values.device)
        return ValueLossOutput(loss=0.5 * masked_mean(err, mask), clip_frac=no_clip)
    v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    err_clip = (v_clip - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), mask)
    with torch.no_grad():
        clip_frac = masked_mean((err_clip > err).to(values.dtype), mask)
    return ValueLossOutput(loss=loss, clip_frac=clip_frac)



@dataclass(frozen=True, eq=False)
class RewardLossOutput:
    """Result of :func:`pairwise_reward_loss`.

    Attributes:
        loss: 0-dim differentiable loss.
        accuracy: Detached fraction of pairs with ``r_chosen > r_rejected`` (:func:`pair_accuracy`,
            ties count as wrong: ``tie=0``).
        margin: Detached mean of ``r_chosen - r_rejected``.
    """

    loss: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


def pairwise_reward_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, center_coef: float = 0.0
) -> RewardLossOutput:
    """Bradley-Terry pairwise reward-model loss (Ouyang et al. 2022, eq. 1).

    ``mean(-log sigmoid(r_c - r_r)) + center_coef * mean((r_c + r_r)**2)``. The optional second
    term keeps rewards centred near 0 across prompts (the BT loss only sees differences); it
    follows the auxiliary centring loss of Eisenstein et al. 2023, "Helping or Herding? Reward
    Model Ensembles Mitigate but do not Eliminate Reward Hacking". ``logsigmoid`` is used so
    large margins of either sign stay finite.

    Args:
        chosen_rewards: Scores of the preferred responses ``(B,)``.
        rejected_rewards: Scores of the rejected responses ``(B,)``.
        center_coef: Weight of the centring term; 0 disables it.

    Returns:
        :class:`RewardLossOutput`.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(diff).mean()
    if center_coef != 0.0:
        loss = loss + center_coef * ((chosen_rewards + rejected_rewards) ** 2).mean()
    accuracy = pair_accuracy(chosen_rewards, rejected_rewards, tie=0.0)
    with torch.no_grad():
        margin = diff.mean()
    return RewardLossOutput(loss=loss, accuracy=accuracy, margin=margin)


@dataclass(frozen=True, eq=False)
class SFTLossOutput:
    """Result of :func:`sft_loss`.

    Attributes:
        loss: 0-dim differentiable token-mean negative log-likelihood.
        num_tokens: Detached 0-dim int64 count of valid tokens (for logging / re-weighting
            across micro-batches; kept as a tensor to avoid a host sync).
    """

    loss: torch.Tensor
    num_tokens: torch.Tensor


def sft_loss(token_logprobs: torch.Tensor, loss_mask: torch.Tensor) -> SFTLossOutput:
    """Supervised fine-tuning loss: token-mean negative log-likelihood over ``loss_mask``.

    ``-sum(logp_t * m_t) / max(sum(m_t), 1)`` over the whole batch; an all-masked batch gives 0.

    Args:
        token_logprobs: Log-probs of the target tokens ``(B, T)``.
        loss_mask: ``(B, T)``, float or bool, 1 = token contributes (typically response tokens).

    Returns:
        :class:`SFTLossOutput`.
    """
    loss = -masked_mean(token_logprobs, loss_mask)
    num_tokens = _valid(loss_mask).sum().detach()
    return SFTLossOutput(loss=loss, num_tokens=num_tokens)

