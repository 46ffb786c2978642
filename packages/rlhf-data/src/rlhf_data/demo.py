"""The built-in demo task: two-digit addition in a chat format, with a ground-truth verifier.

Why this task: every stage's effect can be *measured* instead of guessed.

* The SFT demonstrations are systematically imperfect, the way cheap human demonstrations are:
  on questions whose units digits carry (``47 + 38``), ``sft_carry_error`` (70% by default) of the
  demonstrations forget the carry (``75`` instead of ``85``). SFT therefore learns a model that is
  right on most non-carry questions and wrong, under greedy decoding, on most carry questions.
* The preference pairs are labelled from the verifier (correct answer preferred) with
  ``label_noise`` (10% by default) of the pairs flipped, the way human annotators disagree.
  The rejected answers cover the mistakes a policy makes or later invents: a forgotten carry, a
  carry added where none was needed, a digit off by one, a dropped or an extra digit.
* Held-out evaluation prompts and validation prompts are disjoint from every training prompt, so a
  verifier score on them measures generalisation, not memorisation.

The verifier (:meth:`AdditionTask.verify`) gives 1.0 when the response is exactly the right integer
and 0.0 otherwise.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cached_property

from .records import PreferenceRecord, PromptRecord, SFTRecord

_ANSWER = re.compile(r"^\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class AdditionTaskConfig:
    """Settings of the demo task.

    Attributes:
        low: smallest operand (inclusive).
        high: largest operand (inclusive).
        num_eval: held-out evaluation prompts (never trained on, never used for selection).
        num_valid: validation prompts (used only to select the best RL checkpoint).
        sft_carry_error: fraction of SFT demonstrations of carry questions that forget the carry.
        label_noise: fraction of preference pairs whose chosen/rejected labels are flipped.
        pairs_per_prompt: preference pairs generated per reward-model prompt.
        stage_split: relative sizes of the disjoint SFT / reward-model / RL prompt pools.
        seed: seed of every random choice of the task (splits, errors, noise).
    """

    low: int = 10
    high: int = 99
    num_eval: int = 300
    num_valid: int = 200
    sft_carry_error: float = 0.7
    label_noise: float = 0.1
    pairs_per_prompt: int = 2
    stage_split: tuple[float, float, float] = (0.4, 0.3, 0.3)
    seed: int = 1234

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"demo.low/high: need 0 <= low < high, got low={self.low}, high={self.high}")
        for name in ("sft_carry_error", "label_noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"demo.{name}: must be in [0, 1], got {value!r}")
        if self.pairs_per_prompt < 1:
            raise ValueError(f"demo.pairs_per_prompt: must be >= 1, got {self.pairs_per_prompt!r}")
        if len(self.stage_split) != 3 or any(w <= 0 for w in self.stage_split):
            raise ValueError(
                f"demo.stage_split: need three positive weights (sft, rm, rl), got {self.stage_split!r}"
            )
        total = (self.high - self.low + 1) ** 2
        if self.num_eval + self.num_valid >= total // 2:
            raise ValueError(
                f"demo.num_eval + demo.num_valid = {self.num_eval + self.num_valid} leaves too few of the "
                f"{total} problems for training; keep it below {total // 2}"
            )


def question(a: int, b: int) -> str:
    """The user's message for the problem ``a + b``."""
    return f"What is {a} + {b}?"


def _has_carry(a: int, b: int) -> bool:
    return (a % 10) + (b % 10) >= 10


