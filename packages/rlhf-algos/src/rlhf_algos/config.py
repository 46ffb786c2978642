"""Algorithm configs: the validating base class, the options every online algorithm shares and the
offline base, with :func:`option` (a field with its help text).

Re-exported by :mod:`rlhf_algos.base`, where the algorithm base classes that use them live
(``OfflineConfig`` also by :mod:`rlhf_algos.offline`, with ``OfflineAlgorithm``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import functional as F

__all__ = [
    "KL_PLACEMENTS",
    "REWARD_NORMS",
    "AlgorithmConfig",
    "OfflineConfig",
    "OnlineConfig",
    "option",
]

KL_PLACEMENTS: tuple[str, ...] = ("reward", "loss")
REWARD_NORMS: tuple[str, ...] = ("none", "batch")


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and its help text (``field.metadata["help"]``).

    The help is written once, here, and the CLI (``rlhf algos show``) derives its output from it.
    """
    return field(default=default, metadata={"help": help})


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlgorithmConfig:
    """Base of every algorithm config: validation helpers whose errors name ``<section>.<field>``.

    ``section`` is the algorithm's registered name; subclasses set it as a ``ClassVar``.
    """

    section: ClassVar[str] = "algorithm"

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"{self.section}.{name}: {getattr(self, name)!r} is not allowed; allowed: {allowed}")

    def _check_choice(self, name: str, choices: Sequence[str]) -> None:
        if getattr(self, name) not in choices:
            self._fail(name, ", ".join(repr(c) for c in choices))

    def _check_min(self, name: str, low: float, *, strict: bool = False) -> None:
        v = getattr(self, name)
        if not (v > low if strict else v >= low) or v == math.inf:  # nan fails the comparison
            self._fail(name, f"{'>' if strict else '>='} {low}")

    def _check_range(self, name: str, low: float, high: float, *, low_open: bool = False) -> None:
        v = getattr(self, name)
        if not (low < v <= high if low_open else low <= v <= high):  # nan fails both
            self._fail(name, f"{'(' if low_open else '['}{low}, {high}]")


@dataclass(frozen=True)
class OnlineConfig(AlgorithmConfig):
    """Options shared by every online algorithm (see each field's help)."""

    section: ClassVar[str] = "online"

    kl_coef: float = option(0.1, "beta: weight of the KL(actor || reference) penalty")
    kl_estimator: str = option("k1", "per-token KL estimator (Schulman 2020): k1 = log-ratio, k2, k3")
    kl_placement: str = option(
        "reward", "where the KL penalty goes: 'reward' (-beta * KL per token in the reward) or "
        "'loss' (beta * KL added to the policy loss, aggregated like it)")
    loss_agg: str = option(
        "token-mean", "policy-loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum, "
        "seq-mean-token-sum-norm (divides by max_new_tokens)")
    samples_per_prompt: int = option(1, "responses sampled per prompt (the group size of GRPO / RLOO)")
    reward_norm: str = option("none", "sequence-score normalisation before advantages: 'none' or 'batch' "
                                      "(whiten the scores over the rollout batch)")
    clip_reward: float | None = option(5.0, "sequence scores are clipped to [-clip_reward, clip_reward] "
                                            "(None: no clipping)")
    clip_eps: float = option(0.2, "policy-ratio clip range of the PPO surrogate")
    ppo_epochs: int = option(1, "passes over each rollout batch")
    micro_batch_size: int = option(32, "rows per forward/backward/step in the learning phase")
    max_new_tokens: int = option(64, "response length limit")
    temperature: float = option(1.0, "sampling temperature (log-probs use the same temperature)")
    top_k: int = option(0, "top-k sampling (0 = off)")
    top_p: float = option(1.0, "nucleus sampling (1.0 = off)")
    ptx_coef: float = option(0.0, "weight of the SFT loss on a batch of demonstrations added to the policy loss at "
                                  "every actor step (InstructGPT's PPO-ptx gamma, DeepSpeed-Chat's unsupervised "
                                  "loss); 0 = off")
    batch_layout: str = option("padded", "learn-step forwards of the actor and critic: \"padded\" (the rollout's "
                                         "rows as they are), or each row's real tokens packed padding-free "
                                         "(rlhf_data.pack_padded_batch: position ids restarting per sequence; the "
                                         "same losses): \"rows\" (rows no longer than the longest sequence: "
                                         "sdpa/eager attention) or \"one_row\" (flash attention)")

    def __post_init__(self) -> None:
        from rlhf_data import PADDING_FREE_LAYOUTS

        self._check_choice("batch_layout", ("padded", *PADDING_FREE_LAYOUTS))
        self._check_choice("kl_estimator", F.KL_ESTIMATORS)
        self._check_choice("kl_placement", KL_PLACEMENTS)
        self._check_choice("loss_agg", F.LOSS_AGG_MODES)
        self._check_choice("reward_norm", REWARD_NORMS)
        self._check_min("kl_coef", 0.0)
        self._check_min("clip_eps", 0.0, strict=True)  # 0 would freeze the policy: every ratio clipped to 1
        if self.clip_reward is not None:
            self._check_min("clip_reward", 0.0)
        for name in ("samples_per_prompt", "ppo_epochs", "micro_batch_size", "max_new_tokens"):
            self._check_min(name, 1)
        self._check_min("temperature", 0.0, strict=True)
        self._check_min("top_k", 0)
        self._check_range("top_p", 0.0, 1.0, low_open=True)
        self._check_min("ptx_coef", 0.0)


@dataclass(frozen=True)
class OfflineConfig(AlgorithmConfig):
    """Base of the offline (preference) algorithm configs; the fields are per algorithm."""

    section: ClassVar[str] = "offline"
