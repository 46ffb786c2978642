"""Environments for multi-turn and tool-use rollouts, registered under the entry-point group ``rlhf.environments``.

An environment plays the other side of a conversation with the policy. One instance runs one
trajectory (episode)::

    class MyEnv:
        name = "my_env"                       # the registered name
        description = "one line for `rlhf envs list`"

        def reset(self, record: dict) -> None:
            ...                               # the prompt record: its ``meta`` dict plus ``"prompt"``

        def step(self, action: str) -> StepResult:
            ...                               # the model's text of one turn (special tokens dropped)

``step`` returns a :class:`StepResult`: the environment's ``reply`` (text, tokenized once for this
turn and appended as token ids; or token ids; None when there is nothing to say), the ``reward`` of
this turn and ``done``. The reward of the step that ends the episode is the trajectory's final
reward (the sequence score every algorithm trains on); the rewards of the earlier steps are per-turn
rewards, placed at the last model token of their turn (docs/environments.md). A plugin package
registers its class in its ``pyproject.toml``::

    [project.entry-points."rlhf.environments"]
    my_env = "my_package.envs:MyEnv"

and after ``pip install`` it is listed by :func:`available_environments` (``rlhf envs list``) and
loaded by :func:`get_environment`, exactly like the built-ins, which register the same way (the
one-step ``reward`` environment here, the demo's calculator in rlhf-data).

A single-turn reward function (``rlhf.rewards``) is the one-step case: :class:`RewardEnvironment`
scores the first turn with it and ends the episode, so every existing reward plugin keeps working.

The episode budgets (:class:`EpisodeBudget`) are the caller's: ``max_turns`` model turns,
``max_turn_tokens`` tokens per model turn and ``max_total_tokens`` tokens after the prompt (model
and environment tokens together). How a batch of episodes becomes token sequences is
:mod:`rlhf_algos.trajectories`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

from .registry import registered_entry_points
from .rewards import RewardFn, get_reward

__all__ = [
    "ENVIRONMENT_GROUP",
    "END_REASONS",
    "EpisodeBudget",
    "Environment",
    "EnvironmentLoadError",
    "check_step",
    "RewardEnvironment",
    "StepResult",
    "available_environments",
    "get_environment",
]

ENVIRONMENT_GROUP = "rlhf.environments"

# Why a trajectory ended (Experience.end_reasons; one env_end_<reason> metric each).
END_REASONS: tuple[str, ...] = (
    "done",  # the environment said so
    "max_turns",  # the budget of model turns is spent
    "max_total_tokens",  # no token of the total budget is left for another model turn
    "reply_over_budget",  # the environment's reply does not fit in what is left of the total budget
    "env_error",  # reset or step raised
    "bad_step",  # step returned something that is not a StepResult (or a bad reply / reward in it)
)


@dataclass(frozen=True)
class StepResult:
    """What :meth:`Environment.step` returns.

    Attributes:
        reply: Appended after the model's turn before its next one: text (tokenized once, for this
            turn only), token ids, or None (nothing). Ignored when ``done``.
        reward: This turn's reward (a finite float); the final reward when ``done``.
        done: The episode is over.
        info: Free-form, for logging.
    """

    reply: str | list[int] | None = None
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode's environment; see the module docstring."""

    name: ClassVar[str]
    description: ClassVar[str]

    def reset(self, record: dict) -> None: ...

    def step(self, action: str) -> StepResult: ...


class EnvironmentLoadError(RuntimeError):
    """An environment that cannot be loaded or built (the message names the entry point)."""