class AdditionTask:
    """Generated two-digit addition data with splits, demonstrations, preferences and a verifier."""

    name = "demo"

    def __init__(self, config: AdditionTaskConfig | None = None) -> None:
        self.config = config or AdditionTaskConfig()

    # -- splits -------------------------------------------------------------------------------
    @cached_property
    def _splits(self) -> dict[str, list[tuple[int, int]]]:
        c = self.config
        problems = [(a, b) for a in range(c.low, c.high + 1) for b in range(c.low, c.high + 1)]
        random.Random(c.seed).shuffle(problems)
        held_out = problems[: c.num_eval]
        valid = problems[c.num_eval : c.num_eval + c.num_valid]
        pool = problems[c.num_eval + c.num_valid :]
        w = c.stage_split
        n_sft = int(len(pool) * w[0] / sum(w))
        n_rm = int(len(pool) * w[1] / sum(w))
        return {
            "sft": pool[:n_sft],
            "rm": pool[n_sft : n_sft + n_rm],
            "rl": pool[n_sft + n_rm :],
            "valid": valid,
            "eval": held_out,
        }

    def problems(self, split: str) -> list[tuple[int, int]]:
        """The ``(a, b)`` problems of a split: ``sft``, ``rm``, ``rl``, ``valid`` or ``eval``."""
        if split not in self._splits:
            raise ValueError(f"demo split: unknown split {split!r}; allowed: {sorted(self._splits)}")
        return list(self._splits[split])

    # -- records ------------------------------------------------------------------------------
    def sft_records(self, split: str = "sft") -> list[SFTRecord]:
        """Demonstrations; carry questions forget the carry with probability ``sft_carry_error``."""
        rng = random.Random(self.config.seed + 1)
        out = []
        for a, b in self.problems(split):
            answer = a + b
            if _has_carry(a, b) and rng.random() < self.config.sft_carry_error:
                answer -= 10  # the demonstrator forgot to carry the one
            out.append(SFTRecord(question(a, b), str(answer), meta={"a": a, "b": b}))
        return out

    def preference_records(self, split: str = "rm") -> list[PreferenceRecord]:
        """Verifier-labelled pairs (correct preferred), with ``label_noise`` of them flipped."""
        rng = random.Random(self.config.seed + 2)
        out = []
        for a, b in self.problems(split):
            for _ in range(self.config.pairs_per_prompt):
                chosen, rejected = str(a + b), self._wrong_answer(a, b, rng)
                noisy = rng.random() < self.config.label_noise
                if noisy:
                    chosen, rejected = rejected, chosen
                out.append(
                    PreferenceRecord(question(a, b), chosen, rejected, meta={"a": a, "b": b, "flipped": noisy})
                )
        return out

    def prompt_records(self, split: str = "rl") -> list[PromptRecord]:
        """Prompts for RL or evaluation; ``meta`` holds the operands the verifier needs."""
        return [PromptRecord(question(a, b), meta={"a": a, "b": b}) for a, b in self.problems(split)]

    @staticmethod
    def _wrong_answer(a: int, b: int, rng: random.Random) -> str:
        right = a + b
        kinds = ["off_by_one_units", "off_by_ten", "drop_digit", "extra_digit", "random"]
        if _has_carry(a, b):
            kinds += ["forgot_carry"] * 3  # the demonstrators' mistake, so the RM must know it well
        else:
            kinds += ["spurious_carry"] * 3  # the mistake a policy invents when pushed to carry
        kind = rng.choice(kinds)
        if kind == "forgot_carry":
            wrong = right - 10
        elif kind == "spurious_carry":
            wrong = right + 10
        elif kind == "off_by_one_units":
            wrong = right + rng.choice([-1, 1])
        elif kind == "off_by_ten":
            wrong = right + rng.choice([-10, 10])
        elif kind == "drop_digit":
            text = str(right)
            i = rng.randrange(len(text))
            wrong_text = text[:i] + text[i + 1 :]
            return wrong_text if wrong_text else "0"
        elif kind == "extra_digit":
            return str(right) + str(rng.randrange(10))
        else:
            wrong = rng.randrange(20, 199)
        if wrong == right:
            wrong = right + 1
        return str(wrong)

    # -- verifier -----------------------------------------------------------------------------
    @staticmethod
    def verify(response: str, meta: dict) -> float:
        """1.0 if ``response`` is exactly the integer ``a + b``, else 0.0."""
        m = _ANSWER.match(response)
        return float(m is not None and int(m.group(1)) == meta["a"] + meta["b"])

    def corpus(self) -> list[str]:
        """Plain text for training the demo tokenizer (every prompt and answer form)."""
        lines = []
        for a, b in self.problems("sft") + self.problems("rm"):
            lines.append(f"Human: {question(a, b)}\n\nAssistant: {a + b}")
        return lines


def addition_reward(responses: list[str], meta: list[dict]) -> list[float]:
    """The demo task's verifier as a reward function (registered under ``rlhf.rewards`` as
    ``addition``): 1.0 for each response that is exactly ``meta["a"] + meta["b"]``, else 0.0.

    Raises:
        KeyError: a ``meta`` without the operands (the prompts are not the demo task's).
    """
    return [AdditionTask.verify(r, m) for r, m in zip(responses, meta, strict=True)]
