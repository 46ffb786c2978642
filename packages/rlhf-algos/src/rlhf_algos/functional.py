"""Pure RLHF math: masked statistics, KL estimators, reward shaping, GAE and losses.

Every function here takes explicit tensors and masks and returns tensors (or a small frozen
dataclass of tensors). Nothing here knows about configs, models, optimisers or process groups;
micro-batching, accumulation and distributed reductions live in the algorithm classes.

Conventions shared by all functions:

* ``B`` is the batch (number of sequences), ``T`` the number of response tokens.
* A mask is a float or bool tensor with the same shape as the data, ``1``/``True`` = valid.
  Masked-out positions are *selected away* (``torch.where``) before any non-linear math rather
  than only multiplied by 0, so garbage at padding positions (``inf``, ``nan``, ``-inf``
  log-probs) never leaks into a result or a gradient.
* Reductions over a fully masked row or batch give ``0``, never ``nan``: denominators are
  clamped to at least 1.
* No function calls ``.item()`` or branches on tensor values in Python, so none of them forces a
  host-device sync.
* Loss functions return a frozen dataclass whose ``loss`` carries the graph and whose other fields
  are detached metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "DPO_LOSS_TYPES",
    "LOSS_AGG_MODES",
    "DPOLossOutput",
    "GAEOutput",
    "KTOLossOutput",
    "ORPOLossOutput",
    "KLEstimator",
    "KL_ESTIMATORS",
    "PolicyLossOutput",
    "RewardLossOutput",
    "SFTLossOutput",
    "ShapedRewards",
    "ValueLossOutput",
    "aggregate_loss",
    "discounted_returns",
    "dpo_loss",
    "explained_variance",
    "gae",
    "group_advantages",
    "kl_penalty",
    "kl_shaped_rewards",
    "kto_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "orpo_loss",
    "pair_accuracy",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranked_pairs",
    "ranking_agreement",
    "rloo_advantages",
    "sequence_logprobs",
    "sft_loss",
    "simpo_loss",
    "whiten",
]

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

# exp(20) ~ 4.9e8 is finite in fp32/bf16 (log-ratios should be computed in one of those, not fp16)
# and far beyond any ratio PPO can use; clamping log-ratios to this range keeps exp() finite for
# arbitrarily stale or broken log-probs.
_LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor, True where ``mask`` is non-zero (works for bool and float masks)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out entries replaced by 0 *before* any non-linear math.

    Selecting away a result afterwards is not enough for autograd: the backward of e.g. ``y**2``
    at a padding value of ``inf`` is ``0 * inf = nan`` even though the forward value was dropped.
    """
    return torch.where(valid, x, torch.zeros_like(x))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``x * mask``; masked-out entries contribute exactly 0 even if they are inf/nan.

    Args:
        x: Values, any shape, e.g. ``(B, T)``.
        mask: Same shape as ``x`` (or broadcastable to it), float or bool, 1 = valid. Float
            masks act as weights on the valid entries.
        dim: Dimension(s) to reduce; ``None`` reduces over all elements.

    Returns:
        The masked sum, with ``dim`` removed (0-dim if ``dim`` is None).
    """
    weighted = torch.where(_valid(mask), x * mask.to(x.dtype), torch.zeros_like(x))
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the valid entries of ``mask``.

    The denominator is ``mask.sum(dim)`` clamped to at least 1, so a fully masked row (or
    batch) gives 0 rather than ``0 / 0 = nan``.

    Args:
        x: Values, any shape, e.g. ``(B, T)``.
        mask: Same shape as ``x`` (or broadcastable to it), float or bool, 1 = valid.
        dim: Dimension(s) to reduce; ``None`` reduces over all elements (a token-level mean).

    Returns:
        The masked mean, with ``dim`` removed (0-dim if ``dim`` is None).
    """
    weights = mask.to(x.dtype).expand_as(x)
    denom = weights.sum() if dim is None else weights.sum(dim=dim)
    return masked_sum(x, mask, dim) / denom.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid entries of ``mask`` (a single global statistic).

    Args:
        x: Values, any shape, e.g. ``(B, T)``.
        mask: Same shape as ``x``, float or bool, 1 = valid.
        unbiased: Use Bessel's correction ``n / (n - 1)``. With fewer than 2 valid elements the
            unbiased variance is undefined and 0 is returned instead.

    Returns:
        0-dim tensor. 0 when there are no valid elements (either flavour) or, for
        ``unbiased=True``, fewer than 2.
    """
    x = _zero_invalid(x, _valid(mask))
    mean = masked_mean(x, mask)
    sq_dev = masked_sum((x - mean) ** 2, mask)
    n = mask.to(x.dtype).expand_as(x).sum()
    if not unbiased:
        return sq_dev / n.clamp(min=1.0)
    var = sq_dev / (n - 1.0).clamp(min=1.0)
    return torch.where(n >= 2.0, var, torch.zeros_like(var))


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the valid entries of ``mask``.

    ``(x - mean) / sqrt(var + eps)`` with the global masked mean and the *unbiased* masked
    variance (as in DeepSpeed-Chat / TRL advantage whitening). Used to whiten advantages before
    the PPO policy loss.

    Args:
        x: Values, e.g. advantages ``(B, T)``.
        mask: Same shape as ``x``, float or bool, 1 = valid.
        shift_mean: If False the mean is added back, i.e. only the scale is normalised (used for
            rewards, whose sign carries meaning).
        eps: Added to the variance before the square root.

    Returns:
        Tensor shaped like ``x``; masked-out positions are exactly 0. With no valid elements
        the result is all zeros.
    """
    x = _zero_invalid(x, _valid(mask))
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(_valid(mask), out, torch.zeros_like(out))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the variance of the returns explained by the value head.

    ``1 - Var[returns - values] / Var[returns]`` over the valid entries of ``mask``: 1 is a
    perfect critic, 0 is no better than a constant, negative is worse than a constant.

    Convention: when ``Var[returns] == 0`` (including fewer than 2 valid elements) the ratio is
    undefined and 0 is returned, so the metric is always finite.

    Args:
        values: Value predictions ``(B, T)``.
        returns: Value targets ``(B, T)``.
        mask: ``(B, T)``, float or bool, 1 = valid.

    Returns:
        Detached 0-dim tensor.
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask, unbiased=True)
    var_residual = masked_var(returns - values, mask, unbiased=True)
    positive = var_returns > 0
    safe_denom = torch.where(positive, var_returns, torch.ones_like(var_returns))
    ev = 1.0 - var_residual / safe_denom
    return torch.where(positive, ev, torch.zeros_like(ev))


LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
"""Names accepted by :func:`aggregate_loss` (and every ``loss_agg`` option)."""


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, norm_len: int | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar: how tokens and sequences are weighted.

    Peers differ here silently (see docs/algorithms.md); we make the choice a named option:

    * ``"token-mean"``: ``sum(l * m) / sum(m)``, every valid token of the batch weighs the same
      (DeepSpeed-Chat PPO; DAPO, Yu et al. 2025, "token-level policy gradient loss"; TRL GRPO's
      default ``loss_type="dapo"``).
    * ``"seq-mean-token-mean"``: the mean over rows of each row's token mean, so every sequence
      weighs the same whatever its length (GRPO as written in Shao et al. 2024, eq. 3).
    * ``"seq-mean-token-sum"``: the mean over rows of each row's token *sum* (longer responses
      weigh more).
    * ``"seq-mean-token-sum-norm"``: row sums divided by a constant ``norm_len``, then the mean
      over rows (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.1 and its
      reference code, which divides by the generation budget ``max_new_tokens``); no length
      bias and no dependence on the batch's token count.

    Gradient accumulation: with equal-sized micro-batches whose losses are averaged (as DeepSpeed
    does over its accumulation steps), the three ``seq-mean-*`` modes give the same gradient as
    one big micro-batch. ``"token-mean"`` does only when every micro-batch holds the same number
    of valid tokens: it weighs tokens equally *within* a micro-batch, micro-batches equally
    across them.

    Fully masked rows are excluded from every mean (they neither add 0 to the numerator nor 1
    to the number of rows). An all-masked batch gives a 0 that still carries a graph
    (``backward`` works and gives zero gradients), never ``nan``. Masked-out positions may hold
    ``inf``/``nan``: they are selected away as in :func:`masked_sum`.

    Args:
        per_token: Per-token loss ``(B, T)``.
        mask: ``(B, T)``, float or bool, 1 = valid.
        mode: One of :data:`LOSS_AGG_MODES`.
        norm_len: The constant divisor for ``"seq-mean-token-sum-norm"``; defaults to ``T``.
            Pass the generation budget so that batches whose longest response is shorter than
            the budget are not up-weighted. Ignored by the other modes.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: If ``mode`` is not one of :data:`LOSS_AGG_MODES` or ``norm_len < 1``.
    """
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg={mode!r} is not supported; expected one of {LOSS_AGG_MODES}")
    valid = _valid(mask)
    has_tokens = valid.any(dim=-1).to(per_token.dtype)  # (B,) 1 for rows with >= 1 valid token
    num_rows = has_tokens.sum().clamp(min=1.0)
    if mode == "seq-mean-token-mean":
        per_row = masked_mean(per_token, mask, dim=-1)  # (B,), 0 for empty rows
    else:
        per_row = masked_sum(per_token, mask, dim=-1)  # (B,)
        if mode == "seq-mean-token-sum-norm":
            norm = per_token.shape[-1] if norm_len is None else norm_len
            if norm < 1:
                raise ValueError(f"norm_len={norm_len!r} must be >= 1")
            per_row = per_row / norm
    # Empty rows already contribute exactly 0 to the sum; they are only kept out of the count.
    return (per_row * has_tokens).sum() / num_rows


# --------------------------------------------------------------------------------------------
# KL estimators and reward shaping
# --------------------------------------------------------------------------------------------


def kl_penalty(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    From J. Schulman, "Approximating KL Divergence" (2020), with
    ``log_ratio = log pi(y) - log pi_ref(y)``:

    * ``k1 = log_ratio``: unbiased, high variance, can be negative per token.
    * ``k2 = 0.5 * log_ratio**2``: biased, low variance, always >= 0.
    * ``k3 = exp(-log_ratio) - 1 + log_ratio``: unbiased, low variance, always >= 0.

    Deviation: for k3 the log-ratio is clamped to ``[-20, 20]`` (the whole expression, not only
    the ``exp``) so ``exp`` cannot overflow and the estimate stays >= 0. Clamping only inside the
    ``exp`` would leave a gradient of +1 for ``log_ratio < -20``, pushing the policy *further*
    from the reference; with the full clamp the gradient is 0 there instead.

    Args:
        logprobs: Log-probs of the sampled tokens under the policy, ``(B, T)``.
        ref_logprobs: Log-probs of the same tokens under the reference policy, ``(B, T)``.
        estimator: One of ``"k1"``, ``"k2"``, ``"k3"``.

    Returns:
        Per-token KL estimates ``(B, T)``, unmasked (multiply by the response mask).

    Raises:
        ValueError: If ``estimator`` is not one of the supported names.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not supported; expected one of {KL_ESTIMATORS}")
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    log_ratio = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return torch.exp(-log_ratio) - 1.0 + log_ratio


@dataclass(frozen=True, eq=False)
class ShapedRewards:
    """Per-token rewards for PPO.

    Attributes:
        rewards: ``(B, T)`` ``-kl_coef * kl``, plus the clipped score at the last valid token.
        kl: ``(B, T)`` per-token KL estimate, 0 on masked positions.
    """

    rewards: torch.Tensor
    kl: torch.Tensor


def _last_valid_one_hot(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(B, T)``: True only at the last valid position of each row (none for empty rows)."""
    valid = _valid(mask)
    positions = torch.arange(valid.shape[-1], device=valid.device)  # (T,)
    # argmax returns the first maximum; positions * valid is strictly increasing over valid
    # entries, so its maximum is the last valid index. An empty row gives 0, filtered below.
    last = (positions * valid).argmax(dim=-1, keepdim=True)  # (B, 1)
    return (positions == last) & valid.any(dim=-1, keepdim=True)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 0.1,
    clip_reward: float | None = 5.0,
    estimator: KLEstimator = "k1",
) -> ShapedRewards:
    """Per-token rewards: a KL penalty at every token plus the sequence score at the last token.

    InstructGPT's RL objective (Ouyang et al. 2022, eq. 2; Stiennon et al. 2020, sec. 3.4)
    ``r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))``, spread over tokens as in DeepSpeed-Chat:
    ``rewards_t = -kl_coef * kl_t``, and ``clamp(score, -clip_reward, clip_reward)`` is added at
    the last valid token of each row. Rows with no valid token get no score.

    Rewards are not detached; callers normally compute them under ``torch.no_grad()``.

    Args:
        scores: Sequence-level reward-model scores ``(B,)``.
        logprobs: Policy log-probs of the response tokens ``(B, T)``.
        ref_logprobs: Reference-policy log-probs of the same tokens ``(B, T)``.
        mask: Response mask ``(B, T)``, float or bool, 1 = valid.
        kl_coef: KL penalty coefficient (``beta``).
        clip_reward: Scores are clamped to ``[-clip_reward, clip_reward]``; None disables it.
        estimator: KL estimator passed to :func:`kl_penalty`.

    Returns:
        :class:`ShapedRewards` with ``rewards`` and ``kl``, both ``(B, T)`` and 0 on padding.

    Raises:
        ValueError: If ``estimator`` is not supported.
    """
    valid = _valid(mask)
    # Padding log-probs may be -inf or garbage: zero them before the (non-linear) estimator.
    logprobs, ref_logprobs = _zero_invalid(logprobs, valid), _zero_invalid(ref_logprobs, valid)
    kl = kl_penalty(logprobs, ref_logprobs, estimator) * mask.to(logprobs.dtype)
    scores = scores.to(logprobs.dtype)
    if clip_reward is not None:
        scores = scores.clamp(-clip_reward, clip_reward)
    at_last = _last_valid_one_hot(mask)  # (B, T)
    score_per_token = torch.where(at_last, scores[:, None], torch.zeros_like(kl))  # (B, T)
    return ShapedRewards(rewards=-kl_coef * kl + score_per_token, kl=kl)