@dataclass(frozen=True)
class EpisodeBudget:
    """Per-trajectory budgets.

    Attributes:
        max_turns: Model turns at most (>= 1).
        max_turn_tokens: Tokens per model turn at most (>= 1); a turn also ends at EOS.
        max_total_tokens: Tokens after the prompt at most, model and environment together
            (>= ``max_turn_tokens`` is not required: the last turn gets what is left).
    """

    max_turns: int = 4
    max_turn_tokens: int = 32
    max_total_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_turn_tokens", "max_total_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"EpisodeBudget.{name}: {v!r} is not allowed; allowed: an int >= 1")


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def _load(name: str, ep) -> type:
    where = f"environment {name} = {ep.value!r} (group {ENVIRONMENT_GROUP!r})"
    try:
        cls = ep.load()
    except Exception as e:  # a broken plugin must say which one it is
        raise EnvironmentLoadError(f"{where} failed to import: {type(e).__name__}: {e}") from e
    missing = [a for a in ("name", "description", "reset", "step") if not hasattr(cls, a)]
    if missing or not callable(cls):
        raise EnvironmentLoadError(f"{where}: {cls!r} does not declare {', '.join(missing) or 'a constructor'} "
                                "(see rlhf_algos.environments.Environment)")
    return cls


def available_environments() -> dict[str, type]:
    """Every registered environment, name -> class, sorted by name (imports each one).

    Raises:
        EnvironmentLoadError: A registered class cannot be imported or lacks the interface.
        ValueError: One name is registered twice by plugins with different targets.
    """
    eps = registered_entry_points(ENVIRONMENT_GROUP, "environment")
    return {name: _load(name, eps[name]) for name in sorted(eps)}


def get_environment(name: str) -> type:
    """The environment class registered as ``name`` (imports only that one).

    Raises:
        ValueError: ``name`` is not registered; the message lists the available names and the group.
        EnvironmentLoadError: As :func:`available_environments`, for that entry point.
    """
    eps = registered_entry_points(ENVIRONMENT_GROUP, "environment")
    if name not in eps:
        available = ", ".join(sorted(eps)) or "(none)"
        raise ValueError(f"unknown environment {name!r}; available: {available}. Environments are registered under "
                         f"the entry-point group {ENVIRONMENT_GROUP!r}")
    return _load(name, eps[name])


# --------------------------------------------------------------------------------------------
# The one-step case: a reward function
# --------------------------------------------------------------------------------------------


class RewardEnvironment:
    """A single-turn reward function as a one-step environment: the first turn is scored, then done.

    Args:
        reward: A reward function ``(responses, meta) -> scores`` or the name of one registered
            under ``rlhf.rewards`` (e.g. the demo's ``addition``).

    Registered as ``reward``; ``RewardEnvironment.factory("addition")`` makes the zero-argument
    constructor a rollout takes.
    """

    name: ClassVar[str] = "reward"
    description: ClassVar[str] = "one turn scored by a reward function of rlhf.rewards (the single-turn case)"

    def __init__(self, reward: str | RewardFn = "addition") -> None:
        self.fn: RewardFn = get_reward(reward) if isinstance(reward, str) else reward
        self.record: dict = {}

    @classmethod
    def factory(cls, reward: str | RewardFn) -> Callable[[], RewardEnvironment]:
        fn = get_reward(reward) if isinstance(reward, str) else reward
        return lambda: cls(fn)

    def reset(self, record: dict) -> None:
        self.record = record

    def step(self, action: str) -> StepResult:
        scores = self.fn([action], [self.record])
        if len(scores) != 1:
            raise ValueError(f"reward function returned {len(scores)} scores for 1 response")
        return StepResult(reply=None, reward=float(scores[0]), done=True)


def check_step(result: object, vocab_size: int | None) -> str | None:
    """Why ``result`` is not a usable :class:`StepResult` (None when it is)."""
    if not isinstance(result, StepResult):
        return f"step returned {type(result).__name__}, not a StepResult"
    if isinstance(result.reward, bool) or not isinstance(result.reward, (int, float)) \
            or not math.isfinite(float(result.reward)):
        return f"reward {result.reward!r} is not a finite number"
    reply = result.reply
    if reply is None or isinstance(reply, str) or result.done:
        return None
    if not isinstance(reply, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in reply):
        return f"reply of type {type(reply).__name__} is neither text nor a list of token ids"
    if any(t < 0 or (vocab_size is not None and t >= vocab_size) for t in reply):
        return f"reply token ids out of range [0, {vocab_size})"
    return None
