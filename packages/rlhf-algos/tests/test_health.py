"""RL health: pairwise accuracy and reward/verifier agreement, the sampling/training log-prob
mismatch, the rollout metrics an online algorithm reports from them, and HealthMonitor's warnings.

Every expected value is worked out by hand in a comment.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from rlhf_algos import (
    PPO,
    HealthMonitor,
    HealthThresholds,
    PPOConfig,
    pair_accuracy,
    ranked_pairs,
    ranking_agreement,
    sampling_mismatch,
)
from rlhf_algos.health import _RunningFit, fitted_rise, pool_agreement
from rlhf_algos.testing import FirstTokenReward, ScriptedPolicy, TinyCritic, TinyPolicy

V, PAD, EOS = 10, 0, 1


# --------------------------------------------------------------------------------------------
# pair_accuracy / ranking_agreement
# --------------------------------------------------------------------------------------------


def test_pair_accuracy_counts_a_tie_as_half_by_default() -> None:
    chosen = torch.tensor([2.0, 1.0, 3.0, 0.0])
    rejected = torch.tensor([1.0, 1.0, 4.0, 0.0])
    # win, tie, loss, tie: (1 + 0.5 + 0 + 0.5) / 4 = 0.5; ties as wrong (tie=0): 1 / 4
    assert pair_accuracy(chosen, rejected).item() == 0.5
    assert pair_accuracy(chosen, rejected, tie=0.0).item() == 0.25
    assert pair_accuracy(torch.zeros(0), torch.zeros(0)).item() == 0.0  # no pair: 0, not nan


def test_ranking_agreement_of_a_reward_model_ranking_against_the_verifier() -> None:
    truth = torch.tensor([1.0, 0.0, 0.0, 1.0])  # items 0 and 3 correct; pairs (0,1) (0,2) (3,1) (3,2)
    assert ranked_pairs(truth).sum().item() == 4
    # every correct item scored below every incorrect one: 0 of 4 pairs right
    assert ranking_agreement(torch.tensor([0.1, 0.9, 0.8, 0.2]), truth).item() == 0.0
    # 2.5 > 2 right; 2.5 < 3, 0 < 2, 0 < 3 wrong: 1 of 4 = 0.25
    assert ranking_agreement(torch.tensor([2.5, 2.0, 3.0, 0.0]), truth).item() == 0.25
    # as above with item 0 tied with item 1: 0.5 of 4 = 0.125
    assert ranking_agreement(torch.tensor([2.0, 2.0, 3.0, 0.0]), truth).item() == 0.125
    # the docstring's example: 0 + 0 + 1 + 0.5 of 4 = 0.375
    assert ranking_agreement(torch.tensor([1.0, 2.0, 3.0, 3.0]), truth).item() == 0.375
    # a reward model ordering them like the verifier: 1
    assert ranking_agreement(torch.tensor([5.0, 1.0, 2.0, 4.0]), truth).item() == 1.0
    # graded truth: pairs are every (i, j) with truth_i > truth_j: (0,1) (0,2) (1,2); scores order 2 of them
    assert ranking_agreement(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 0.5, 0.0])).item() == pytest.approx(2 / 3)


def test_ranking_agreement_without_a_ranked_pair_is_zero_and_pooled_as_none() -> None:
    truth = torch.ones(3)  # every answer correct: no (correct, incorrect) pair
    assert not ranked_pairs(truth).any()
    assert ranking_agreement(torch.tensor([1.0, 2.0, 3.0]), truth).item() == 0.0
    assert pool_agreement({"rm_verifier_wins": 0.0, "rm_verifier_pairs": 0.0})["rm_verifier_agreement"] is None


def test_pool_agreement_pools_the_pairs_of_every_rank() -> None:
    # rank A: 1 pair, right; rank B: 3 pairs, all wrong. Averaged over ranks: wins 0.5, pairs 2.
    # Pooled: 1 of 4 = 0.25 (the mean of the two ranks' agreements would say 0.5)
    out = pool_agreement({"rm_verifier_wins": 0.5, "rm_verifier_pairs": 2.0, "reward_mean": 1.0})
    assert out == {"rm_verifier_agreement": 0.25, "rm_verifier_pairs": 2.0, "reward_mean": 1.0}


# --------------------------------------------------------------------------------------------
# sampling_mismatch (gen_kl_error)
# --------------------------------------------------------------------------------------------


def test_identical_sampling_and_training_logprobs_give_exactly_zero() -> None:
    lp = torch.tensor([[-0.3, -2.0, -1e-4], [-5.0, -0.7, -0.1]])
    m = sampling_mismatch(lp, lp.clone(), torch.ones_like(lp))
    assert m.gen_kl_error.item() == 0.0 and m.gen_logprob_gap_max.item() == 0.0


def test_a_known_difference_gives_the_hand_computed_k3() -> None:
    sample = torch.tensor([[math.log(0.5), -1.0, 0.0]])
    train = torch.tensor([[math.log(0.25), -1.0, float("-inf")]])  # the last token is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    m = sampling_mismatch(sample, train, mask)
    # token 0: log_ratio = ln 2, k3 = exp(-ln 2) - 1 + ln 2 = ln 2 - 0.5 = 0.193147; token 1: 0
    # mean over the 2 valid tokens: 0.0965736; largest gap: ln 2
    assert m.gen_kl_error.item() == pytest.approx((math.log(2) - 0.5) / 2, rel=1e-6)
    assert m.gen_logprob_gap_max.item() == pytest.approx(math.log(2), rel=1e-6)


# --------------------------------------------------------------------------------------------
# the rollout metrics of an online algorithm
# --------------------------------------------------------------------------------------------


def test_rollout_reports_gen_kl_and_the_monitor_agreement() -> None:
    """Reward: first token 4 (a 'reward model' that likes the wrong answer); monitor (verifier): first
    token 3. Responses 3, 4, 5, 3 -> truth [1, 0, 0, 1], scores [0, 1, 0, 0]; pairs (0,1) 0, (0,2) tie
    0.5, (3,1) 0, (3,2) tie 0.5: 1 of 4 = 0.25. The scripted policy's log-probs are the trainer's own,
    so gen_kl_error is exactly 0."""
    actor = ScriptedPolicy(V, [[3, EOS], [4, EOS], [5, EOS], [3, EOS]])
    algo = PPO(PPOConfig(max_new_tokens=4), actor=actor, reference=actor.frozen_copy(), critic=TinyCritic(V),
               reward_fn=FirstTokenReward(4), monitor_fn=FirstTokenReward(3), eos_token_id=EOS, pad_token_id=PAD)
    exp = algo.generate_experience(torch.full((4, 2), 6), torch.ones(4, 2, dtype=torch.long))
    assert exp.monitor_scores.tolist() == [1.0, 0.0, 0.0, 1.0]
    metrics = algo.learn(exp)
    assert metrics["rm_verifier_agreement"] == 0.25
    assert metrics["rm_verifier_pairs"] == 4.0 and "rm_verifier_wins" not in metrics
    assert metrics["verifier_score_rollout"] == 0.5
    assert metrics["gen_kl_error"] == 0.0 and metrics["gen_logprob_gap_max"] == 0.0


def test_sampled_rollout_of_the_tiny_policy_is_on_policy() -> None:
    actor = TinyPolicy(V, seed=1)
    algo = PPO(PPOConfig(max_new_tokens=6, temperature=0.7), actor=actor, reference=actor.frozen_copy(),
               critic=TinyCritic(V), reward_fn=FirstTokenReward(3), eos_token_id=EOS, pad_token_id=PAD)
    exp = algo.generate_experience(torch.randint(2, V, (8, 3), generator=torch.Generator().manual_seed(0)),
                                   torch.ones(8, 3, dtype=torch.long))
    assert exp.sample_logprobs.shape == exp.logprobs.shape
    metrics = algo.learn(exp)
    assert 0.0 <= metrics["gen_kl_error"] < 1e-10 and metrics["gen_logprob_gap_max"] < 1e-5
    assert "rm_verifier_agreement" not in metrics  # no monitor


# --------------------------------------------------------------------------------------------
# HealthMonitor
# --------------------------------------------------------------------------------------------


def rows(reward: list[float], kl: list[float], std: float = 0.5, **extra: list[float]) -> list[dict]:
    return [{"iteration": i + 1, "reward_mean": r, "reward_std": std, "kl_to_ref": k,
             **{name: v[i] for name, v in extra.items()}} for i, (r, k) in enumerate(zip(reward, kl, strict=True))]


def feed(monitor: HealthMonitor, rs: list[dict]) -> list[tuple[int, str]]:
    return [(row["iteration"], w) for row in rs for w in monitor.update(row)]


def test_the_monitors_running_fit_equals_fitted_rise_at_every_length() -> None:
    # The monitor keeps running sums instead of the history; the rise and mean must be fitted_rise's.
    rng = random.Random(0)
    ys = [rng.gauss(0.3 + 0.01 * i, 0.1) for i in range(500)]
    fit = _RunningFit()
    for n, y in enumerate(ys, start=1):
        fit.add(y)
        if n >= 2:
            assert fit.rise() == pytest.approx(fitted_rise(ys[:n]), rel=1e-9, abs=1e-12)
            assert fit.mean == pytest.approx(sum(ys[:n]) / n, rel=1e-12)
    assert (fit.first, fit.last) == (ys[0], ys[-1])
    fit2 = _RunningFit()
    for y in (0.0, 1.0, 0.0, 1.0):
        fit2.add(y)
    assert fit2.rise() == pytest.approx(0.6)  # by hand, as test_fitted_rise


def test_fitted_rise() -> None:
    assert fitted_rise([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # a straight line: last - first
    assert fitted_rise([0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.6)  # slope 0.2 (Sxy 1 / Sxx 5), times 3


def test_flat_reward_while_the_kl_rises_warns_once() -> None:
    # reward alternates 0.50 / 0.51: fitted rise over 10 rows +-0.0027 (slope Sxy 0.025 / Sxx 82.5, times 9),
    # below 0.1 x reward_std 0.5 = 0.05; KL rises 0.1 -> 0.55: rise 0.45 > max(0.25 x mean 0.325, 0.01)
    reward = [0.50 + 0.01 * (i % 2) for i in range(12)]
    kl = [0.1 + 0.05 * i for i in range(12)]
    got = feed(HealthMonitor(HealthThresholds(window=10)), rows(reward, kl))
    assert len(got) == 1  # once at the onset, not at iterations 11 and 12 again
    it, message = got[0]
    assert it == 10
    assert "reward flat" in message and "iterations 1-10" in message and "kl_to_ref 0.1 -> 0.55" in message


def test_rising_reward_or_flat_kl_does_not_warn() -> None:
    kl = [0.1 + 0.05 * i for i in range(15)]
    # reward rises 0.03 per iteration: 0.27 over a window > 0.05
    assert feed(HealthMonitor(), rows([0.3 + 0.03 * i for i in range(15)], kl)) == []
    # flat reward, flat KL (0.2 +- 0.001): the policy is not drifting
    assert feed(HealthMonitor(), rows([0.5] * 15, [0.2 + 0.001 * (i % 2) for i in range(15)])) == []
    # fewer rows than the window: no verdict yet
    assert feed(HealthMonitor(), rows([0.5] * 14, kl[:14])) == []


def test_a_run_that_learned_and_levelled_off_does_not_warn() -> None:
    # A learning run: the reward climbs 0.5 -> 0.9 and levels off (0.9 - 0.4 x 0.85^i), the KL keeps
    # rising 0.01 per iteration. Over the last 15 rows alone the reward looks flat by iteration 35
    # (fitted rise 0.029 <= 0.1 x reward_std 0.5 = 0.05: the sliding window the rule used before warned
    # here); since the first iteration it rose 0.29, so the run gained something for its KL.
    reward = [0.9 - 0.4 * 0.85**i for i in range(40)]
    kl = [0.01 * i for i in range(40)]
    assert fitted_rise(reward[20:35]) <= 0.05 < fitted_rise(reward[:35])
    assert feed(HealthMonitor(), rows(reward, kl)) == []


def test_entropy_collapse_fires_at_each_onset() -> None:
    entropy = [0.3, 0.2, 0.1, 0.055, 0.04, 0.03, 0.2, 0.01]
    # 0.1 is 67% below the first 0.3: fine; 0.055 is 82% below (> 80%): warn; 0.04, 0.03: still
    # collapsed, no repeat; 0.2 recovers; 0.01 < the 0.05 floor: warn again
    got = feed(HealthMonitor(), rows([0.5] * 8, [0.1] * 8, entropy=entropy))
    assert [it for it, _ in got] == [4, 8]
    assert "entropy 0.055" in got[0][1] and "82% below the first iteration's 0.3" in got[0][1]
    assert "below the floor 0.05" in got[1][1]


def test_gen_kl_error_above_the_threshold_warns() -> None:
    gen_kl = [0.0, 1e-5, 5e-3, 6e-3, 1e-6, 2e-3]
    got = feed(HealthMonitor(), rows([0.5] * 6, [0.1] * 6, gen_kl_error=gen_kl, gen_logprob_gap_max=[0.1] * 6))
    assert [it for it, _ in got] == [3, 6]
    assert "gen_kl_error 0.005 > 0.001" in got[0][1]
    # a looser threshold: nothing
    loose = HealthMonitor(HealthThresholds(gen_kl_threshold=1e-2))
    assert feed(loose, rows([0.5] * 6, [0.1] * 6, gen_kl_error=gen_kl)) == []


def test_missing_metrics_switch_their_rule_off_and_thresholds_are_checked() -> None:
    assert HealthMonitor().update({"iteration": 1, "entropy": None, "gen_kl_error": None}) == []
    with pytest.raises(ValueError, match="window: 1 is not allowed"):
        HealthThresholds(window=1)
    with pytest.raises(ValueError, match="entropy_drop: 0.0 is not allowed"):
        HealthThresholds(entropy_drop=0.0)