# --------------------------------------------------------------------------------------------
# Advantage estimation
# --------------------------------------------------------------------------------------------


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

    Valid tokens must be a prefix of each row (response, then padding). Rewards and values at
    padding positions are ignored. Computed with a backwards loop over ``T`` that builds a list
    and stacks it, so no autograd tensor is modified in place.

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
        next_value = v[:, t]  # already 0 where masked
        next_adv = adv
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
    the KL penalty sits in the per-token reward. Valid tokens must be a prefix of each row;
    rewards at padding are ignored and the return there is 0.

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
        running = (r[:, t] + gamma * running) * m[:, t]
        returns_reversed.append(running)
    return torch.stack(returns_reversed[::-1], dim=-1)  # (B, T)


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Pairwise accuracy (the one home of the tie rule)
# --------------------------------------------------------------------------------------------


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor | None = None, *,
                  tie: float = 0.5) -> torch.Tensor:
    """Fraction of pairs whose ``chosen`` score beats the ``rejected`` one; a tie counts ``tie``.

    ``mean(1[chosen > rejected] + tie * 1[chosen == rejected])`` over the valid pairs. With the
    default ``tie=0.5`` a constant scorer (an untrained reward model) scores 0.5, not 0, and the
    value is the Mann-Whitney / ROC-AUC estimate of ``P(chosen > rejected)``. ``tie=0.0`` is the
    convention of DPO-style ``reward_accuracy`` metrics (TRL's): ties count as wrong.

    Args:
        chosen: Scores of the preferred items, ``(B,)`` (or any shape broadcastable with ``rejected``).
        rejected: Scores of the other items, same or broadcastable shape.
        mask: Which pairs count, broadcastable to the pair shape; None: all of them.
        tie: Credit for ``chosen == rejected``, in [0, 1].

    Returns:
        0-dim, no graph; 0 when no pair counts (the masked-mean convention of this module).
    """
    dtype = chosen.dtype if chosen.is_floating_point() else torch.float32
    with torch.no_grad():
        wins = (chosen > rejected).to(dtype) + tie * (chosen == rejected).to(dtype)
        return masked_mean(wins, torch.ones_like(wins) if mask is None else mask)


