"""The tool demo: rlhf_algos.calculator.CalculatorEnv and rlhf_data.tool_demo (task, demonstrations, rates).

* the calculator answers a call with the sum and verifies the final answer against ``a + b``;
* the imperfect demonstrations are what their kind says (checked with plain arithmetic) in the
  configured proportions;
* the tool-use rates of scripted episodes run through the multi-turn driver, worked out by hand,
  and the tool's reply is in the trajectory as the ids of its own tokenization.
"""

from __future__ import annotations

import pytest
import torch
from rlhf_algos.calculator import CalculatorEnv
from rlhf_algos.environments import EpisodeBudget, get_environment
from rlhf_algos.trajectories import run_episodes
from rlhf_data.tool_demo import (
    ToolAdditionTask,
    ToolTaskConfig,
    demonstration_example,
    parse_calc,
    tool_use_stats,
)


def test_calculator_is_registered_and_calculates_and_verifies() -> None:
    assert get_environment("calculator") is CalculatorEnv
    env = CalculatorEnv()
    env.reset({"a": 1234, "b": 5678})
    r = env.step("<calc>1234+5678</calc>")
    assert (r.reply, r.reward, r.done) == ("<result>6912</result>", 0.0, False)
    r = env.step(" 6912 ")
    assert (r.reward, r.done) == (1.0, True) and r.info == {"tool_result": 6912, "answer": "6912", "correct": 1.0}
    env.reset({"a": 1234, "b": 5678})
    r = env.step("<calc>1234+5679</calc>")  # wrong operands: the calculator is right about what it was asked
    assert r.reply == "<result>6913</result>"
    assert env.step("<calc>1+1</calc>").info["correct"] == 0.0  # a second call is over max_calls: a (wrong) answer


def test_calculator_reads_the_operands_of_the_question_in_the_prompt() -> None:
    """``rlhf chat --env calculator``: a record holding only the rendered prompt (no ``a``/``b``)."""
    env = CalculatorEnv()
    env.reset({"prompt": "Human: What is 12 + 30?\n\nAssistant:"})
    assert env.step("<calc>12+30</calc>").reply == "<result>42</result>"
    assert env.step("42").reward == 1.0
    env.reset({"a": 1, "b": 2, "prompt": "Human: What is 12 + 30?\n\nAssistant:"})  # the record's operands first
    assert env.step("3").reward == 1.0
    with pytest.raises(ValueError, match="calculator: the record has no operands"):
        env.reset({"prompt": "Human: What is twelve + 30?\n\nAssistant:"})
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"calculator max_calls: {bad!r} is not allowed; allowed: an int >= 0"):
            CalculatorEnv(max_calls=bad)


def test_demonstrations_use_the_tool_imperfectly_in_the_configured_proportions() -> None:
    cfg = ToolTaskConfig(num_sft=2000, num_rl=10, num_eval=10, skip_tool=0.3, copy_error=0.2, wrong_operands=0.1)
    assert ToolTaskConfig().copy_error == 0.5  # by default the systematic slip is the most frequent kind
    task = ToolAdditionTask(cfg)
    demos = task.demonstrations()
    counts = {k: 0 for k in ("correct", "skip_tool", "copy_error", "wrong_operands")}
    for (q, turns, kind), (a, b) in zip(demos, task.splits["sft"], strict=True):
        counts[kind] += 1
        assert q == f"What is {a} + {b}?" and 1000 <= a <= 99999 and 1000 <= b <= 99999
        final = int(turns[-1][1])
        if kind == "skip_tool":
            assert len(turns) == 1 and final != a + b
            continue
        (x, y), tool = parse_calc(turns[0][1]), turns[1]
        assert [t[0] for t in turns] == ["model", "tool", "model"] and tool[1] == f"<result>{x + y}</result>"
        if kind == "correct":
            assert (x, y) == (a, b) and final == a + b
        elif kind == "copy_error":
            s, f = str(a + b), str(final)
            assert (x, y) == (a, b) and final != a + b and f[:-2] == s[:-2]
            assert f[-2:] == (s[-1] + s[-2] if s[-1] != s[-2] else s[-2] + str((int(s[-1]) + 1) % 10))
        else:
            assert y == b and x != a and len(str(x)) == len(str(a)) and final == x + y != a + b
    for kind, want in (("skip_tool", 0.3), ("copy_error", 0.2), ("wrong_operands", 0.1), ("correct", 0.4)):
        assert abs(counts[kind] / 2000 - want) < 0.04, (kind, counts)
    splits = [set(map(tuple, task.splits[s])) for s in ("sft", "rl", "eval")]
    assert not (splits[0] & splits[1]) and not (splits[0] & splits[2]) and not (splits[1] & splits[2])
    with pytest.raises(ValueError, match=r"tool_demo.skip_tool/copy_error/wrong_operands: .* sum <= 1"):
        ToolTaskConfig(skip_tool=0.6, copy_error=0.5)


