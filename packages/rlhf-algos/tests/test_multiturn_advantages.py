"""PPO, GRPO, RLOO and REINFORCE++ on multi-turn trajectories (rlhf_algos.multiturn), values worked out by hand.

The tiny constructed batch (one group of two samples of one prompt, P = 1):

    row 0:  m m e e m m      two model turns, two environment tokens between them
            turn reward 0.5 at the end of turn 1 (index 1), final reward 1.0 (at index 5)
    row 1:  m m m . . .      one turn, final reward 0.0

``response_mask`` (the loss mask) is 1 on the ``m`` only. The log-probs equal the reference's, so
every KL term is 0 and the rewards are exactly the ones above.
"""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_algos import (
    BATCH_WHITENED,
    GROUP_NORMALIZED,
    GRPO,
    LEAVE_ONE_OUT,
    Experience,
    GAEEstimator,
    GRPOConfig,
    PPOConfig,
    ReinforcePPConfig,
    RLOOConfig,
)
from rlhf_algos.environments import EpisodeBudget, StepResult
from rlhf_algos.multiturn import EnvRollout
from rlhf_algos.testing import TinyPolicy

MASK = torch.tensor([[1, 1, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float32)


def experience(values=None) -> Experience:
    N, R = MASK.shape
    lp = torch.full((N, R), -1.0) * MASK
    turn = torch.zeros(N, R)
    turn[0, 1] = 0.5
    scores = torch.tensor([1.0, 0.0])
    seqs = torch.ones(N, 1 + R, dtype=torch.long)
    return Experience(prompt_ids=seqs[:, :1], prompt_mask=torch.ones(N, 1, dtype=torch.long), meta=[{}, {}],
                      sequences=seqs, attention_mask=torch.ones(N, 1 + R, dtype=torch.long), prompt_len=1,
                      response_mask=MASK, logprobs=lp, ref_logprobs=lp.clone(),
                      values=(values if values is not None else torch.zeros(N, R)) * MASK, scores=scores,
                      train_scores=scores, turn_rewards=turn)


def test_ppo_gae_skips_the_environment_tokens() -> None:
    v = torch.tensor([[0.1, 0.2, 9.0, 9.0, 0.3, 0.4], [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]])
    est = GAEEstimator()(experience(v), PPOConfig(gamma=0.9, lam=0.5, whiten_advantages=False))
    # row 0, model steps 0, 1, 4, 5 (env tokens 2-3 are not steps; their 9.0 values are masked away):
    #   d5 = 1.0 - 0.4 = 0.6                      A5 = 0.6
    #   d4 = 0 + 0.9 * 0.4 - 0.3 = 0.06           A4 = 0.06 + 0.45 * 0.6 = 0.33
    #   d1 = 0.5 + 0.9 * 0.3 - 0.2 = 0.57         A1 = 0.57 + 0.45 * 0.33 = 0.7185
    #   d0 = 0 + 0.9 * 0.2 - 0.1 = 0.08           A0 = 0.08 + 0.45 * 0.7185 = 0.403325
    # row 1: d2 = 0 - 0.5 = -0.5, A2 = -0.5; d1 = 0.9*0.5 - 0.5 = -0.05, A1 = -0.05 - 0.225 = -0.275;
    #        d0 = -0.05, A0 = -0.05 + 0.45 * -0.275 = -0.17375
    want = torch.tensor([[0.403325, 0.7185, 0, 0, 0.33, 0.6], [-0.17375, -0.275, -0.5, 0, 0, 0]])
    torch.testing.assert_close(est.advantages, want)
    torch.testing.assert_close(est.returns, (want + v) * MASK)
    torch.testing.assert_close(est.rewards, torch.tensor([[0, 0.5, 0, 0, 0, 1.0], [0.0] * 6]))


def test_grpo_normalises_the_return_and_credits_each_turn_its_reward_to_go() -> None:
    est = GROUP_NORMALIZED(experience(), GRPOConfig(samples_per_prompt=2))
    # returns G = (0.5 + 1.0, 0.0) = (1.5, 0): mean 0.75, unbiased std 0.75 * sqrt(2), s = 1 / (std + 1e-6)
    s = 1 / (0.75 * math.sqrt(2) + 1e-6)
    # row 0: turn 1 -> s * (0.5 + 1.0 - 0.75) = 0.75 s; turn 2 -> s * (1.0 - 0.75) = 0.25 s
    # row 1: s * (0 - 0.75) = -0.75 s
    want = torch.tensor([[0.75 * s, 0.75 * s, 0, 0, 0.25 * s, 0.25 * s], [-0.75 * s] * 3 + [0, 0, 0]])
    torch.testing.assert_close(est.advantages, want)
    # the rewards as placed: s * 0.5 at the end of turn 1; A_0 - s * 0.5 = 0.25 s at the last model token
    torch.testing.assert_close(est.rewards, torch.tensor([[0, 0.5 * s, 0, 0, 0, 0.25 * s], [0, 0, -0.75 * s, 0, 0, 0]]))
    # Dr. GRPO (no std): the same without s
    est = GROUP_NORMALIZED(experience(), GRPOConfig(samples_per_prompt=2, scale_rewards=False))
    torch.testing.assert_close(est.advantages, torch.tensor([[0.75, 0.75, 0, 0, 0.25, 0.25], [-0.75] * 3 + [0.0] * 3]))


def test_rloo_leave_one_out_of_the_returns_on_trajectories() -> None:
    est = LEAVE_ONE_OUT(experience(), RLOOConfig(samples_per_prompt=2))
    # k = 2, returns (1.5, 0): A_i = G_i - G_other = +-1.5; row 0's turn 2 drops the 0.5 of turn 1
    want = torch.tensor([[1.5, 1.5, 0, 0, 1.0, 1.0], [-1.5, -1.5, -1.5, 0, 0, 0]])
    torch.testing.assert_close(est.advantages, want)


def _group_of_three() -> Experience:
    """Three samples of one prompt (P = 1), ``m`` model, ``e`` environment tokens::

        a:  m m e m m e m     turn rewards 0.5 (index 1), 0.25 (index 4); final 1.0     G = 1.75
        b:  m m m . . . .     final 0.0                                                 G = 0
        c:  m e e m m . .     turn reward 1.0 (index 0); final 0.25                     G = 1.25
    """
    mask = torch.tensor([[1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 1, 0, 0]], dtype=torch.float32)
    turn = torch.zeros(3, 7)
    turn[0, 1], turn[0, 4], turn[2, 0] = 0.5, 0.25, 1.0
    lp = -mask
    seqs = torch.ones(3, 8, dtype=torch.long)
    scores = torch.tensor([1.0, 0.0, 0.25])
    return Experience(prompt_ids=seqs[:, :1], prompt_mask=torch.ones(3, 1, dtype=torch.long), meta=[{}] * 3,
                      sequences=seqs, attention_mask=torch.ones(3, 8, dtype=torch.long), prompt_len=1,
                      response_mask=mask, logprobs=lp, ref_logprobs=lp.clone(), values=torch.zeros(3, 7),
                      scores=scores, train_scores=scores, turn_rewards=turn)


def test_grpo_and_rloo_on_a_group_with_different_turn_counts() -> None:
    # GRPO: G = (1.75, 0, 1.25), mean 1.0, deviations (0.75, -1, 0.25), sum of squares 1.625,
    # unbiased variance 0.8125, s = 1 / (sqrt(0.8125) + 1e-6)
    s = 1 / (math.sqrt(0.8125) + 1e-6)
    #   a: turn 1 -> 0.75 s; turn 2 -> (0.75 - 0.5) s = 0.25 s; turn 3 -> (0.75 - 0.5 - 0.25) s = 0
    #   b: -1 s;  c: turn 1 -> 0.25 s; turn 2 -> (0.25 - 1.0) s = -0.75 s
    want = torch.tensor([[0.75, 0.75, 0, 0.25, 0.25, 0, 0], [-1, -1, -1, 0, 0, 0, 0],
                         [0.25, 0, 0, -0.75, -0.75, 0, 0]]) * s
    torch.testing.assert_close(GROUP_NORMALIZED(_group_of_three(), GRPOConfig(samples_per_prompt=3)).advantages, want)
    # RLOO: baselines = mean G of the other two: a 0.625, b 1.5, c 0.875 -> A = (1.125, -1.5, 0.375)
    #   a: 1.125, 1.125 - 0.5 = 0.625, 0.625 - 0.25 = 0.375;  b: -1.5;  c: 0.375, 0.375 - 1.0 = -0.625
    want = torch.tensor([[1.125, 1.125, 0, 0.625, 0.625, 0, 0.375], [-1.5, -1.5, -1.5, 0, 0, 0, 0],
                         [0.375, 0, 0, -0.625, -0.625, 0, 0]])
    torch.testing.assert_close(LEAVE_ONE_OUT(_group_of_three(), RLOOConfig(samples_per_prompt=3)).advantages, want)


def test_a_group_of_equal_returns_gets_no_signal_even_when_its_turn_rewards_differ() -> None:
    exp = experience()
    exp.train_scores = exp.scores = torch.tensor([0.5, 1.0])  # returns 0.5 + 0.5 and 1.0: equal
    for estimator, config in ((GROUP_NORMALIZED, GRPOConfig(samples_per_prompt=2)),
                              (GROUP_NORMALIZED, GRPOConfig(samples_per_prompt=2, scale_rewards=False)),
                              (LEAVE_ONE_OUT, RLOOConfig(samples_per_prompt=2))):
        est = estimator(exp, config)
        assert (est.advantages == 0).all() and (est.rewards == 0).all(), config


def test_reinforce_pp_whitens_the_returns_over_model_tokens_only() -> None:
    est = BATCH_WHITENED(experience(), ReinforcePPConfig())
    # returns on model tokens: row 0 (1.5, 1.5, 1.0, 1.0), row 1 (0, 0, 0): 7 values, sum 5
    vals = [1.5, 1.5, 1.0, 1.0, 0.0, 0.0, 0.0]
    mean = 5 / 7
    std = math.sqrt(sum((x - mean) ** 2 for x in vals) / 6 + 1e-8)  # unbiased, eps 1e-8 under the root
    z = [(x - mean) / std for x in vals]
    want = torch.tensor([[z[0], z[1], 0, 0, z[2], z[3]], [z[4], z[5], z[6], 0, 0, 0]])
    torch.testing.assert_close(est.advantages, want)
    torch.testing.assert_close(est.returns, torch.tensor([[1.5, 1.5, 0, 0, 1.0, 1.0], [0.0] * 6]))


class CountDown:
    """Replies two ids each turn; done after ``record['turns']`` turns with reward = the number of 5s said."""

    name, description = "countdown", "test"

    def reset(self, record):
        self.left, self.said = record["turns"], 0

    def step(self, action):
        self.left -= 1
        self.said += action.split().count("5")
        if self.left == 0:
            return StepResult(reward=float(self.said), done=True)
        return StepResult(reply=[2, 3], reward=0.25)


def test_grpo_learns_on_episodes_and_trains_only_model_tokens() -> None:
    V, EOS, PAD = 11, 1, 0
    actor = TinyPolicy(V, seed=1)
    algo = GRPO(GRPOConfig(samples_per_prompt=2, micro_batch_size=4, max_new_tokens=3), actor=actor,
                reference=actor.frozen_copy(), reward_fn=lambda *a: None, eos_token_id=EOS, pad_token_id=PAD)
    algo.env_rollout = EnvRollout(CountDown, EpisodeBudget(max_turns=3, max_turn_tokens=3, max_total_tokens=20),
                                  decode=lambda ids: " ".join(map(str, ids)),
                                  encode=lambda s: [int(t) for t in s.split()], vocab_size=V)
    ids = torch.tensor([[0, 4, 6], [7, 8, 9]])
    torch.manual_seed(0)
    exp = algo.generate_experience(ids, (ids != 0).long(), [{"turns": 2}, {"turns": 1}])
    P = exp.prompt_len
    env = (exp.attention_mask[:, P:] == 1) & (exp.response_mask == 0)  # environment tokens
    assert env[:2].sum() == 4 and env[2:].sum() == 0  # two replies of 2 ids on the 2-turn rows
    assert torch.equal(exp.sequences[:2, P:][env[:2]].view(2, 2), torch.tensor([[2, 3], [2, 3]]))
    for name in ("advantages", "returns", "logprobs", "ref_logprobs", "rewards"):
        assert (getattr(exp, name)[env] == 0).all(), name
    assert exp.num_turns.tolist() == [2, 2, 1, 1] and exp.end_reasons == ["done"] * 4
    metrics = algo.learn(exp)
    assert metrics["env_turns_mean"] == 1.5 and metrics["env_end_done"] == 4 and metrics["env_tokens_mean"] == 1.0
    assert metrics["gen_logprob_gap_max"] < 1e-5  # the sampler's log-probs are the recomputed ones
    assert math.isfinite(metrics["policy_loss"])


class FirstTokenEnv:
    """Ends after ``record['turns']`` turns; each non-final turn: reward 0.5 and the reply [2, 3]; the final
    reward: 1.0 when the first token of the first turn is even, else 0.0 (so a greedy episode's return is
    0.5 * (turns - 1) + [its first greedy token is even])."""

    name, description = "first-token", "test"

    def reset(self, record):
        self.left, self.first = record["turns"], None

    def step(self, action):
        self.left -= 1
        if self.first is None:
            self.first = int(action.split()[0])
        if self.left == 0:
            return StepResult(reward=float(self.first % 2 == 0), done=True)
        return StepResult(reply=[2, 3], reward=0.5)


def test_remax_baseline_is_a_greedy_episode_through_the_environment() -> None:
    from rlhf_algos import ReMax, ReMaxConfig

    V, EOS, PAD, k = 11, 1, 0, 3
    actor = TinyPolicy(V, seed=2)
    algo = ReMax(ReMaxConfig(samples_per_prompt=k, micro_batch_size=6, kl_coef=0.0), actor=actor,
                 reference=actor.frozen_copy(), reward_fn=lambda *a: None, eos_token_id=EOS, pad_token_id=PAD)
    algo.env_rollout = EnvRollout(FirstTokenEnv, EpisodeBudget(max_turns=3, max_turn_tokens=3, max_total_tokens=20),
                                  decode=lambda ids: " ".join(map(str, ids)),
                                  encode=lambda s: [int(t) for t in s.split()], vocab_size=V)
    ids, records = torch.tensor([[0, 4, 6], [7, 8, 9]]), [{"turns": 2}, {"turns": 1}]
    mask = (ids != 0).long()
    torch.manual_seed(3)
    exp = algo.generate_experience(ids, mask, records)
    # the baseline by hand: each prompt's first greedy token, straight from the policy
    greedy = actor.generate(ids, mask, max_new_tokens=3, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    b = [0.5 * (r["turns"] - 1) + float(int(greedy[j, ids.shape[1]]) % 2 == 0) for j, r in enumerate(records)]
    assert exp.baseline_scores.tolist() == [b[0]] * k + [b[1]] * k
    P = exp.prompt_len
    want = torch.zeros_like(exp.advantages)
    for i in range(2 * k):
        turns, final = records[i // k]["turns"], float(int(exp.sequences[i, P]) % 2 == 0)  # the sampled first token
        model = exp.response_mask[i].bool()
        env = exp.attention_mask[i, P:].bool() & ~model
        first_env = int(env.nonzero()[0]) if env.any() else model.shape[0]
        for t in model.nonzero().flatten().tolist():
            # reward-to-go - baseline: turn 1 sees 0.5 * (turns - 1) + final, turn 2 only the final reward
            want[i, t] = (0.5 * (turns - 1) if t < first_env else 0.0) + final - b[i // k]
    assert exp.num_turns.tolist() == [2] * k + [1] * k
    torch.testing.assert_close(exp.advantages, want)
    assert math.isfinite(algo.learn(exp)["policy_loss"])


def test_an_algorithm_with_a_single_turn_baseline_refuses_an_environment() -> None:
    from rlhf_algos import ReMax, ReMaxConfig

    class SingleTurnBaseline(ReMax):
        name = "single-turn-baseline"
        env_baseline = False  # its baseline_scores knows nothing of environments

    actor = TinyPolicy(11, seed=1)
    algo = SingleTurnBaseline(ReMaxConfig(), actor=actor, reference=actor.frozen_copy(), reward_fn=lambda *a: None,
                              eos_token_id=1, pad_token_id=0)
    algo.env_rollout = EnvRollout(CountDown, EpisodeBudget(), decode=str, encode=lambda s: [])
    with pytest.raises(ValueError, match="single-turn-baseline: a rollout baseline"):
        algo.generate_experience(torch.tensor([[4, 5]]), torch.ones(1, 2, dtype=torch.long), [{"turns": 1}])
