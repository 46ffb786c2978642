"""The tool demo's environment: a calculator the model calls with ``<calc>a+b</calc>``.

Registered under ``rlhf.environments`` as ``calculator``; the task (problems, imperfect
demonstrations, verifier, tool-use rates) is :mod:`rlhf_data.tool_demo`. One episode:

* a model turn holding ``<calc>x+y</calc>`` (the first such call; at most ``max_calls`` per episode)
  is answered with ``<result>x+y</result>`` (reward 0, not done);
* any other model turn is the final answer: reward 1.0 when it is exactly ``a + b``, else 0.0, done.

The last step's ``info`` records ``tool_result`` (the last result shown, or None), ``answer`` and
``correct`` for :func:`rlhf_data.tool_demo.tool_use_stats`.
"""

from __future__ import annotations

from typing import ClassVar

from rlhf_data.tool_demo import RESULT, parse_calc, parse_question, verify_answer

from .environments import StepResult

__all__ = ["CalculatorEnv"]


class CalculatorEnv:
    """A calculator for ``a + b`` problems: the operands are ``record["a"]`` and ``record["b"]``, or, for a
    record without them (``rlhf chat --env calculator``), those of the question ``What is a + b?`` in
    ``record["prompt"]`` (:func:`rlhf_data.tool_demo.parse_question`).

    Args:
        max_calls: Tool calls allowed per episode (an int >= 0); a call beyond them is taken as the final
            answer (and is wrong, not being an integer).

    Raises:
        ValueError: ``max_calls`` is not an int >= 0 (construction); the record holds no operands (``reset``).
    """

    name: ClassVar[str] = "calculator"
    description: ClassVar[str] = "tool demo: <calc>a+b</calc> -> <result>sum</result>, then the answer is verified"

    def __init__(self, max_calls: int = 1) -> None:
        if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 0:
            raise ValueError(f"calculator max_calls: {max_calls!r} is not allowed; allowed: an int >= 0")
        self.max_calls = max_calls
        self.meta: dict = {}
        self.calls = 0
        self.tool_result: int | None = None

    def reset(self, record: dict) -> None:
        if "a" in record and "b" in record:
            a, b = int(record["a"]), int(record["b"])
        elif (asked := parse_question(str(record.get("prompt", "")))) is not None:
            a, b = asked
        else:
            raise ValueError(f"calculator: the record has no operands: neither 'a' and 'b' nor a prompt asking "
                             f"'What is A + B?' (prompt {record.get('prompt')!r})")
        self.meta, self.calls, self.tool_result = {"a": a, "b": b}, 0, None

    def step(self, action: str) -> StepResult:
        call = parse_calc(action)
        if call is not None and self.calls < self.max_calls:
            self.calls += 1
            self.tool_result = call[0] + call[1]
            return StepResult(reply=RESULT.format(self.tool_result), reward=0.0, info={"call": call})
        answer = action.strip()
        correct = verify_answer(answer, self.meta)
        return StepResult(reward=correct, done=True,
                          info={"tool_result": self.tool_result, "answer": answer, "correct": correct})
