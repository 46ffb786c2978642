"""Hand-checked tests for rlhf_algos.functional.

Every expected value is worked out by hand in the comment next to it; none is produced by calling
the function under test. Tensors are tiny (2-5 elements) so the arithmetic stays readable.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from rlhf_algos.functional import (
    GAEOutput,
    PolicyLossOutput,
    RewardLossOutput,
    SFTLossOutput,
    ShapedRewards,
    ValueLossOutput,
    explained_variance,
    gae,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    whiten,
)
from torch.testing import assert_close

LN2 = math.log(2.0)
LN1_5 = math.log(1.5)


def t(*rows: list[float] | float, requires_grad: bool = False) -> torch.Tensor:
    """Float32 tensor from literal rows."""
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32, requires_grad=requires_grad)


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def assert_finite(*tensors: torch.Tensor) -> None:
    for x in tensors:
        assert torch.isfinite(x).all(), x


# --------------------------------------------------------------------------------------------
# masked_sum / masked_mean / masked_var
# --------------------------------------------------------------------------------------------


def test_masked_sum_global_and_per_row() -> None:
    x = t([1.0, 2.0], [3.0, 4.0])
    mask = t([1.0, 0.0], [1.0, 1.0])
    # global: 1 + 3 + 4 = 8
    assert_close(masked_sum(x, mask), scalar(8.0))
    # per row: [1, 3 + 4] = [1, 7]
    assert_close(masked_sum(x, mask, dim=-1), t([1.0, 7.0]))
    # bool mask gives the same
    assert_close(masked_sum(x, mask.bool(), dim=-1), t([1.0, 7.0]))


def test_masked_sum_ignores_inf_and_nan_in_padding() -> None:
    x = t([1.0, math.inf, math.nan], requires_grad=True)
    mask = t([1.0, 0.0, 0.0])
    # 1 + (ignored) + (ignored) = 1 ; d/dx = mask = [1, 0, 0]
    out = masked_sum(x, mask)
    assert_close(out, scalar(1.0))
    out.backward()
    assert_close(x.grad, t([1.0, 0.0, 0.0]))


def test_masked_mean_global_per_row_and_fully_masked_row() -> None:
    x = t([1.0, 2.0], [3.0, 4.0], [5.0, 6.0])
    mask = t([1.0, 0.0], [1.0, 1.0], [0.0, 0.0])
    # global: (1 + 3 + 4) / 3 = 8 / 3
    assert_close(masked_mean(x, mask), scalar(8.0 / 3.0))
    # per row: [1/1, 7/2, 0/clamp(0, min=1)] = [1, 3.5, 0]
    assert_close(masked_mean(x, mask, dim=-1), t([1.0, 3.5, 0.0]))
    # fully masked tensor: 0 / 1 = 0, not nan
    assert_close(masked_mean(x, torch.zeros_like(mask)), scalar(0.0))


def test_masked_var_unbiased_biased_and_few_elements() -> None:
    x = t([1.0, 2.0, 3.0, 100.0])
    mask = t([1.0, 1.0, 1.0, 0.0])
    # mean = (1 + 2 + 3) / 3 = 2; squared deviations 1, 0, 1 -> sum 2
    # unbiased: 2 / (3 - 1) = 1 ; biased: 2 / 3
    assert_close(masked_var(x, mask), scalar(1.0))
    assert_close(masked_var(x, mask, unbiased=False), scalar(2.0 / 3.0))
    assert_close(masked_var(x, mask.bool()), scalar(1.0))
    # one valid element: unbiased undefined -> 0 ; biased = 0 / 1 = 0
    one = t([0.0, 1.0, 0.0, 0.0])
    assert_close(masked_var(x, one), scalar(0.0))
    assert_close(masked_var(x, one, unbiased=False), scalar(0.0))
    # no valid element: 0 for both, no nan
    none = torch.zeros(4)
    assert_close(masked_var(x, none), scalar(0.0))
    assert_close(masked_var(x, none, unbiased=False), scalar(0.0))


# --------------------------------------------------------------------------------------------
# whiten
# --------------------------------------------------------------------------------------------


def test_whiten_hand_values_and_padding_zero() -> None:
    x = t([1.0, 2.0], [3.0, 100.0])
    mask = t([1.0, 1.0], [1.0, 0.0])
    # valid: 1, 2, 3 -> mean 2, unbiased var 1 -> (x - 2) / sqrt(1 + 1e-8) ~ [-1, 0, 1]; pad -> 0
    assert_close(whiten(x, mask), t([-1.0, 0.0], [1.0, 0.0]))
    # shift_mean=False: mean 2 added back -> [1, 2, 3]; pad still 0
    assert_close(whiten(x, mask, shift_mean=False), t([1.0, 2.0], [3.0, 0.0]))


def test_whiten_gives_zero_mean_unit_variance_on_valid_elements() -> None:
    gen = torch.Generator().manual_seed(0)
    x = 3.0 + 5.0 * torch.randn(4, 6, generator=gen)
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0.0
    mask[3, 2:] = 0.0
    x = torch.where(mask.bool(), x, torch.full_like(x, 1e6))  # huge padding must not matter
    out = whiten(x, mask)
    valid = out[mask.bool()]
    # property check with torch's own unmasked statistics on the valid elements
    assert_close(valid.mean(), scalar(0.0), atol=1e-6, rtol=0)
    assert_close(valid.var(unbiased=True), scalar(1.0), atol=1e-5, rtol=0)
    assert (out[~mask.bool()] == 0).all()


def test_whiten_fully_masked_and_single_element_are_zero() -> None:
    x = t([5.0, -7.0])
    # no valid element -> all zeros, no nan
    assert_close(whiten(x, torch.zeros(2)), t([0.0, 0.0]))
    # one valid element: mean = 5, var = 0 -> (5 - 5) / sqrt(1e-8) = 0
    assert_close(whiten(x, t([1.0, 0.0])), t([0.0, 0.0]))


# --------------------------------------------------------------------------------------------
# kl_penalty
# --------------------------------------------------------------------------------------------


def test_kl_estimators_on_log_ratio_ln2() -> None:
    logprobs = t([LN2, -LN2])
    ref = t([0.0, 0.0])
    # log_ratio = [ln 2, -ln 2] = [0.693147, -0.693147]
    # k1 = log_ratio
    assert_close(kl_penalty(logprobs, ref, "k1"), t([LN2, -LN2]))
    # k2 = 0.5 * ln2^2 = 0.5 * 0.480453 = 0.240227 (both signs)
    assert_close(kl_penalty(logprobs, ref, "k2"), t([0.5 * LN2**2, 0.5 * LN2**2]))
    # k3(+ln2) = exp(-ln2) - 1 + ln2 = 0.5 - 1 + 0.693147 = 0.193147
    # k3(-ln2) = exp(+ln2) - 1 - ln2 = 2 - 1 - 0.693147 = 0.306853
    assert_close(kl_penalty(logprobs, ref, "k3"), t([0.5 - 1.0 + LN2, 2.0 - 1.0 - LN2]))
    # default is k1
    assert_close(kl_penalty(logprobs, ref), t([LN2, -LN2]))


def test_kl_estimators_extreme_log_ratios_are_finite_with_finite_gradients() -> None:
    for estimator in ("k1", "k2", "k3"):
        logprobs = t([1000.0, -1000.0], requires_grad=True)
        kl = kl_penalty(logprobs, t([0.0, 0.0]), estimator)
        kl.sum().backward()
        assert_finite(kl, logprobs.grad)
    logprobs = t([1000.0, -1000.0])
    # k2 = 0.5 * 1000^2 = 5e5
    assert_close(kl_penalty(logprobs, t([0.0, 0.0]), "k2"), t([5e5, 5e5]))
    # k3 clamps log_ratio to [-20, 20]:
    #   +1000 -> exp(-20) - 1 + 20 = 19.000000002 ; -1000 -> exp(20) - 1 - 20 = 485165174.4
    expected = t([math.exp(-20.0) + 19.0, math.exp(20.0) - 21.0])
    assert_close(kl_penalty(logprobs, t([0.0, 0.0]), "k3"), expected)


def test_kl_penalty_bad_estimator_raises_naming_argument_value_and_choices() -> None:
    with pytest.raises(ValueError, match=r"estimator='k4'.*'k1', 'k2', 'k3'"):
        kl_penalty(t([0.0]), t([0.0]), "k4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="estimator='kl'"):
        kl_shaped_rewards(t([1.0]), t([[0.0]]), t([[0.0]]), t([[1.0]]), estimator="kl")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# kl_shaped_rewards
# --------------------------------------------------------------------------------------------


def test_kl_shaped_rewards_places_clipped_score_at_last_valid_token() -> None:
    scores = t([10.0, -1.0])
    logprobs = t([-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0])
    ref = t([-1.5, -2.0, -2.0], [-2.0, -1.0, -math.inf])  # -inf at padding must not leak
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    out = kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1, clip_reward=5.0)
    assert isinstance(out, ShapedRewards)
    # k1: row 0 log_ratio = [-1+1.5, -2+2, -3+2] = [0.5, 0, -1]; row 1 = [-1+2, -1+1, pad] = [1, 0, 0]
    assert_close(out.kl, t([0.5, 0.0, -1.0], [1.0, 0.0, 0.0]))
    # clipped scores: clamp(10, -5, 5) = 5 ; clamp(-1, -5, 5) = -1
    # row 0: -0.1 * [0.5, 0, -1] = [-0.05, 0, 0.1]; + 5 at t=2  -> [-0.05, 0, 5.1]
    # row 1: -0.1 * [1, 0, 0]    = [-0.1, 0, 0];   + -1 at t=1 -> [-0.1, -1, 0]
    assert_close(out.rewards, t([-0.05, 0.0, 5.1], [-0.1, -1.0, 0.0]))
    # clip_reward=None: row 0 last token gets 0.1 + 10 = 10.1
    unclipped = kl_shaped_rewards(scores, logprobs, ref, mask.bool(), kl_coef=0.1, clip_reward=None)
    assert_close(unclipped.rewards, t([-0.05, 0.0, 10.1], [-0.1, -1.0, 0.0]))


def test_kl_shaped_rewards_fully_masked_row_and_first_token_only() -> None:
    scores = t([3.0, 2.0])
    logprobs = t([-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])
    ref = t([-2.0, -2.0, -2.0], [-3.0, -3.0, -3.0])
    mask = t([0.0, 0.0, 0.0], [1.0, 0.0, 0.0])
    out = kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.5, estimator="k2")
    # row 0 has no valid token: no kl, no score -> zeros
    # row 1: only t=0 valid; log_ratio = -1 + 3 = 2, k2 = 0.5 * 4 = 2
    #        reward_0 = -0.5 * 2 + 2 = 1
    assert_close(out.kl, t([0.0, 0.0, 0.0], [2.0, 0.0, 0.0]))
    assert_close(out.rewards, t([0.0, 0.0, 0.0], [1.0, 0.0, 0.0]))


# --------------------------------------------------------------------------------------------
# gae
# --------------------------------------------------------------------------------------------


def test_gae_gamma1_lam1_gives_reward_to_go_returns() -> None:
    rewards = t([[1.0, 2.0, 3.0]])
    values = t([[0.5, 1.0, 2.0]])
    mask = t([[1.0, 1.0, 1.0]])
    out = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert isinstance(out, GAEOutput)
    # delta_2 = 3 + 0 - 2 = 1          ; A_2 = 1
    # delta_1 = 2 + 2 - 1 = 3          ; A_1 = 3 + 1 = 4
    # delta_0 = 1 + 1 - 0.5 = 1.5      ; A_0 = 1.5 + 4 = 5.5
    assert_close(out.advantages, t([[5.5, 4.0, 1.0]]))
    # returns = A + V = [6, 5, 3] = reward-to-go [1+2+3, 2+3, 3]
    assert_close(out.returns, t([[6.0, 5.0, 3.0]]))


def test_gae_gamma_half_lam_half_by_hand() -> None:
    rewards = t([[1.0, 0.0, 2.0]])
    values = t([[0.5, 1.0, 1.0]])
    mask = t([[1.0, 1.0, 1.0]])
    out = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # gamma * lam = 0.25
    # delta_2 = 2 + 0.5 * 0 - 1 = 1          ; A_2 = 1
    # delta_1 = 0 + 0.5 * 1 - 1 = -0.5       ; A_1 = -0.5 + 0.25 * 1 = -0.25
    # delta_0 = 1 + 0.5 * 1 - 0.5 = 1        ; A_0 = 1 + 0.25 * -0.25 = 0.9375
    assert_close(out.advantages, t([[0.9375, -0.25, 1.0]]))
    # returns = A + V = [1.4375, 0.75, 2]
    assert_close(out.returns, t([[1.4375, 0.75, 2.0]]))


def test_gae_padding_after_response_contributes_nothing() -> None:
    # row 0: response of 2 tokens, then padding carrying garbage (large, inf, nan)
    # row 1: same response with no padding column garbage (value 0) -> must agree on valid tokens
    rewards = t([1.0, 2.0, 100.0], [1.0, 2.0, 0.0])
    values = t([0.5, 1.0, math.inf], [0.5, 1.0, 0.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 1.0, 0.0])
    out = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # V after the last valid token is 0 (episode ends):
    # delta_1 = 2 + 1 * 0 - 1 = 1        ; A_1 = 1
    # delta_0 = 1 + 1 * 1 - 0.5 = 1.5    ; A_0 = 1.5 + 0.95 * 1 = 2.45
    # returns = [2.45 + 0.5, 1 + 1, 0] = [2.95, 2, 0]
    assert_close(out.advantages, t([2.45, 1.0, 0.0], [2.45, 1.0, 0.0]))
    assert_close(out.returns, t([2.95, 2.0, 0.0], [2.95, 2.0, 0.0]))
    # a T=2 batch without the padding column gives the same valid values
    short = gae(t([[1.0, 2.0]]), t([[0.5, 1.0]]), t([[1.0, 1.0]]), gamma=1.0, lam=0.95)
    assert_close(short.advantages, t([[2.45, 1.0]]))


def test_gae_fully_masked_row_is_zero_and_outputs_are_detached() -> None:
    rewards = t([1.0, 1.0], [5.0, 5.0])
    values = t([0.0, 0.0], [3.0, math.nan], requires_grad=True)
    mask = t([1.0, 1.0], [0.0, 0.0]).bool()
    out = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: A_1 = 1 + 0 - 0 = 1 ; A_0 = 1 + 0 - 0 + 1 = 2 ; row 1 fully masked -> 0
    assert_close(out.advantages, t([2.0, 1.0], [0.0, 0.0]))
    assert_close(out.returns, t([2.0, 1.0], [0.0, 0.0]))
    assert not out.advantages.requires_grad
    assert not out.returns.requires_grad


# --------------------------------------------------------------------------------------------
# ppo_policy_loss
# --------------------------------------------------------------------------------------------


def _policy_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # old_logprobs = 0, so log_ratio = logprobs. Tokens:
    #   t0: A=+1, ratio 1.5 ; t1: A=+1, ratio 0.5 ; t2: A=-1, ratio 0.5 ; t3: A=-1, ratio 1.5
    #   t4: padding with huge advantage and an extreme log-ratio
    logprobs = t([[LN1_5, -LN2, -LN2, LN1_5, 1000.0]], requires_grad=True)
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    adv = t([[1.0, 1.0, -1.0, -1.0, 100.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0, 0.0]])
    return logprobs, old, adv, mask


def test_ppo_policy_loss_clip_active_and_inactive_both_signs() -> None:
    logprobs, old, adv, mask = _policy_case()
    out = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    assert isinstance(out, PolicyLossOutput)
    # per token max(-A * r, -A * clamp(r, 0.8, 1.2)):
    #   t0: max(-1.5, -1.2) = -1.2   (clip active: A>0, ratio above 1+eps)
    #   t1: max(-0.5, -0.8) = -0.5   (inactive: A>0, ratio below 1-eps is not clipped)
    #   t2: max( 0.5,  0.8) =  0.8   (clip active: A<0, ratio below 1-eps)
    #   t3: max( 1.5,  1.2) =  1.5   (inactive: A<0, ratio above 1+eps is not clipped)
    # loss = (-1.2 - 0.5 + 0.8 + 1.5) / 4 = 0.6 / 4 = 0.15 ; clip_frac = 2 / 4 = 0.5
    assert_close(out.loss, scalar(0.15))
    assert_close(out.clip_frac, scalar(0.5))
    # approx_kl = 0.5 * (ln1.5^2 + ln2^2 + ln2^2 + ln1.5^2) / 4
    #           = 0.5 * (0.164402 + 0.480453 + 0.480453 + 0.164402) / 4 = 0.161214
    assert_close(out.approx_kl, scalar(0.5 * (2 * LN1_5**2 + 2 * LN2**2) / 4))
    assert not out.clip_frac.requires_grad
    assert not out.approx_kl.requires_grad


def test_ppo_policy_loss_gradient_by_hand() -> None:
    logprobs, old, adv, mask = _policy_case()
    ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2).loss.backward()
    # unclipped tokens: d/dlogp (-A * exp(logp - old)) / N = -A * ratio / N
    #   t1: -(+1) * 0.5 / 4 = -0.125 ; t3: -(-1) * 1.5 / 4 = 0.375
    # clipped tokens t0, t2: the clamped ratio is constant -> 0 ; padding t4 -> 0
    assert_close(logprobs.grad, t([[0.0, -0.125, 0.0, 0.375, 0.0]]))


def test_ppo_policy_loss_no_clip_inside_trust_region() -> None:
    logprobs = t([[0.0, 0.1]], requires_grad=True)
    # ratio = [1, e^0.1 = 1.105171] both inside [0.8, 1.2]; A = [2, -1]
    # loss = (-2 * 1 + 1 * 1.105171) / 2 = -0.447414 ; clip_frac = 0
    out = ppo_policy_loss(logprobs, t([[0.0, 0.0]]), t([[2.0, -1.0]]), t([[1.0, 1.0]]))
    assert_close(out.loss, scalar((-2.0 + math.exp(0.1)) / 2))
    assert_close(out.clip_frac, scalar(0.0))


def test_ppo_policy_loss_extreme_log_ratios_finite_loss_and_gradient() -> None:
    logprobs = t([[1000.0, 1000.0, -1000.0, -1000.0]], requires_grad=True)
    out = ppo_policy_loss(logprobs, t([[0.0] * 4]), t([[1.0, -1.0, 1.0, -1.0]]), t([[1.0] * 4]))
    out.loss.backward()
    assert_finite(out.loss, out.clip_frac, out.approx_kl, logprobs.grad)
    # approx_kl = 0.5 * 1000^2 = 5e5 on every token
    assert_close(out.approx_kl, scalar(5e5))


def test_ppo_policy_loss_fully_masked_is_zero() -> None:
    logprobs = t([[0.3, -0.2]], requires_grad=True)
    out = ppo_policy_loss(logprobs, t([[0.0, 0.0]]), t([[1.0, 1.0]]), t([[0.0, 0.0]]))
    out.loss.backward()
    # 0 / clamp(0, min=1) = 0 for the loss and both metrics; gradient 0
    assert_close(out.loss, scalar(0.0))
    assert_close(out.clip_frac, scalar(0.0))
    assert_close(out.approx_kl, scalar(0.0))
    assert_close(logprobs.grad, t([[0.0, 0.0]]))


# --------------------------------------------------------------------------------------------
# ppo_value_loss
# --------------------------------------------------------------------------------------------


def test_ppo_value_loss_clipped_by_hand() -> None:
    values = t([[0.5, 0.5, 0.1, -0.5, 9.0]], requires_grad=True)
    old = t([[0.0, 0.0, 0.0, 0.0, 0.0]])
    returns = t([[1.0, 0.0, 1.0, -1.0, -9.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0, 0.0]])  # t4 is padding
    out = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    assert isinstance(out, ValueLossOutput)
    # v_clip = 0 + clamp(v - 0, -0.2, 0.2) = [0.2, 0.2, 0.1, -0.2]
    #   t0: err (0.5-1)^2 = 0.25 ; clip (0.2-1)^2 = 0.64 -> 0.64 (clip active)
    #   t1: err (0.5-0)^2 = 0.25 ; clip (0.2-0)^2 = 0.04 -> 0.25
    #   t2: err (0.1-1)^2 = 0.81 ; clip (0.1-1)^2 = 0.81 -> 0.81 (equal: not active)
    #   t3: err (-0.5+1)^2 = 0.25 ; clip (-0.2+1)^2 = 0.64 -> 0.64 (clip active)
    # loss = 0.5 * (0.64 + 0.25 + 0.81 + 0.64) / 4 = 0.5 * 2.34 / 4 = 0.2925 ; clip_frac = 2/4
    assert_close(out.loss, scalar(0.2925))
    assert_close(out.clip_frac, scalar(0.5))
    out.loss.backward()
    # t1 (unclipped): d/dv 0.5 * (v - R)^2 / N = (0.5 - 0) / 4 = 0.125
    # t2 (inside the clip range, both branches equal): (0.1 - 1) / 4 = -0.225
    # t0, t3 (clipped branch wins, clamp saturated) and padding t4: 0
    assert_close(values.grad, t([[0.0, 0.125, -0.225, 0.0, 0.0]]))


def test_ppo_value_loss_clip_disabled_and_fully_masked() -> None:
    values = t([[0.5, 0.5, 0.1, -0.5]])
    returns = t([[1.0, 0.0, 1.0, -1.0]])
    mask = t([[1.0, 1.0, 1.0, 1.0]])
    out = ppo_value_loss(values, torch.zeros_like(values), returns, mask, clip_eps=None)
    # 0.5 * (0.25 + 0.25 + 0.81 + 0.25) / 4 = 0.5 * 1.56 / 4 = 0.195
    assert_close(out.loss, scalar(0.195))
    assert_close(out.clip_frac, scalar(0.0))
    masked = ppo_value_loss(values, torch.zeros_like(values), returns, torch.zeros_like(mask))
    assert_close(masked.loss, scalar(0.0))
    assert_close(masked.clip_frac, scalar(0.0))


# --------------------------------------------------------------------------------------------
# pairwise_reward_loss
# --------------------------------------------------------------------------------------------


def test_pairwise_reward_loss_equal_rewards_is_ln2() -> None:
    out = pairwise_reward_loss(t([0.3, -1.0]), t([0.3, -1.0]))
    assert isinstance(out, RewardLossOutput)
    # -log sigmoid(0) = -log(1/2) = ln 2 = 0.693147 ; ties are not "correct" ; margin 0
    assert_close(out.loss, scalar(LN2))
    assert_close(out.accuracy, scalar(0.0))
    assert_close(out.margin, scalar(0.0))


def test_pairwise_reward_loss_by_hand_with_and_without_centring() -> None:
    chosen, rejected = t([1.0, 0.0]), t([0.0, 2.0])
    # diffs = [1, -2]
    # -log sigmoid(1)  = log(1 + e^-1) = 0.313262
    # -log sigmoid(-2) = log(1 + e^2)  = 2.126928
    # mean = (0.313262 + 2.126928) / 2 = 1.220095 ; accuracy = 1/2 ; margin = (1 - 2) / 2 = -0.5
    bt = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2
    out = pairwise_reward_loss(chosen, rejected)
    assert out.loss.item() == pytest.approx(bt, rel=1e-6)
    assert_close(out.accuracy, scalar(0.5))
    assert_close(out.margin, scalar(-0.5))
    # centring: sums = [1, 2] -> squares [1, 4] -> mean 2.5 ; 0.1 * 2.5 = 0.25 -> 1.470095
    centred = pairwise_reward_loss(chosen, rejected, center_coef=0.1)
    assert centred.loss.item() == pytest.approx(bt + 0.25, rel=1e-6)
    # equal rewards of 1: ln 2 + 0.1 * mean((1 + 1)^2) = 0.693147 + 0.4 = 1.093147
    eq = pairwise_reward_loss(t([1.0, 1.0]), t([1.0, 1.0]), center_coef=0.1)
    assert eq.loss.item() == pytest.approx(LN2 + 0.4, rel=1e-6)


def test_pairwise_reward_loss_extreme_margins_finite() -> None:
    chosen = t([1000.0, -1000.0], requires_grad=True)
    out = pairwise_reward_loss(chosen, t([0.0, 0.0]))
    out.loss.backward()
    # -log sigmoid(1000) ~ 0 ; -log sigmoid(-1000) ~ 1000 -> mean 500
    assert_close(out.loss, scalar(500.0))
    assert_finite(chosen.grad)
    assert not out.accuracy.requires_grad
    assert not out.margin.requires_grad


# --------------------------------------------------------------------------------------------
# sft_loss
# --------------------------------------------------------------------------------------------


def test_sft_loss_token_mean_nll_and_gradient() -> None:
    logp = t([-1.0, -2.0, -9.0], [-0.5, -7.0, -7.0], requires_grad=True)
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    out = sft_loss(logp, mask)
    assert isinstance(out, SFTLossOutput)
    # (1 + 2 + 0.5) / 3 = 3.5 / 3 = 1.166667 over 3 tokens
    assert_close(out.loss, scalar(3.5 / 3))
    assert int(out.num_tokens) == 3
    out.loss.backward()
    # d/dlogp = -1/3 on the 3 valid tokens, 0 elsewhere
    third = -1.0 / 3
    assert_close(logp.grad, t([third, third, 0.0], [third, 0.0, 0.0]))


def test_sft_loss_fully_masked_is_zero() -> None:
    out = sft_loss(t([[-math.inf, -3.0]]), t([[0.0, 0.0]]).bool())
    # 0 / clamp(0, min=1) = 0 even with -inf log-probs at masked positions
    assert_close(out.loss, scalar(0.0))
    assert int(out.num_tokens) == 0


# --------------------------------------------------------------------------------------------
# explained_variance
# --------------------------------------------------------------------------------------------


def test_explained_variance_by_hand() -> None:
    returns = t([1.0, 2.0, 3.0, 100.0])
    mask = t([1.0, 1.0, 1.0, 0.0])  # the 4th element is padding
    # Var[returns] over [1, 2, 3] = 1 (unbiased)
    # perfect critic: residual 0 -> 1 - 0 / 1 = 1
    assert_close(explained_variance(t([1.0, 2.0, 3.0, -100.0]), returns, mask), scalar(1.0))
    # constant critic at the mean: residual [-1, 0, 1], var 1 -> 1 - 1 / 1 = 0
    assert_close(explained_variance(t([2.0, 2.0, 2.0, 0.0]), returns, mask), scalar(0.0))
    # values [1, 2, 2]: residual [0, 0, 1], mean 1/3, squared devs 1/9 + 1/9 + 4/9 = 2/3,
    # unbiased var = (2/3) / 2 = 1/3 -> 1 - (1/3) / 1 = 2/3
    assert_close(explained_variance(t([1.0, 2.0, 2.0, 0.0]), returns, mask), scalar(2.0 / 3.0))


def test_explained_variance_zero_variance_conventions() -> None:
    values = t([0.0, 5.0])
    # constant returns (Var = 0): defined as 0
    assert_close(explained_variance(values, t([3.0, 3.0]), t([1.0, 1.0])), scalar(0.0))
    # single valid element (unbiased Var = 0) and no valid element: 0, no nan
    assert_close(explained_variance(values, t([1.0, 2.0]), t([1.0, 0.0])), scalar(0.0))
    assert_close(explained_variance(values, t([1.0, 2.0]), t([0.0, 0.0])), scalar(0.0))


# --------------------------------------------------------------------------------------------
# Garbage at padding never reaches a gradient
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("garbage", [math.inf, -math.inf, math.nan])
def test_padding_garbage_gives_finite_values_and_gradients(garbage: float) -> None:
    mask = t([[1.0, 1.0, 0.0]])

    def leaf() -> torch.Tensor:  # valid entries [-1, -2], padding = garbage
        return t([[-1.0, -2.0, garbage]], requires_grad=True)

    bad = t([[-1.5, -2.5, garbage]])
    for estimator in ("k1", "k2", "k3"):
        x = leaf()
        out = kl_shaped_rewards(t([1.0]), x, bad, mask, estimator=estimator)
        out.rewards.sum().backward()
        assert_finite(out.rewards, out.kl, x.grad)
        assert x.grad[0, 2] == 0
    cases = [
        lambda x: masked_var(x, mask),
        lambda x: whiten(x, mask).pow(2).sum(),
        lambda x: ppo_policy_loss(x, bad, bad, mask).loss,
        lambda x: ppo_value_loss(x, bad, bad, mask).loss,
        lambda x: sft_loss(x, mask).loss,
    ]
    for fn in cases:
        x = leaf()
        loss = fn(x)
        loss.backward()
        assert_finite(loss, x.grad)
        assert x.grad[0, 2] == 0
    # gae: padding reward/value garbage; same valid result as zeros there
    # delta_1 = -2 + 0 - (-2.5) = 0.5 ; A_1 = 0.5 ; delta_0 = -1 + (-2.5) - (-1.5) = -2 ; A_0 = -2 + 0.5 = -1.5
    out = gae(leaf(), bad, mask, gamma=1.0, lam=1.0)
    assert_close(out.advantages, t([[-1.5, 0.5, 0.0]]))


# --------------------------------------------------------------------------------------------
# Output types
# --------------------------------------------------------------------------------------------


def test_outputs_are_frozen_dataclasses() -> None:
    out = ppo_value_loss(t([[1.0]]), t([[1.0]]), t([[1.0]]), t([[1.0]]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.loss = scalar(0.0)  # type: ignore[misc]
    for cls in (ShapedRewards, GAEOutput, PolicyLossOutput, ValueLossOutput, RewardLossOutput, SFTLossOutput):
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
