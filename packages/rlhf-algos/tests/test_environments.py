"""Environments (rlhf_algos.environments) and the multi-turn driver (rlhf_algos.trajectories) on test doubles.

* the registry: the built-in ``reward`` environment is found through ``rlhf.environments``; an
  unknown name names the group and the choices;
* the one-step case: a reward function as an environment gives exactly the single-turn rollout
  (``generate_responses``) and the scores the reward function gives on it;
* budgets: ``max_turns`` and ``max_total_tokens`` end trajectories with their reason;
* a misbehaving environment (raises in reset or step, replies over the budget, returns a reply that
  is neither text nor ids, a NaN reward, not a StepResult) ends only its own trajectory, with its
  reason counted; the other rows are the same as in a batch without it.
"""

from __future__ import annotations

import pytest
import torch
from rlhf_algos.environments import (
    EpisodeBudget,
    RewardEnvironment,
    StepResult,
    available_environments,
    get_environment,
)
from rlhf_algos.rollout import generate_responses
from rlhf_algos.testing import TinyPolicy
from rlhf_algos.trajectories import RePrefillSession, end_reason_counts, run_episodes

V, EOS, PAD = 11, 1, 0


def decode(ids: list[int]) -> str:
    return " ".join(str(t) for t in ids if t != EOS)


def encode(text: str) -> list[int]:
    return [int(t) for t in text.split()]


def prompts():
    ids = torch.tensor([[0, 0, 3, 4], [5, 6, 7, 8], [0, 2, 9, 3]])
    return ids, (ids != 0).long()


def run(envs, records, budget, policy=None, do_sample=False):
    ids, mask = prompts()
    policy = policy or TinyPolicy(V, seed=3)
    session = RePrefillSession(policy, ids, mask, eos_token_id=EOS, pad_token_id=PAD, do_sample=do_sample)
    return run_episodes(session, envs, records, budget=budget, decode=decode, encode=encode, prompt_ids=ids,
                        prompt_mask=mask, pad_token_id=PAD, vocab_size=V)


def test_the_builtin_reward_environment_is_registered_and_unknown_names_say_where_to_register() -> None:
    assert available_environments()["reward"] is RewardEnvironment
    assert get_environment("reward") is RewardEnvironment
    with pytest.raises(ValueError, match=r"unknown environment 'nope'; available: .*reward.*'rlhf.environments'"):
        get_environment("nope")


def test_a_reward_function_is_the_one_step_environment() -> None:
    """Greedy: the trajectories are the single-turn responses (cut at EOS) and the scores the function's."""
    def count_fives(responses, meta):  # a reward function as registered under rlhf.rewards
        return [float(r.split().count("5")) + m["bonus"] for r, m in zip(responses, meta, strict=True)]

    records = [{"bonus": 0.0}, {"bonus": 1.0}, {"bonus": 2.0}]
    make = RewardEnvironment.factory(count_fives)
    batch = run([make() for _ in records], records, EpisodeBudget(max_turns=3, max_turn_tokens=6, max_total_tokens=6))
    ids, mask = prompts()
    gen = generate_responses(TinyPolicy(V, seed=3), ids, mask, max_new_tokens=6, eos_token_id=EOS,
                             pad_token_id=PAD, do_sample=False, return_logprobs=True)
    R = gen.response_mask.shape[1]
    assert torch.equal(batch.loss_mask[:, :R], gen.response_mask) and batch.loss_mask[:, R:].sum() == 0
    assert torch.equal(batch.sequences[:, : 4 + R] * batch.attention_mask[:, : 4 + R], gen.sequences * gen.attention_mask)
    assert torch.allclose(batch.sample_logprobs[:, :R], gen.logprobs * gen.response_mask)
    texts = [decode(row[m.bool()].tolist()) for row, m in zip(gen.sequences[:, 4:], gen.response_mask, strict=True)]
    assert batch.scores.tolist() == count_fives(texts, records)
    assert batch.end_reasons == ["done"] * 3 and batch.num_turns.tolist() == [1, 1, 1]
    assert batch.turn_rewards.abs().sum() == 0


class Echo:
    """Replies ``reply`` every turn, never done; ``fail`` picks a misbehaviour at turn ``at``."""

    name, description = "echo", "test"

    def __init__(self, reply="2 3", fail=None, at=1):
        self.reply, self.fail, self.at, self.turn = reply, fail, at, 0

    def reset(self, record):
        if self.fail == "reset":
            raise RuntimeError("no such task")

    def step(self, action):
        self.turn += 1
        bad = self.fail if self.turn == self.at else None
        if bad == "raise":
            raise KeyError("tool crashed")
        if bad == "huge":
            return StepResult(reply=" ".join(["4"] * 100), reward=0.25)
        if bad == "not_text":
            return StepResult(reply={"x": 1}, reward=0.0)
        if bad == "nan":
            return StepResult(reply="2", reward=float("nan"))
        if bad == "tuple":
            return ("2", 1.0, False)
        if bad == "bad_ids":
            return StepResult(reply=[3, V + 5])
        return StepResult(reply=self.reply, reward=0.1 * self.turn, info={"turn": self.turn})


