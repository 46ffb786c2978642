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

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "GAEOutput",
    "KLEstimator",
    "PolicyLossOutput",
    "RewardLossOutput",
    "SFTLossOutput",
    "ShapedRewards",
    "ValueLossOutput",
    "explained_variance",
    "gae",
    "kl_penalty",
    "kl_shaped_rewards",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "sft_loss",
    "whiten",
]

KLEstimator = Literal["k1", "k2", "k3"]
_KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

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
    if estimator not in _KL_ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} is not supported; expected one of {_KL_ESTIMATORS}")
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
) -> PolicyLossOutput:
    """PPO clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``ratio = exp(clamp(logprobs - old_logprobs, -20, 20))`` and, per token,
    ``max(-A * ratio, -A * clamp(ratio, 1 - eps, 1 + eps))``, averaged over the valid tokens of
    the whole batch (token-mean, not sequence-mean). The clamp on the log-ratio is a deviation
    that keeps ``exp`` finite for broken inputs; it never binds for ratios PPO can use.

    ``old_logprobs`` and ``advantages`` are treated as constants (detached).

    Args:
        logprobs: Current-policy log-probs of the sampled tokens ``(B, T)``; carries the graph.
        old_logprobs: Rollout-time log-probs ``(B, T)``.
        advantages: Advantages ``(B, T)``, usually whitened.
        mask: Response mask ``(B, T)``, float or bool, 1 = valid.
        clip_eps: Clip range ``eps``.

    Returns:
        :class:`PolicyLossOutput`.
    """
    valid = _valid(mask)
    advantages = _zero_invalid(advantages.detach(), valid)
    log_ratio = _zero_invalid(logprobs - old_logprobs.detach(), valid)  # (B, T), 0 on padding
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
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
        accuracy: Detached fraction of pairs with ``r_chosen > r_rejected`` (ties count as wrong).
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
    with torch.no_grad():
        accuracy = (diff > 0).to(diff.dtype).mean()
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
