"""The tool-use demo task: 4-5 digit addition with a calculator tool, and a ground-truth verifier.

A tiny model cannot add 4-5 digit numbers in its head, but it can call a calculator and copy the
result. An episode (``rlhf_algos.calculator.CalculatorEnv``)::

    prompt   What is 12345 + 6789?
    model    <calc>12345+6789</calc>          (its turn ends at EOS)
    tool     <result>19134</result>
    model    19134                            (the final answer, verified)

The SFT demonstrations use the tool imperfectly, the way cheap demonstrations do, so that RL has
something to fix and its effect can be measured (:func:`tool_use_stats`):

* ``skip_tool``: no tool call, an answer "from the head" (wrong in a random digit);
* ``copy_error``: the right call, then the result copied with its last two digits swapped (the last
  digit + 1 when they are equal): a *systematic* slip, the most frequent kind by default, so that a
  greedy SFT model makes it too (as the two-digit demo's forgotten carry);
* ``wrong_operands``: a call with one operand's digit changed, then its result copied faithfully.

Each demonstration is a list of turns ``(role, text)``, role ``"model"`` or ``"tool"``: whoever trains
on them must keep the tool's turns out of the loss, as the multi-turn rollouts do.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["CALC", "RESULT", "ToolAdditionTask", "ToolTaskConfig", "demonstration_example", "parse_calc",
           "parse_question", "question", "tool_use_stats", "verify_answer"]

CALC = re.compile(r"<calc>\s*(\d+)\s*\+\s*(\d+)\s*</calc>")
RESULT = "<result>{}</result>"
_ANSWER = re.compile(r"^\s*(-?\d+)\s*$")
_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")


def question(a: int, b: int) -> str:
    """The user's message for ``a + b``."""
    return f"What is {a} + {b}?"


def parse_question(text: str) -> tuple[int, int] | None:
    """The operands of the first question :func:`question` writes (``What is a + b?``) in ``text``, or None:
    a prompt record's ``prompt`` (the rendered prompt, chat format included) holds one."""
    m = _QUESTION.search(text)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def parse_calc(text: str) -> tuple[int, int] | None:
    """The operands of the first ``<calc>a+b</calc>`` in ``text``, or None."""
    m = CALC.search(text)
    return None if m is None else (int(m.group(1)), int(m.group(2)))


def verify_answer(answer: str, meta: dict) -> float:
    """1.0 when ``answer`` is exactly the integer ``meta["a"] + meta["b"]``, else 0.0."""
    m = _ANSWER.match(answer)
    return float(m is not None and int(m.group(1)) == meta["a"] + meta["b"])


@dataclass(frozen=True)
class ToolTaskConfig:
    """Settings of the tool demo.

    Attributes:
        low, high: operand range (inclusive); 4-5 digits by default.
        num_sft, num_rl, num_eval: problems per split (disjoint).
        skip_tool, copy_error, wrong_operands: fractions of SFT demonstrations with each mistake
            (the rest use the tool correctly); their sum must be <= 1.
        seed: seeds every random choice of the task.
    """

    low: int = 1000
    high: int = 99999
    num_sft: int = 2000
    num_rl: int = 2000
    num_eval: int = 200
    skip_tool: float = 0.15
    copy_error: float = 0.5
    wrong_operands: float = 0.05
    seed: int = 1234

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"tool_demo.low/high: need 0 <= low < high, got low={self.low}, high={self.high}")
        for name in ("num_sft", "num_rl", "num_eval"):
            if getattr(self, name) < 1:
                raise ValueError(f"tool_demo.{name}: {getattr(self, name)!r} is not allowed; allowed: >= 1")
        fractions = (self.skip_tool, self.copy_error, self.wrong_operands)
        if any(not 0.0 <= f <= 1.0 for f in fractions) or sum(fractions) > 1.0:
            raise ValueError(f"tool_demo.skip_tool/copy_error/wrong_operands: {fractions!r} is not allowed; "
                             "allowed: each in [0, 1], sum <= 1")


def _swap_last_two(n: int) -> int:
    """``n`` with its last two digits swapped; the last digit + 1 (mod 10) when they are equal."""
    d = list(str(n))
    if d[-1] == d[-2]:
        d[-1] = str((int(d[-1]) + 1) % 10)
    else:
        d[-1], d[-2] = d[-2], d[-1]
    return int("".join(d))


def _change_digit(n: int, rng: random.Random) -> int:
    """``n`` with one digit replaced by a different one (never a leading 0)."""
    digits = list(str(n))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


