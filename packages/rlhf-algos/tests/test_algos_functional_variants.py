"""Hand-checked tests for the functions behind GRPO, RLOO, REINFORCE++ and the preference losses.

As in test_algos_functional.py, every expected value is worked out by hand in the comment next to
it (constants such as log(1 + e^-1) = 0.3132617 are written out), never produced by calling the
function under test. Edge cases from issue 4: a group of identical rewards, a group of size 1,
fully masked rows, extreme log-ratios (+-1e4).
"""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_algos.functional import (
    LOSS_AGG_MODES,
    DPOLossOutput,
    KTOLossOutput,
    ORPOLossOutput,
    aggregate_loss,
    discounted_returns,
    dpo_loss,
    group_advantages,
    kto_loss,
    masked_mean,
    orpo_loss,
    ppo_policy_loss,
    rloo_advantages,
    sequence_logprobs,
    simpo_loss,
)
from torch.testing import assert_close

LN2 = math.log(2.0)
SOFTPLUS_M1 = 0.31326168751822286  # log(1 + e^-1) = -log sigmoid(1)
SIGMOID_M1 = 0.2689414213699951  # sigmoid(-1) = 1 / (1 + e)


def t(*rows, requires_grad: bool = False, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=dtype, requires_grad=requires_grad)


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def assert_finite(*tensors: torch.Tensor) -> None:
    for x in tensors:
        assert torch.isfinite(x).all(), x


# --------------------------------------------------------------------------------------------
# aggregate_loss
# --------------------------------------------------------------------------------------------

X = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]
M = [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # row 2 fully masked


@pytest.mark.parametrize(
    ("mode", "norm_len", "expected", "grad_row0", "grad_row1"),
    [
        # (1 + 2 + 4 + 5 + 6) / 5 tokens = 3.6; d/dx = 1/5 per valid token
        ("token-mean", None, 3.6, 0.2, 0.2),
        # row means 1.5 and 5, row 2 excluded: (1.5 + 5) / 2 = 3.25; d/dx = 1 / (len * 2 rows)
        ("seq-mean-token-mean", None, 3.25, 0.25, 1.0 / 6.0),
        # row sums 3 and 15: (3 + 15) / 2 = 9; d/dx = 1/2
        ("seq-mean-token-sum", None, 9.0, 0.5, 0.5),
        # sums / T=3 -> 1 and 5: mean 3; d/dx = 1 / (3 * 2)
        ("seq-mean-token-sum-norm", None, 3.0, 1.0 / 6.0, 1.0 / 6.0),
        # sums / 6 -> 0.5 and 2.5: mean 1.5; d/dx = 1 / (6 * 2)
        ("seq-mean-token-sum-norm", 6, 1.5, 1.0 / 12.0, 1.0 / 12.0),
    ],
)
def test_aggregate_loss_modes_by_hand(mode: str, norm_len, expected: float, grad_row0: float,
                                      grad_row1: float) -> None:
    x = t(*X, requires_grad=True)
    out = aggregate_loss(x, t(*M), mode, norm_len=norm_len)
    assert_close(out, scalar(expected))
    out.backward()
    expected_grad = t([grad_row0, grad_row0, 0.0], [grad_row1, grad_row1, grad_row1], [0.0, 0.0, 0.0])
    assert_close(x.grad, expected_grad)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_all_masked_is_zero_with_a_graph_and_padding_garbage_is_ignored(mode: str) -> None:
    x = t([math.inf, math.nan], [1.0, -math.inf], requires_grad=True)
    out = aggregate_loss(x, torch.zeros(2, 2), mode)
    assert_close(out, scalar(0.0))
    out.backward()  # the gradient path is intact: zeros, not an error and not nan
    assert_close(x.grad, torch.zeros(2, 2))

    y = t([2.0, math.nan], [math.inf, 4.0], requires_grad=True)
    out = aggregate_loss(y, t([1.0, 0.0], [0.0, 1.0]), mode)  # one valid token per row: 2 and 4
    assert torch.isfinite(out)
    out.backward()
    assert_finite(y.grad)
    assert_close(y.grad[0, 1], scalar(0.0))
    assert_close(y.grad[1, 0], scalar(0.0))


def test_aggregate_loss_token_mean_is_masked_mean_and_bad_mode_raises() -> None:
    x, m = t(*X), t(*M)
    assert torch.equal(aggregate_loss(x, m, "token-mean"), masked_mean(x, m))
    with pytest.raises(ValueError, match=r"loss_agg='sum'.*token-mean"):
        aggregate_loss(x, m, "sum")
    with pytest.raises(ValueError, match="norm_len=0"):
        aggregate_loss(x, m, "seq-mean-token-sum-norm", norm_len=0)


def test_ppo_policy_loss_aggregation_modes_by_hand() -> None:
    # ratio = 1 (logprobs == old), so the per-token loss is -A: row 0 [-1, -2], row 1 [-3].
    lp = t([-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0])
    adv = t([1.0, 2.0, 9.0], [3.0, 9.0, 9.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    # token-mean: -(1 + 2 + 3) / 3 = -2 (the default, unchanged)
    assert_close(ppo_policy_loss(lp, lp, adv, mask).loss, scalar(-2.0))
    # seq-mean-token-mean: rows -1.5 and -3 -> -2.25
    assert_close(ppo_policy_loss(lp, lp, adv, mask, loss_agg="seq-mean-token-mean").loss, scalar(-2.25))
    # seq-mean-token-sum: rows -3 and -3 -> -3
    assert_close(ppo_policy_loss(lp, lp, adv, mask, loss_agg="seq-mean-token-sum").loss, scalar(-3.0))
    # seq-mean-token-sum-norm with norm_len 4: rows -0.75 and -0.75 -> -0.75
    out = ppo_policy_loss(lp, lp, adv, mask, loss_agg="seq-mean-token-sum-norm", norm_len=4)
    assert_close(out.loss, scalar(-0.75))
    assert_close(out.clip_frac, scalar(0.0))  # metrics stay token means


# --------------------------------------------------------------------------------------------
# group_advantages (GRPO / Dr. GRPO) and rloo_advantages
# --------------------------------------------------------------------------------------------


def test_group_advantages_by_hand_with_an_identical_group() -> None:
    rewards = t([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3, std = 0.57735; A = +-0.5 / 0.57735 = +-0.8660254
    # group 1: identical rewards -> exactly 0
    s = 0.8660254037844386
    out = group_advantages(rewards, 4, eps=0.0)
    assert_close(out, t([s, -s, -s, s, 0.0, 0.0, 0.0, 0.0]))
    assert torch.equal(out[4:], torch.zeros(4))
    # Dr. GRPO: no std, +-0.5
    assert_close(group_advantages(rewards, 4, scale=False), t([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0]))
    # with the default eps 1e-6 the scaled value moves by ~1.5e-6 only
    assert_close(group_advantages(rewards, 4), t([s, -s, -s, s, 0.0, 0.0, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_group_advantages_pairs_and_sizes() -> None:
    # group [1, 3]: mean 2, unbiased std sqrt((1 + 1) / 1) = sqrt(2) -> -+1/sqrt(2)
    r = 1.0 / math.sqrt(2.0)
    assert_close(group_advantages(t([1.0, 3.0]), 2, eps=0.0), t([-r, r]))
    # group of size 1: no baseline, 0 (not nan from std of one sample)
    out = group_advantages(t([3.0, -1.0]), 1)
    assert torch.equal(out, torch.zeros(2))


@pytest.mark.parametrize("scale", [True, False])
def test_identical_rewards_that_are_not_exact_in_floating_point_give_exactly_zero(scale: bool) -> None:
    # (0.1 + 0.1 + 0.1) / 3 != 0.1 in floating point; the advantage must still be exactly 0.
    for dtype in (torch.float32, torch.float64):
        rewards = torch.full((6,), 0.1, dtype=dtype)
        assert torch.equal(group_advantages(rewards, 3, scale=scale), torch.zeros(6, dtype=dtype))
        assert torch.equal(rloo_advantages(rewards, 3), torch.zeros(6, dtype=dtype))


def test_group_layout_errors_name_both_numbers() -> None:
    with pytest.raises(ValueError, match=r"N=5.*group_size=2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match=r"N=5.*group_size=2"):
        rloo_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size=0"):
        group_advantages(torch.zeros(4), 0)


def test_rloo_advantages_by_hand() -> None:
    # group [1, 0, 0, 1]: A_0 = 1 - (0 + 0 + 1)/3 = 2/3, A_1 = 0 - (1 + 0 + 1)/3 = -2/3, ...
    # group [2, 4]: 2 - 4 = -2, 4 - 2 = 2
    assert_close(rloo_advantages(t([1.0, 0.0, 0.0, 1.0]), 4), t([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert_close(rloo_advantages(t([2.0, 4.0, 7.0, 7.0]), 2), t([-2.0, 2.0, 0.0, 0.0]))
    # k = 1: no other sample -> 0
    assert torch.equal(rloo_advantages(t([5.0, -5.0]), 1), torch.zeros(2))


def test_advantages_are_detached() -> None:
    r = t([1.0, 2.0], requires_grad=True)
    assert not group_advantages(r, 2).requires_grad
    assert not rloo_advantages(r, 2).requires_grad


# --------------------------------------------------------------------------------------------
# discounted_returns, sequence_logprobs
# --------------------------------------------------------------------------------------------


def test_discounted_returns_by_hand() -> None:
    rewards = t([1.0, 2.0, 3.0], [4.0, 5.0, 9.0], [7.0, 7.0, 7.0])
    mask = t([1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    # gamma 0.5: row 0: G2 = 3, G1 = 2 + 1.5 = 3.5, G0 = 1 + 1.75 = 2.75
    #            row 1: the 9 at padding is ignored: G1 = 5, G0 = 4 + 2.5 = 6.5; row 2 all 0
    expected = t([2.75, 3.5, 3.0], [6.5, 5.0, 0.0], [0.0, 0.0, 0.0])
    assert_close(discounted_returns(rewards, mask, gamma=0.5), expected)
    # gamma 1: reward-to-go: [6, 5, 3], [9, 5, 0]
    assert_close(discounted_returns(rewards, mask), t([6.0, 5.0, 3.0], [9.0, 5.0, 0.0], [0.0, 0.0, 0.0]))


def test_sequence_logprobs_sum_and_average() -> None:
    lp = t([-1.0, -2.0, -math.inf], [-0.5, -0.5, -0.5], [-3.0, -3.0, -3.0])
    mask = t([1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    # sums: -3, -1.5, 0 (fully masked); averages: -1.5, -0.5, 0
    assert_close(sequence_logprobs(lp, mask), t([-3.0, -1.5, 0.0]))
    assert_close(sequence_logprobs(lp, mask, average=True), t([-1.5, -0.5, 0.0]))


# --------------------------------------------------------------------------------------------
# dpo_loss (sigmoid / cDPO / ipo)
# --------------------------------------------------------------------------------------------


def test_dpo_sigmoid_by_hand_with_gradient() -> None:
    # chosen log-ratio -1 - (-1) = 0, rejected -2 - (-1) = -1, h = 1
    pc, pr = t([-1.0], requires_grad=True), t([-2.0], requires_grad=True)
    rc, rr = t([-1.0]), t([-1.0])
    out = dpo_loss(pc, pr, rc, rr, beta=1.0)
    assert isinstance(out, DPOLossOutput)
    assert_close(out.loss, scalar(SOFTPLUS_M1))  # -log sigmoid(1) = log(1 + e^-1)
    assert_close(out.chosen_rewards, t([0.0]))
    assert_close(out.rejected_rewards, t([-1.0]))
    assert_close(out.accuracy, scalar(1.0))
    assert_close(out.margin, scalar(1.0))
    out.loss.backward()
    # d/dpc -log sigmoid(beta h) = -beta * sigmoid(-beta h) = -sigmoid(-1); d/dpr = +sigmoid(-1)
    assert_close(pc.grad, t([-SIGMOID_M1]))
    assert_close(pr.grad, t([SIGMOID_M1]))
    # beta 0.1: -log sigmoid(0.1) = log(1 + e^-0.1) = 0.6443967
    assert_close(dpo_loss(pc, pr, rc, rr, beta=0.1).loss, scalar(0.6443966600735709))


def test_dpo_equal_policy_and_reference_is_ln2_and_ties_are_not_accurate() -> None:
    x = t([-3.0, -7.0])
    out = dpo_loss(x, x - 1.0, x, x - 1.0)  # h = 0 for every pair
    assert_close(out.loss, scalar(LN2))
    assert_close(out.accuracy, scalar(0.0))
    assert_close(out.margin, scalar(0.0))


def test_cdpo_label_smoothing_by_hand() -> None:
    # h = 1, beta = 1, eps = 0.25: 0.75 * log(1 + e^-1) + 0.25 * log(1 + e) and log(1 + e) = 1 + log(1 + e^-1),
    # so the loss is log(1 + e^-1) + 0.25 = 0.5632617
    out = dpo_loss(t([-1.0]), t([-2.0]), t([-1.0]), t([-1.0]), beta=1.0, label_smoothing=0.25)
    assert_close(out.loss, scalar(SOFTPLUS_M1 + 0.25))


def test_ipo_by_hand_with_gradient() -> None:
    pc, pr = t([-1.0], requires_grad=True), t([-2.0], requires_grad=True)
    rc, rr = t([-1.0]), t([-1.0])
    # h = 1; beta 0.5: target 1 / (2 * 0.5) = 1 -> (1 - 1)^2 = 0
    assert_close(dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo").loss, scalar(0.0))
    # beta 0.25: target 2 -> (1 - 2)^2 = 1; d/dpc = 2 * (h - 2) = -2, d/dpr = +2
    out = dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="ipo")
    assert_close(out.loss, scalar(1.0))
    out.loss.backward()
    assert_close(pc.grad, t([-2.0]))
    assert_close(pr.grad, t([2.0]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_extreme_log_ratios_are_finite_with_finite_gradients(loss_type: str) -> None:
    pc = t([1e4, -1e4], requires_grad=True)
    pr = t([-1e4, 1e4], requires_grad=True)
    ref = torch.zeros(2)
    out = dpo_loss(pc, pr, ref, ref, loss_type=loss_type)
    out.loss.backward()
    assert_finite(out.loss, pc.grad, pr.grad, out.margin)
    if loss_type == "sigmoid":
        # h = +-2e4, beta 0.1: losses ~0 and 2000 -> mean 1000
        assert_close(out.loss, scalar(1000.0))


def test_dpo_argument_errors() -> None:
    x = t([-1.0])
    with pytest.raises(ValueError, match=r"loss_type='kto'.*\('sigmoid', 'ipo'\)"):
        dpo_loss(x, x, x, x, loss_type="kto")
    # SLiC-HF's hinge loss was removed (issue 12): no registered algorithm reached it
    with pytest.raises(ValueError, match=r"loss_type='hinge' is not supported"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="label_smoothing=0.1 is only defined for loss_type='sigmoid'"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="label_smoothing=0.7"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="beta=0"):
        dpo_loss(x, x, x, x, beta=0)


# --------------------------------------------------------------------------------------------
# simpo_loss
# --------------------------------------------------------------------------------------------


def test_simpo_by_hand() -> None:
    c, r = t([-1.0]), t([-1.5])
    # beta 2, gamma 1: logit 2 * 0.5 - 1 = 0 -> ln 2; rewards 2 * avg logp = -2, -3
    out = simpo_loss(c, r)
    assert_close(out.loss, scalar(LN2))
    assert_close(out.chosen_rewards, t([-2.0]))
    assert_close(out.rejected_rewards, t([-3.0]))
    assert_close(out.accuracy, scalar(1.0))
    assert_close(out.margin, scalar(1.0))
    # gamma 0: logit 1 -> log(1 + e^-1); with label smoothing 0.25: + 0.25 (see the cDPO test)
    assert_close(simpo_loss(c, r, gamma=0.0).loss, scalar(SOFTPLUS_M1))
    assert_close(simpo_loss(c, r, gamma=0.0, label_smoothing=0.25).loss, scalar(SOFTPLUS_M1 + 0.25))


def test_simpo_extreme_and_gradient() -> None:
    c = t([-1e4, 0.0], requires_grad=True)
    r = t([0.0, -1e4], requires_grad=True)
    out = simpo_loss(c, r)
    out.loss.backward()
    assert_finite(out.loss, c.grad, r.grad)
    # logits -2e4 - 1 and 2e4 - 1: losses ~2e4 + 1 and ~0 -> mean ~1e4
    assert_close(out.loss, scalar(10000.5))


# --------------------------------------------------------------------------------------------
# orpo_loss
# --------------------------------------------------------------------------------------------


def test_orpo_by_hand() -> None:
    # P(y_w) = 0.5 -> odds 1 -> log odds 0; P(y_l) = 0.2 -> odds 0.25 -> log odds ln 0.25
    # log odds ratio = ln 4; L_OR = -log sigmoid(ln 4) = log(1 + 1/4) = ln 1.25 = 0.2231436
    # loss = nll 2 + 0.1 * 0.2231436 = 2.0223144
    out = orpo_loss(t([math.log(0.5)]), t([math.log(0.2)]), scalar(2.0), lam=0.1)
    assert isinstance(out, ORPOLossOutput)
    assert_close(out.loss, scalar(2.0 + 0.1 * 0.22314355131420976))
    assert_close(out.log_odds_ratio, scalar(math.log(4.0)))
    assert_close(out.or_loss, scalar(0.22314355131420976))
    assert_close(out.nll, scalar(2.0))
    # rewards lam * avg logp: 0.1 ln 0.5 = -0.0693147 > 0.1 ln 0.2 = -0.1609438
    assert_close(out.accuracy, scalar(1.0))
    assert_close(out.margin, scalar(0.1 * math.log(0.5 / 0.2)))


def test_orpo_gradient_by_hand() -> None:
    # d L_OR / d a_w = -sigmoid(-ratio) * d(log odds)/da, d(log odds)/da = 1 / (1 - p).
    # At p_w = 0.5, p_l = 0.2: sigmoid(-ln 4) = 1/5; d/da_w = -(1/5) * 2 = -0.4; d/da_l = (1/5) * 1.25 = 0.25
    a_w = t([math.log(0.5)], requires_grad=True)
    a_l = t([math.log(0.2)], requires_grad=True)
    orpo_loss(a_w, a_l, scalar(0.0), lam=1.0).loss.backward()
    assert_close(a_w.grad, t([-0.4]))
    assert_close(a_l.grad, t([0.25]))


@pytest.mark.parametrize(("chosen", "rejected"), [(0.0, 0.0), (-1.0, 0.0), (0.0, -1.0), (-1e4, -1.0), (-1.0, -1e4)])
def test_orpo_average_logp_zero_or_extreme_is_finite(chosen: float, rejected: float) -> None:
    c = t([chosen], requires_grad=True)
    r = t([rejected], requires_grad=True)
    nll = t([0.5], requires_grad=True)
    out = orpo_loss(c, r, nll)
    out.loss.backward()
    assert_finite(out.loss, out.log_odds_ratio, c.grad, r.grad, nll.grad)
    if chosen == rejected == 0.0:
        # both clamped to the same value: log odds ratio 0 -> L_OR = ln 2
        assert_close(out.or_loss, scalar(LN2))


def test_orpo_negative_lambda_raises() -> None:
    with pytest.raises(ValueError, match="lam=-0.1"):
        orpo_loss(t([-1.0]), t([-2.0]), scalar(1.0), lam=-0.1)


# --------------------------------------------------------------------------------------------
# kto_loss
# --------------------------------------------------------------------------------------------


def test_kto_by_hand() -> None:
    # r = [1, 0]; z0 = 0; desirable row: 1 - sigmoid(1 * (1 - 0)) = sigmoid(-1); undesirable: 1 - sigmoid(0) = 0.5
    policy = t([1.0, 0.0], requires_grad=True)
    ref = t([0.0, 0.0])
    desirable = torch.tensor([True, False])
    out = kto_loss(policy, ref, desirable, 0.0, beta=1.0)
    assert isinstance(out, KTOLossOutput)
    assert_close(out.loss, scalar((SIGMOID_M1 + 0.5) / 2))
    assert_close(out.rewards, t([1.0, 0.0]))
    assert_close(out.desirable_reward, scalar(1.0))
    assert_close(out.undesirable_reward, scalar(0.0))
    # a negative KL estimate is clamped to 0: same loss
    assert_close(kto_loss(policy, ref, desirable, -3.0, beta=1.0).loss, out.loss)
    # gradient: d/dr_0 of sigmoid(-(r_0 - z0)) / 2 = -sigmoid(-1) sigmoid(1) / 2;
    # undesirable: d/dr_1 of sigmoid(-(z0 - r_1)) / 2 = sigmoid(0)^2 / 2 = 0.125
    out.loss.backward()
    assert_close(policy.grad, t([-SIGMOID_M1 * (1 - SIGMOID_M1) / 2, 0.125]))


def test_kto_reference_point_weights_and_no_gradient_through_z0() -> None:
    # z0 = 1: desirable 1 - sigmoid(1 - 1) = 0.5 (x lambda_D 2), undesirable 1 - sigmoid(1 - 0) = sigmoid(-1)
    kl_ref = torch.tensor(1.0, requires_grad=True)
    policy = t([1.0, 0.0], requires_grad=True)
    out = kto_loss(policy, t([0.0, 0.0]), torch.tensor([True, False]), kl_ref, beta=1.0, desirable_weight=2.0)
    assert_close(out.loss, scalar((2.0 * 0.5 + SIGMOID_M1) / 2))
    assert_close(out.z0, scalar(1.0))
    out.loss.backward()
    assert kl_ref.grad is None  # z0 is detached


def test_kto_extreme_log_ratios_finite() -> None:
    policy = t([1e4, -1e4, 1e4, -1e4], requires_grad=True)
    out = kto_loss(policy, torch.zeros(4), torch.tensor([True, True, False, False]), 1e4)
    out.loss.backward()
    assert_finite(out.loss, policy.grad, out.rewards)


def test_kto_argument_errors() -> None:
    x = t([0.0])
    with pytest.raises(ValueError, match="beta=0"):
        kto_loss(x, x, torch.tensor([True]), 0.0, beta=0.0)
    with pytest.raises(ValueError, match="undesirable_weight=-1"):
        kto_loss(x, x, torch.tensor([True]), 0.0, undesirable_weight=-1.0)