@pytest.mark.parametrize("fail,reason", [("raise", "env_error"), ("reset", "env_error"), ("huge", "reply_over_budget"),
                                         ("not_text", "bad_step"), ("nan", "bad_step"), ("tuple", "bad_step"),
                                         ("bad_ids", "bad_step")])
def test_a_misbehaving_environment_ends_only_its_own_trajectory(fail, reason, caplog) -> None:
    budget = EpisodeBudget(max_turns=3, max_turn_tokens=3, max_total_tokens=40)
    records = [{}, {}, {}]
    good = run([Echo(), Echo(), Echo()], records, budget)
    bad = run([Echo(), Echo(fail=fail), Echo()], records, budget)
    assert good.end_reasons == ["max_turns"] * 3
    assert bad.end_reasons == ["max_turns", reason, "max_turns"]
    assert end_reason_counts(bad.end_reasons)[f"env_end_{reason}"] == 1.0
    assert sum(end_reason_counts(bad.end_reasons).values()) == 3
    if reason != "reply_over_budget":
        assert bad.scores[1] == 0.0
    else:
        assert bad.scores[1] == 0.25  # the step's reward stands; only its reply is refused
    expected_turns = 0 if fail == "reset" else 1
    assert bad.num_turns[1] == expected_turns and bad.loss_mask[1].sum() <= 3
    assert bad.attention_mask[1, 4:].sum() == bad.loss_mask[1].sum()  # no environment token was appended
    for row in (0, 2):  # the other rows are untouched (greedy, rows independent)
        n = good.attention_mask[row].sum()
        assert torch.equal(bad.sequences[row, :4 + 0][bad.attention_mask[row, :4].bool()],
                           good.sequences[row, :4][good.attention_mask[row, :4].bool()])
        assert bad.attention_mask[row].sum() == n
        assert torch.equal(bad.sequences[row][bad.attention_mask[row].bool()],
                           good.sequences[row][good.attention_mask[row].bool()])
    assert reason in caplog.text


def test_a_failed_later_step_records_why_and_no_info() -> None:
    budget = EpisodeBudget(max_turns=3, max_turn_tokens=3, max_total_tokens=40)
    batch = run([Echo(), Echo(fail="raise", at=2), Echo(fail="nan", at=3)], [{}, {}, {}], budget)
    assert batch.end_reasons == ["max_turns", "env_error", "bad_step"]
    assert batch.end_details == ["", "KeyError: 'tool crashed'", "reward nan is not a finite number"]
    assert batch.final_info == [{"turn": 3}, {}, {}]  # not the info of the step before the failed one
    assert batch.num_turns.tolist() == [3, 2, 3]


def test_budgets_end_trajectories_with_their_reason() -> None:
    # 3 turns of at most 3 tokens and 2-token replies: 3 + 2 + 3 + 2 + 3 = 13 tokens at most
    turns = run([Echo() for _ in range(3)], [{}] * 3, EpisodeBudget(max_turns=3, max_turn_tokens=3, max_total_tokens=40))
    assert turns.end_reasons == ["max_turns"] * 3 and turns.num_turns.tolist() == [3, 3, 3]
    # turn rewards 0.1, 0.2 at the ends of turns 1 and 2; the third step's 0.3 is the final score
    assert turns.scores.tolist() == pytest.approx([0.3] * 3)
    assert turns.turn_rewards.sum(1).tolist() == pytest.approx([0.3] * 3)
    # a total budget of 5 with 2-token replies: 3 model + 2 env leaves nothing for a second turn -> refused reply
    total = run([Echo() for _ in range(3)], [{}] * 3, EpisodeBudget(max_turns=3, max_turn_tokens=3, max_total_tokens=5))
    for i, r in enumerate(total.end_reasons):
        # a row that reaches 5 tokens ends there; a 2-token reply after >= 3 tokens would leave no room
        n = int(total.attention_mask[i, 4:].sum())
        assert n <= 5 and r == ("max_total_tokens" if n == 5 else "reply_over_budget"), (n, r)
        assert total.num_turns[i] == (1 if n == total.loss_mask[i].sum() else 2)
    long = run([Echo(reply="2") for _ in range(3)], [{}] * 3,
               EpisodeBudget(max_turns=9, max_turn_tokens=3, max_total_tokens=9))
    assert all(int(m.sum()) <= 9 for m in long.attention_mask[:, 4:])
    assert set(long.end_reasons) <= {"max_total_tokens", "reply_over_budget", "max_turns"}


def test_episode_budget_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match=r"EpisodeBudget.max_turns: 0 is not allowed; allowed: an int >= 1"):
        EpisodeBudget(max_turns=0)