class ToolAdditionTask:
    """Generated problems, imperfect tool-use demonstrations and the verifier of the tool demo."""

    name = "tool-demo"

    def __init__(self, config: ToolTaskConfig | None = None) -> None:
        self.config = config or ToolTaskConfig()
        c = self.config
        rng = random.Random(c.seed)
        seen: set[tuple[int, int]] = set()
        order: list[tuple[int, int]] = []
        while len(order) < c.num_sft + c.num_rl + c.num_eval:
            p = (rng.randint(c.low, c.high), rng.randint(c.low, c.high))
            if p not in seen:
                seen.add(p)
                order.append(p)
        self.splits = {"sft": order[: c.num_sft], "rl": order[c.num_sft : c.num_sft + c.num_rl],
                       "eval": order[c.num_sft + c.num_rl :]}

    def prompts(self, split: str) -> list[tuple[str, dict]]:
        """``(question, meta)`` of a split (``sft``, ``rl`` or ``eval``); ``meta`` holds the operands."""
        if split not in self.splits:
            raise ValueError(f"tool_demo split: unknown split {split!r}; allowed: {sorted(self.splits)}")
        return [(question(a, b), {"a": a, "b": b}) for a, b in self.splits[split]]

    def corpus(self) -> list[str]:
        """Plain text for training the demo tokenizer (``rlhf_data.train_demo_tokenizer``): each SFT
        demonstration as one string, prompt in the plain ``Human:/Assistant:`` format, turns joined.

        That tokenizer splits digits one per token, so the tool's ``<result>19134</result>`` and the
        answer ``19134`` hold the same digit ids: copying the result is a token copy."""
        return [f"Human: {q}\n\nAssistant: " + "".join(text for _, text in turns)
                for q, turns, _ in self.demonstrations()]

    def demonstrations(self) -> list[tuple[str, list[tuple[str, str]], str]]:
        """``(question, turns, kind)`` per SFT problem: ``turns`` alternate ``("model", text)`` and
        ``("tool", text)``; ``kind`` is ``correct``, ``skip_tool``, ``copy_error`` or ``wrong_operands``."""
        c, rng = self.config, random.Random(self.config.seed + 1)
        out = []
        for a, b in self.splits["sft"]:
            u = rng.random()
            if u < c.skip_tool:
                kind, turns = "skip_tool", [("model", str(_change_digit(a + b, rng)))]
            elif u < c.skip_tool + c.copy_error:
                kind = "copy_error"
                turns = [("model", f"<calc>{a}+{b}</calc>"), ("tool", RESULT.format(a + b)),
                         ("model", str(_swap_last_two(a + b)))]
            elif u < c.skip_tool + c.copy_error + c.wrong_operands:
                kind, a2 = "wrong_operands", _change_digit(a, rng)
                turns = [("model", f"<calc>{a2}+{b}</calc>"), ("tool", RESULT.format(a2 + b)), ("model", str(a2 + b))]
            else:
                kind = "correct"
                turns = [("model", f"<calc>{a}+{b}</calc>"), ("tool", RESULT.format(a + b)), ("model", str(a + b))]
            out.append((question(a, b), turns, kind))
        return out


def demonstration_example(encode, prompt_ids: list[int], turns: list[tuple[str, str]], eos_id: int,
                          ignore_index: int = -100) -> dict[str, list[int]]:
    """One SFT example laid out as a rollout's trajectory: each turn tokenized on its own, each model
    turn followed by EOS (a model turn ends at EOS, as in ``rlhf_algos.trajectories``), labels on the
    model's tokens only (``ignore_index`` on the prompt and the tool's turns).

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length (unshifted labels, as ``collate_sft``).
    """
    ids, labels = list(prompt_ids), [ignore_index] * len(prompt_ids)
    for role, text in turns:
        if role not in ("model", "tool"):
            raise ValueError(f"demonstration turn role {role!r} is not allowed; allowed: 'model', 'tool'")
        part = list(encode(text)) + ([eos_id] if role == "model" else [])
        ids += part
        labels += part if role == "model" else [ignore_index] * len(part)
    return {"input_ids": ids, "labels": labels}


def tool_use_stats(episodes: list[dict]) -> dict[str, float]:
    """Rates over finished episodes (each the ``info`` of its last step, see ``CalculatorEnv``):

    * ``tool_call_rate``: episodes that called the calculator;
    * ``copy_error_rate``: of the episodes that got a tool result, those whose final answer differs from it;
    * ``verifier_score``: episodes whose final answer is right.
    """
    n = max(len(episodes), 1)
    called = [e for e in episodes if e.get("tool_result") is not None]
    copied_wrong = [e for e in called if e.get("answer") != str(e["tool_result"])]
    return {"tool_call_rate": len(called) / n, "copy_error_rate": len(copied_wrong) / max(len(called), 1),
            "verifier_score": sum(float(e.get("correct", 0.0)) for e in episodes) / n}