def ranked_pairs(truth: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` bool: ``[i, j]`` is True when ``truth[i] > truth[j]`` (item i should rank above j).

    For a 0/1 verifier these are exactly the (correct, incorrect) pairs.
    """
    return truth[:, None] > truth[None, :]


def ranking_agreement(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """How often ``scores`` order two items the way ``truth`` does: :func:`pair_accuracy` over all
    :func:`ranked_pairs` of ``truth`` (ties in ``scores`` count 0.5, pairs tied in ``truth`` are skipped).

    With a 0/1 ``truth`` (a verifier) it is the ROC AUC of ``scores`` as a detector of correct
    items: 1 = every correct item scores above every incorrect one, 0.5 = no better than chance,
    below 0.5 = ranked against the truth (a reward model being hacked). Example: scores
    ``[1, 2, 3, 3]``, truth ``[1, 0, 0, 1]``: pairs (0, 1), (0, 2), (3, 1), (3, 2) score
    0 + 0 + 1 + 0.5 = 1.5 of 4 = 0.375.

    Args:
        scores: ``(N,)`` the scores being judged (e.g. a reward model's).
        truth: ``(N,)`` the ground truth (e.g. a verifier's scores).

    Returns:
        0-dim; 0 when ``truth`` has no ranked pair (check ``ranked_pairs(truth).any()``).
    """
    return pair_accuracy(scores[:, None], scores[None, :], ranked_pairs(truth))


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


# --------------------------------------------------------------------------------------------
# Preference optimisation (offline): DPO and its variants, SimPO, ORPO, KTO
# --------------------------------------------------------------------------------------------

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo", "hinge")


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each response: the masked sum (or mean) of its token log-probs.

    ``average=False`` gives ``log pi(y|x)`` (DPO, IPO, KTO); ``average=True`` gives the
    length-normalised ``log pi(y|x) / |y|`` of SimPO and ORPO. A row with no valid token gives 0.

    Args:
        token_logprobs: ``(B, T)`` log-probs of the response tokens.
        mask: ``(B, T)``, float or bool, 1 = response token.
        average: Divide each row's sum by its number of valid tokens.

    Returns:
        ``(B,)``, carrying the graph of ``token_logprobs``.
    """
    if average:
        return masked_mean(token_logprobs, mask, dim=-1)
    return masked_sum(token_logprobs, mask, dim=-1)


@dataclass(frozen=True, eq=False)
class DPOLossOutput:
    """Result of :func:`dpo_loss` and :func:`simpo_loss`.

    Attributes:
        loss: 0-dim differentiable loss (mean over pairs).
        chosen_rewards: Detached ``(B,)`` implicit rewards of the chosen responses
            (``beta * (log pi - log pi_ref)`` for DPO, ``beta * avg log pi`` for SimPO).
        rejected_rewards: Detached ``(B,)`` implicit rewards of the rejected responses.
        accuracy: Detached fraction of pairs with ``chosen_reward > rejected_reward`` (ties count as wrong).
        margin: Detached mean of ``chosen_reward - rejected_reward``.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (accuracy, margin) of two ``(B,)`` reward tensors; a tie counts as wrong (``tie=0``)."""
    with torch.no_grad():
        return pair_accuracy(chosen, rejected, tie=0.0), (chosen - rejected).mean()


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)``, per element; finite for any ``z``."""
    losses = -F.logsigmoid(logits)
    if label_smoothing != 0.0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 0.5]")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """Direct preference optimisation and the variants that share its log-ratio margin.

    With ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` per pair:

    * ``"sigmoid"``: ``-log sigmoid(beta * h)`` (Rafailov et al. 2023, "Direct Preference
      Optimization", eq. 7). With ``label_smoothing = eps > 0`` this is conservative DPO
      (cDPO; Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"):
      ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``, i.e. the labels
      are assumed flipped with probability ``eps``.
    * ``"ipo"``: ``(h - 1 / (2 * beta))**2`` (Azar et al. 2023, "A General Theoretical Paradigm
      to Understand Learning from Human Preferences", eq. 17, with ``tau = beta``). Uses
      summed log-probs as the paper does; TRL length-normalises them for IPO.
    * ``"hinge"``: ``max(0, 1 - beta * h)`` (SLiC-HF, Zhao et al. 2023, "SLiC-HF: Sequence
      Likelihood Calibration with Human Feedback", eq. 2 calibration loss with ``delta = 1``
      and the reference log-ratio, as TRL's ``loss_type="hinge"``).

    ``logsigmoid`` keeps the sigmoid losses finite for log-ratios of any size (``±1e4``
    included); the reference log-probs are treated as constants.

    Args:
        policy_chosen_logps: ``(B,)`` sequence log-probs of the chosen responses (with graph).
        policy_rejected_logps: ``(B,)`` sequence log-probs of the rejected responses.
        ref_chosen_logps: ``(B,)`` the same under the frozen reference policy.
        ref_rejected_logps: ``(B,)``.
        beta: Inverse temperature of the implicit reward (KL strength); ``tau`` for IPO.
        loss_type: One of :data:`DPO_LOSS_TYPES`.
        label_smoothing: cDPO label-flip probability, ``[0, 0.5]``; only for ``"sigmoid"``.

    Returns:
        :class:`DPOLossOutput`.

    Raises:
        ValueError: On an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside
            ``[0, 0.5]`` or non-zero with a loss type other than ``"sigmoid"``.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; expected one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    _check_label_smoothing(label_smoothing)
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing={label_smoothing!r} is only defined for loss_type='sigmoid'")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * h, label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * h)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    accuracy, margin = _pair_metrics(chosen_rewards, rejected_rewards)
    return DPOLossOutput(loss=losses.mean(), chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                         accuracy=accuracy, margin=margin)


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """SimPO: reference-free, length-normalised preference loss (Meng et al. 2024, eq. 6).

    ``-log sigmoid(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma)``, where
    ``avg_logp(y) = log pi(y|x) / |y|`` (see :func:`sequence_logprobs` with ``average=True``)
    and ``gamma`` is the target reward margin. ``label_smoothing`` applies the cDPO smoothing
    to the same logit (as the SimPO reference code does). Defaults: ``beta = 2.0`` and
    ``gamma = 1.0`` (``gamma / beta = 0.5``), the paper's Llama-3-Base setting.

    Args:
        chosen_avg_logps: ``(B,)`` length-normalised log-probs of the chosen responses.
        rejected_avg_logps: ``(B,)`` length-normalised log-probs of the rejected responses.
        beta: Reward scale.
        gamma: Target margin.
        label_smoothing: In ``[0, 0.5]``.

    Returns:
        :class:`DPOLossOutput` with rewards ``beta * avg_logp``.

    Raises:
        ValueError: If ``beta <= 0`` or ``label_smoothing`` is outside ``[0, 0.5]``.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    _check_label_smoothing(label_smoothing)
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # (B,)
    losses = _smoothed_sigmoid_loss(logits, label_smoothing)
    chosen_rewards = beta * chosen_avg_logps.detach()
    rejected_rewards = beta * rejected_avg_logps.detach()
    accuracy, margin = _pair_metrics(chosen_rewards, rejected_rewards)
    return DPOLossOutput(loss=losses.mean(), chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                         accuracy=accuracy, margin=margin)


@dataclass(frozen=True, eq=False)
class ORPOLossOutput:
    """Result of :func:`orpo_loss`.

    Attributes:
        loss: 0-dim differentiable ``nll + lam * or_loss``.
        nll: Detached 0-dim NLL (SFT) term on the chosen responses.
        or_loss: Detached 0-dim odds-ratio term (before ``lam``).
        log_odds_ratio: Detached 0-dim mean of ``log(odds(y_w) / odds(y_l))``.
        chosen_rewards: Detached ``(B,)`` ``lam * avg_logp(y_w)`` (TRL's convention).
        rejected_rewards: Detached ``(B,)`` ``lam * avg_logp(y_l)``.
        accuracy: Detached fraction of pairs with ``chosen_reward > rejected_reward`` (ties count as wrong).
        margin: Detached mean of ``chosen_reward - rejected_reward``.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    or_loss: torch.Tensor
    log_odds_ratio: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


# log p of a response is <= 0, and its odds p / (1 - p) are infinite at log p = 0. Clamping log p
# to <= -1e-6 bounds the log-odds at about 13.8 (and the gradient at about 1e6) for degenerate
# inputs; the clamp never binds for a policy that puts less than 0.999999 average per-token
# probability on a response.
_ORPO_MAX_AVG_LOGP = -1e-6


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012, "Accurately
    Computing log(1 - exp(-|a|))"): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` far from it.
    Both branches are finite for ``x <= -1e-6``, so neither leaks nan into the gradient."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    lam: float = 0.1,
) -> ORPOLossOutput:
    """Odds-ratio preference optimisation (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", eqs. 6-7).

    ``L = L_SFT + lam * L_OR`` with ``L_OR = -log sigmoid(log(odds(y_w) / odds(y_l)))`` and
    ``odds(y) = P(y|x) / (1 - P(y|x))`` where ``P(y|x) = exp(avg_logp(y))`` is the
    length-normalised likelihood (eq. 4). ``log odds = a - log(1 - exp(a))`` is computed with
    :func:`_log1mexp`, and ``a`` is clamped to ``<= -1e-6`` (a deviation: at ``a = 0`` the odds
    are infinite), so an average log-prob of 0 gives a finite loss and gradient. Default
    ``lam = 0.1`` as in the paper's experiments and TRL's ``ORPOConfig.beta``.

    Args:
        chosen_avg_logps: ``(B,)`` length-normalised log-probs of the chosen responses.
        rejected_avg_logps: ``(B,)`` length-normalised log-probs of the rejected responses.
        chosen_nll: The SFT term: token-mean NLL of the chosen responses, 0-dim (or ``(B,)``,
            averaged).
        lam: Weight ``lambda`` of the odds-ratio term.

    Returns:
        :class:`ORPOLossOutput`.

    Raises:
        ValueError: If ``lam < 0``.
    """
    if lam < 0:
        raise ValueError(f"lam={lam!r} must be >= 0")
    a_w = chosen_avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP)
    a_l = rejected_avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds_ratio = (a_w - _log1mexp(a_w)) - (a_l - _log1mexp(a_l))  # (B,)
    or_losses = -F.logsigmoid(log_odds_ratio)  # (B,)
    nll = chosen_nll.mean()
    loss = nll + lam * or_losses.mean()
    chosen_rewards = lam * chosen_avg_logps.detach()
    rejected_rewards = lam * rejected_avg_logps.detach()
    accuracy, margin = _pair_metrics(chosen_rewards, rejected_rewards)
    return ORPOLossOutput(loss=loss, nll=nll.detach(), or_loss=or_losses.detach().mean(),
                          log_odds_ratio=log_odds_ratio.detach().mean(), chosen_rewards=chosen_rewards,
                          rejected_rewards=rejected_rewards, accuracy=accuracy, margin=margin)


@dataclass(frozen=True, eq=False)
class KTOLossOutput:
    """Result of :func:`kto_loss`.

    Attributes:
        loss: 0-dim differentiable loss (mean over all rows).
        rewards: Detached ``(B,)`` implicit rewards ``beta * (log pi - log pi_ref)``.
        z0: Detached 0-dim reference point ``max(kl_ref, 0)`` that was used.
        desirable_reward: Detached mean reward of the desirable rows (0 if there are none).
        undesirable_reward: Detached mean reward of the undesirable rows (0 if there are none).
    """

    loss: torch.Tensor
    rewards: torch.Tensor
    z0: torch.Tensor
    desirable_reward: torch.Tensor
    undesirable_reward: torch.Tensor


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """Kahneman-Tversky optimisation on unpaired feedback (Ethayarajh et al. 2024, eq. 8).

    With ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z0 = max(kl_ref, 0)``
    (detached: no gradient flows through it, as in the paper and TRL)::

        v(x, y) = lambda_D * sigmoid(beta * (r - z0))   if y is desirable
                  lambda_U * sigmoid(beta * (z0 - r))   if y is undesirable
        L       = mean(lambda_y - v(x, y))

    ``lambda_y - v`` is computed as ``lambda_y * sigmoid(-(...))`` (the same value, without the
    cancellation of ``1 - sigmoid`` near 1), finite for any log-ratio.

    Args:
        policy_logps: ``(B,)`` sequence log-probs under the policy (with graph).
        ref_logps: ``(B,)`` sequence log-probs under the reference.
        desirable: ``(B,)`` bool, True for desirable examples.
        kl_ref: Estimate of ``KL(pi || pi_ref)`` (0-dim tensor or float), clamped at 0 and
            detached here. The paper estimates it on mismatched (x, y') pairs of the batch.
        beta: Inverse temperature.
        desirable_weight: ``lambda_D``.
        undesirable_weight: ``lambda_U``. The paper recommends
            ``lambda_D * n_D / (lambda_U * n_U)`` in ``[1, 4/3]``.

    Returns:
        :class:`KTOLossOutput`.

    Raises:
        ValueError: If ``beta <= 0`` or a weight is negative.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"desirable_weight={desirable_weight!r} and undesirable_weight={undesirable_weight!r} "
                         "must be >= 0")
    z0 = torch.as_tensor(kl_ref, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0.0)
    logratios = policy_logps - ref_logps.detach()  # (B,)
    desirable = desirable.to(device=policy_logps.device, dtype=torch.bool)
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (logratios - z0)),
        undesirable_weight * torch.sigmoid(-beta * (z0 - logratios)),
    )  # (B,)
    with torch.no_grad():
        rewards = beta * logratios.detach()
        d = desirable.to(rewards.dtype)
        desirable_reward = masked_mean(rewards, d)
        undesirable_reward = masked_mean(rewards, 1.0 - d)
    return KTOLossOutput(loss=losses.mean(), rewards=rewards, z0=z0, desirable_reward=desirable_reward,
                         undesirable_reward=undesirable_reward)
