"""Advantage and return estimators: GAE, group-relative (GRPO), leave-one-out (RLOO), reward-to-go.

Part of :mod:`rlhf_algos.functional` (import from there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._stats import _valid, _zero_invalid


@dataclass(frozen=True, eq=False)
class GAEOutput:
    """Result of :func:`gae`; both fields are detached and 0 on padding.

    Attributes:
        advantages: ``(B, T)`` GAE advantages ``A_t``.
        returns: ``(B, T)`` value targets ``A_t + V_t``.
    """

    advantages: torch.Tensor
    returns: torch.Tensor


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> GAEOutput:
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16).

    With ``m`` the mask and the value after the last valid token taken as 0 (the episode ends
    with the response)::

        delta_t = r_t + gamma * m_{t+1} * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}        (A_T = V_T = 0)

    Rewards and values at masked positions are ignored. Masked positions *between* valid ones (a
    multi-turn trajectory's environment tokens, ``rlhf_algos.trajectories``) are not time steps:
    the step after a valid token is the next valid token, so ``V_{t+1}`` and ``A_{t+1}`` are read
    there and ``gamma`` is applied once across the gap. With the valid tokens a prefix (response,
    then padding) this is the formula above exactly. Computed with a backwards loop over ``T``
    that builds a list and stacks it, so no autograd tensor is modified in place.

    Args:
        rewards: Per-token rewards ``(B, T)`` (e.g. :attr:`ShapedRewards.rewards`).
        values: Value-head predictions ``(B, T)`` at rollout time.
        mask: Response mask ``(B, T)``, float or bool, 1 = valid.
        gamma: Discount factor.
        lam: GAE ``lambda``; 1 gives Monte-Carlo returns, 0 gives one-step TD.

    Returns:
        :class:`GAEOutput` with detached ``advantages`` and ``returns``, 0 on padding.
    """
    valid = _valid(mask)
    m = valid.to(values.dtype)  # (B, T), exact 0/1
    r = _zero_invalid(rewards.detach(), valid)
    v = _zero_invalid(values.detach(), valid)
    num_steps = r.shape[-1]

    next_value = torch.zeros_like(v[:, 0])  # (B,) V_{t+1} * m_{t+1}
    next_adv = torch.zeros_like(v[:, 0])  # (B,) A_{t+1} * m_{t+1}
    advantages_reversed = []
    for t in reversed(range(num_steps)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = (delta + gamma * lam * next_adv) * m[:, t]
        advantages_reversed.append(adv)
        # a masked position is skipped: the next valid token's value and advantage carry over it
        next_value = torch.where(valid[:, t], v[:, t], next_value)
        next_adv = torch.where(valid[:, t], adv, next_adv)
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)  # (B, T)
    returns = (advantages + v) * m
    return GAEOutput(advantages=advantages, returns=returns)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards (N,)`` viewed as ``(N / group_size, group_size)``; raises on a bad layout."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be >= 1")
    if rewards.shape[0] % group_size != 0:
        raise ValueError(
            f"the number of rewards N={rewards.shape[0]} is not divisible by group_size={group_size}; "
            "rewards must hold group_size samples for every prompt"
        )
    return rewards.view(-1, group_size)  # (G, k)


def _centered(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grouped - group mean, constant)``: ``constant`` is True for groups of identical values.

    ``mean`` of identical floats need not equal them bit for bit (``(0.1 + 0.1 + 0.1) / 3`` is
    ``0.10000000000000002`` in float64), so a group of identical rewards is zeroed explicitly:
    its advantage is exactly 0, as the estimator intends (no signal, no gradient).
    """
    constant = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)  # (G, 1)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(centered), centered), constant


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1.2).

    For the ``k = group_size`` samples of one prompt (outcome supervision)::

        A_i = (r_i - mean(r)) / (std(r) + eps)      scale=True   (GRPO)
        A_i =  r_i - mean(r)                         scale=False  (Dr. GRPO, Liu et al. 2025, sec. 3.1)

    ``std`` is the unbiased sample standard deviation (Bessel-corrected, as TRL's
    ``GRPOTrainer``; OpenRLHF's ``group_norm`` too). ``eps = 1e-6`` follows verl; TRL adds
    ``1e-4``, OpenRLHF ``1e-9``. The advantage of a sequence is then given to each of its tokens.

    Edge cases: a group of identical rewards gets exactly 0 (not ``0 / eps`` noise) and a group
    of size 1 gets 0 (its sample std is undefined; its centred reward is 0 anyway).

    Args:
        rewards: Sequence rewards ``(N,)``, laid out group-contiguous: the ``k`` samples of prompt
            0, then the ``k`` samples of prompt 1, ... (what ``repeat_interleave`` produces).
        group_size: ``k``, samples per prompt.
        scale: Divide by the group std (GRPO); False gives Dr. GRPO's unscaled advantages.
        eps: Added to the std.

    Returns:
        Advantages ``(N,)``, detached.

    Raises:
        ValueError: If ``N`` is not divisible by ``group_size`` (naming both), ``rewards`` is not
            1-D or ``group_size < 1``.
    """
    grouped = _grouped(rewards.detach(), group_size)  # (G, k)
    if group_size == 1:
        return torch.zeros_like(rewards, dtype=rewards.dtype).detach()
    centered, constant = _centered(grouped)  # (G, k), (G, 1)
    if scale:
        std = grouped.std(dim=1, keepdim=True)  # (G, 1), unbiased
        centered = torch.where(constant, centered, centered / (std + eps))
    return centered.reshape(-1)