class ScriptedSession:
    """A TurnSession that plays fixed texts (one character = one token id) for each row and turn."""

    def __init__(self, scripts: list[list[str]]) -> None:
        self.scripts, self.turn_of = scripts, [0] * len(scripts)

    def turn(self, rows, appended, caps):
        out = []
        for r, cap in zip(rows, caps, strict=True):
            text = self.scripts[r][self.turn_of[r]]
            self.turn_of[r] += 1
            out.append(([ord(c) for c in text][:cap], [0.0] * min(len(text), cap)))
        return out


def test_tool_use_rates_of_scripted_episodes() -> None:
    scripts = [["<calc>1234+5678</calc>", "6912"],  # tool, copied right: correct
               ["6913"],  # no tool, wrong
               ["<calc>1234+5678</calc>", "6812"],  # tool, copied wrong
               ["<calc>1234+5679</calc>", "6913"]]  # wrong operands, copied right: wrong
    ids = torch.full((4, 1), 7)
    batch = run_episodes(ScriptedSession(scripts), [CalculatorEnv() for _ in scripts], [{"a": 1234, "b": 5678}] * 4,
                         budget=EpisodeBudget(max_turns=3, max_turn_tokens=32, max_total_tokens=96),
                         decode=lambda t: "".join(map(chr, t)), encode=lambda s: [ord(c) for c in s],
                         prompt_ids=ids, prompt_mask=torch.ones_like(ids), pad_token_id=0)
    assert batch.scores.tolist() == [1.0, 0.0, 0.0, 0.0] and batch.num_turns.tolist() == [2, 1, 2, 2]
    # 3 of 4 called the tool; of those 3, one copied its result wrongly (row 2); row 3 copied a wrong result rightly
    stats = tool_use_stats(batch.final_info)
    assert stats == {"tool_call_rate": 0.75, "copy_error_rate": pytest.approx(1 / 3), "verifier_score": 0.25}
    row0 = batch.sequences[0, 1:][batch.attention_mask[0, 1:].bool()].tolist()
    assert "".join(map(chr, row0)) == "<calc>1234+5678</calc><result>6912</result>6912"
    env_part = batch.sequences[0, 1:][(batch.attention_mask[0, 1:] == 1) & (batch.loss_mask[0] == 0)]
    assert "".join(map(chr, env_part.tolist())) == "<result>6912</result>"


def test_a_demonstration_is_laid_out_like_a_trajectory() -> None:
    enc = {"<calc>1+2</calc>": [5, 6], "<result>3</result>": [7, 8, 9], "3": [4]}.__getitem__
    ex = demonstration_example(enc, [20, 21], [("model", "<calc>1+2</calc>"), ("tool", "<result>3</result>"),
                                               ("model", "3")], eos_id=1)
    assert ex["input_ids"] == [20, 21, 5, 6, 1, 7, 8, 9, 4, 1]
    assert ex["labels"] == [-100, -100, 5, 6, 1, -100, -100, -100, 4, 1]
