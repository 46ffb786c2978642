"""KL estimators and KL-shaped per-token rewards.

Part of :mod:`rlhf_algos.functional` (import from there). ``KL_ESTIMATORS`` lives here and only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ._stats import _valid, _zero_invalid

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")

# exp(20) ~ 4.9e8 is finite in fp32/bf16 (log-ratios should be computed in one of those, not fp16)
# and far beyond any ratio PPO can use; clamping log-ratios to this range keeps exp() finite for
# arbitrarily stale or broken log-probs.
_LOG_RATIO_CLAMP = 20.0


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