def group_scale(
    returns: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Per row, the factor a group-relative estimator puts on the row's rewards: ``1 / (std + eps)``
    of its group's ``returns`` (``scale``, GRPO, as :func:`group_advantages`) or 1 (Dr. GRPO, RLOO),
    and 0 for a group of identical returns or a group of one (no signal: every token gets 0).

    Multi-turn credit (``rlhf_algos.advantages``) multiplies each per-turn reward by it, so that
    per-turn rewards and the normalised return are on one scale.

    Args:
        returns: ``(N,)`` group-contiguous, as in :func:`group_advantages`.
        group_size: ``k``; scale: divide by the group std; eps: added to the std.

    Returns:
        ``(N,)`` factors, detached.
    """
    grouped = _grouped(returns.detach(), group_size)  # (G, k)
    if group_size == 1:
        return torch.zeros_like(returns).detach()
    _, constant = _centered(grouped)  # (G, 1)
    factor = 1.0 / (grouped.std(dim=1, keepdim=True) + eps) if scale else torch.ones_like(grouped[:, :1])
    return torch.where(constant, torch.zeros_like(factor), factor).expand_as(grouped).reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out advantages (Ahmadian et al. 2024, "Back to Basics: Revisiting
    REINFORCE Style Optimization for Learning from Human Feedback in LLMs", sec. 3).

    The baseline of sample ``i`` is the mean reward of the *other* ``k - 1`` samples of its
    prompt, so it is independent of sample ``i`` and the estimator stays unbiased::

        A_i = r_i - (sum_j r_j - r_i) / (k - 1)  =  k / (k - 1) * (r_i - mean(r))

    The second form is what is computed (one division less). A group of identical rewards gets
    exactly 0 and ``k = 1`` (no other sample to compare with) gets 0.

    Args:
        rewards: Sequence rewards ``(N,)``, group-contiguous as in :func:`group_advantages`.
        group_size: ``k``, samples per prompt.

    Returns:
        Advantages ``(N,)``, detached.

    Raises:
        ValueError: If ``N`` is not divisible by ``group_size`` (naming both).
    """
    grouped = _grouped(rewards.detach(), group_size)  # (G, k)
    if group_size == 1:
        return torch.zeros_like(rewards).detach()
    centered, _ = _centered(grouped)
    return (centered * (group_size / (group_size - 1))).reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted reward-to-go ``G_t = r_t + gamma * G_{t+1}`` over the valid tokens.

    The critic-free return of REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient
    Approach for Aligning Large Language Models"), also used by OpenRLHF for RLOO / GRPO when
    the KL penalty sits in the per-token reward. Rewards at masked positions are ignored and the
    return there is 0; masked positions between valid ones (a multi-turn trajectory's environment
    tokens) are skipped, not discounted: ``G_t = r_t + gamma * G_next`` with ``next`` the next
    valid token.

    Args:
        rewards: Per-token rewards ``(B, T)`` (e.g. :attr:`ShapedRewards.rewards`).
        mask: ``(B, T)``, float or bool, 1 = valid.
        gamma: Discount factor.

    Returns:
        Returns ``(B, T)``, detached, 0 on padding.
    """
    valid = _valid(mask)
    m = valid.to(rewards.dtype)
    r = _zero_invalid(rewards.detach(), valid)
    running = torch.zeros_like(r[:, 0])  # (B,) G_{t+1}
    returns_reversed = []
    for t in reversed(range(r.shape[-1])):
        running = torch.where(valid[:, t], r[:, t] + gamma * running, running)  # skip masked positions
        returns_reversed.append(running * m[:, t])
    return torch.stack(returns_reversed[::-1], dim=-1)  # (B, T)

