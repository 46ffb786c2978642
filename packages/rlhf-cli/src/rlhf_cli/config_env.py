"""``env.*``: the environment an online algorithm rolls out against (multi-turn / tool-use rollouts,
docs/environments.md). Empty ``env.name``: single-turn rollouts scored by ``rl.reward``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .config_sections import ConfigError, Section, option

__all__ = ["EnvSection"]


@dataclass(frozen=True)
class EnvSection(Section):
    """The environment of the online stage's rollouts (``rlhf_algos.multiturn.EnvRollout``)."""

    section: ClassVar[str] = "env"

    name: str = option("", "an environment registered under the entry-point group rlhf.environments (`rlhf envs "
                           "list`, e.g. calculator); the online algorithm then rolls out episodes against it "
                           "(its reward replaces rl.reward's) and evaluates held-out greedy episodes. \"\": "
                           "single-turn rollouts (the default); --data tool-demo sets calculator.")
    max_turns: int = option(2, "with env.name: model turns per episode at most.")
    max_turn_tokens: int = option(20, "with env.name: tokens per model turn at most (a turn also ends at EOS).")
    max_total_tokens: int = option(60, "with env.name: tokens after the prompt per episode at most, model and "
                                       "environment together (replaces rl.max_new_tokens).")

    def __post_init__(self) -> None:
        for key in ("max_turns", "max_turn_tokens", "max_total_tokens"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(key, f"{value!r} is not allowed; allowed: an int >= 1")
        if self.name:
            self.environment()

    def environment(self) -> type:
        """The class registered as ``env.name`` (ConfigError naming env.name and the available ones if none)."""
        from rlhf_algos.environments import EnvironmentLoadError, get_environment

        try:
            return get_environment(self.name)
        except (ValueError, EnvironmentLoadError) as e:
            raise ConfigError(f"env.name: {e}") from None

    def budget(self):
        """The per-episode budgets as an ``rlhf_algos.environments.EpisodeBudget``."""
        from rlhf_algos.environments import EpisodeBudget

        return EpisodeBudget(max_turns=self.max_turns, max_turn_tokens=self.max_turn_tokens,
                             max_total_tokens=self.max_total_tokens)
