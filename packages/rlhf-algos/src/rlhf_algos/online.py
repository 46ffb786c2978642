"""Critic-free online algorithms: GRPO, Dr. GRPO, RLOO, REINFORCE++, ReMax.

They share PPO's rollout path and clipped surrogate (:class:`~rlhf_algos.base.OnlineAlgorithm`)
and differ only in how a sequence's advantage is estimated without a value model:

=============  ==========================================================================
GRPO           ``(r - mean_group) / (std_group + eps)`` over the ``k`` samples of a prompt
Dr. GRPO       ``r - mean_group`` (no std), loss summed per sequence over a constant length
RLOO           ``r - mean of the other k - 1 samples`` of the prompt
REINFORCE++    ``r`` (no baseline); the returns are whitened over the whole batch
ReMax          ``r - r(greedy response to the same prompt)``
=============  ==========================================================================

Each is :class:`~rlhf_algos.base.OnlineAlgorithm` with its own config and its advantage
estimator (:mod:`rlhf_algos.advantages`, where the placement of the sequence advantage, the KL in
the reward and the reward-to-go are written once). ReMax adds one hook: the greedy response's score
(:meth:`ReMax.baseline_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import advantages as A
from .base import Experience, OnlineAlgorithm, OnlineConfig, option
from .rollout import generate_responses

__all__ = [
    "GRPO",
    "RLOO",
    "DrGRPO",
    "DrGRPOConfig",
    "GRPOConfig",
    "RLOOConfig",
    "ReMax",
    "ReMaxConfig",
    "ReinforcePP",
    "ReinforcePPConfig",
]


def _check_groups(cfg: OnlineConfig) -> None:
    if cfg.samples_per_prompt < 2:
        cfg._fail("samples_per_prompt", ">= 2 (a group of one sample has no baseline: every advantage would be 0)")


# --------------------------------------------------------------------------------------------
# GRPO and Dr. GRPO
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GRPOConfig(OnlineConfig):
    """GRPO (Shao et al. 2024, DeepSeekMath, sec. 4.1). Defaults and where they come from:

    * ``kl_placement="loss"``, ``kl_estimator="k3"``: the KL is a loss term, estimated with k3
      (eqs. 3-4). ``kl_coef=0.04``: DeepSeekMath's beta (sec. 4.2); TRL used 0.04 and now
      defaults to 0.0.
    * ``loss_agg="token-mean"``: TRL ``GRPOConfig``'s default ``loss_type="dapo"`` (token-level
      normalisation, DAPO); the paper's eq. 3 is ``"seq-mean-token-mean"`` (TRL's ``"grpo"``).
    * ``samples_per_prompt=4``: the group size (the paper samples 64, TRL defaults to 8); 4 keeps
      the demo's rollout budget close to PPO's.
    * ``scale_rewards=True``, ``std_eps=1e-6``: divide by the group std plus eps (verl's eps;
      TRL adds 1e-4, OpenRLHF 1e-9).
    """

    section: ClassVar[str] = "grpo"

    kl_coef: float = option(0.04, "beta: weight of the KL(actor || reference) penalty")
    kl_estimator: str = option("k3", "per-token KL estimator (Schulman 2020): k1 = log-ratio, k2, k3")
    kl_placement: str = option("loss", "where the KL penalty goes: 'reward' or 'loss'")
    samples_per_prompt: int = option(4, "group size: responses sampled per prompt (>= 2)")
    scale_rewards: bool = option(True, "divide the centred group rewards by the group std (False: Dr. GRPO)")
    std_eps: float = option(1e-6, "added to the group std before dividing")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_groups(self)
        self._check_min("std_eps", 0.0)


class GRPO(OnlineAlgorithm):
    """Group Relative Policy Optimization: group-normalised outcome advantages, KL in the loss."""

    name: ClassVar[str] = "grpo"
    config_class: ClassVar[type] = GRPOConfig
    description: ClassVar[str] = "GRPO: group-normalised advantages, no critic, k3 KL in the loss (DeepSeekMath)"
    advantage_estimator: ClassVar[A.AdvantageEstimator] = A.GROUP_NORMALIZED

    config: GRPOConfig


@dataclass(frozen=True)
class DrGRPOConfig(GRPOConfig):
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective").

    GRPO with its two biases removed: no division by the group std (``scale_rewards=False``,
    the question-difficulty bias) and no division by each response's length
    (``loss_agg="seq-mean-token-sum-norm"`` with the constant ``max_new_tokens``, the length
    bias). Everything else as :class:`GRPOConfig`.
    """

    section: ClassVar[str] = "dr_grpo"

    loss_agg: str = option("seq-mean-token-sum-norm", "policy-loss aggregation (see OnlineConfig)")
    scale_rewards: bool = option(False, "divide the centred group rewards by the group std")


class DrGRPO(OnlineAlgorithm):
    """Dr. GRPO: GRPO without std scaling and without per-response length normalisation.

    The same estimator as GRPO; the two differences are config defaults (:class:`DrGRPOConfig`).
    """

    name: ClassVar[str] = "dr_grpo"
    config_class: ClassVar[type] = DrGRPOConfig
    description: ClassVar[str] = "Dr. GRPO: GRPO without std scaling or length normalisation (Liu et al. 2025)"
    advantage_estimator: ClassVar[A.AdvantageEstimator] = A.GROUP_NORMALIZED

    config: DrGRPOConfig


# --------------------------------------------------------------------------------------------
# RLOO
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLOOConfig(OnlineConfig):
    """RLOO (Ahmadian et al. 2024, "Back to Basics"). Defaults:

    * ``samples_per_prompt=4``: the paper compares k = 2 and 4, k = 4 being the stronger;
    * KL in the reward, k1, ``kl_coef=0.05``: as the paper (sequence-level KL-regularised
      reward) and TRL's ``RLOOConfig`` (``kl_coef``/``beta`` 0.05).
    """

    section: ClassVar[str] = "rloo"

    kl_coef: float = option(0.05, "beta: weight of the KL(actor || reference) penalty")
    samples_per_prompt: int = option(4, "k: responses sampled per prompt (>= 2)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_groups(self)


class RLOO(OnlineAlgorithm):
    """REINFORCE Leave-One-Out: each sample's baseline is the mean reward of the prompt's other samples."""

    name: ClassVar[str] = "rloo"
    config_class: ClassVar[type] = RLOOConfig
    description: ClassVar[str] = "RLOO: REINFORCE with a leave-one-out baseline, no critic (Ahmadian et al. 2024)"
    advantage_estimator: ClassVar[A.AdvantageEstimator] = A.LEAVE_ONE_OUT

    config: RLOOConfig


# --------------------------------------------------------------------------------------------
# REINFORCE++
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReinforcePPConfig(OnlineConfig):
    """REINFORCE++ (Hu 2025): PPO's tricks without a critic.

    Token-level KL penalty in the reward (k1, as PPO here), discounted returns with ``gamma``,
    and the returns whitened over the whole batch (global advantage normalisation) instead of a
    baseline. Shared defaults as :class:`~rlhf_algos.base.OnlineConfig`.
    """

    section: ClassVar[str] = "reinforce_pp"

    gamma: float = option(1.0, "discount of the reward-to-go")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_range("gamma", 0.0, 1.0)


class ReinforcePP(OnlineAlgorithm):
    """REINFORCE++: KL-shaped discounted returns (``gamma``), whitened over the batch, no critic, no group."""

    name: ClassVar[str] = "reinforce_pp"
    config_class: ClassVar[type] = ReinforcePPConfig
    description: ClassVar[str] = "REINFORCE++: batch-whitened KL-shaped returns, no critic (Hu 2025)"
    advantage_estimator: ClassVar[A.AdvantageEstimator] = A.BATCH_WHITENED

    config: ReinforcePPConfig


# --------------------------------------------------------------------------------------------
# ReMax
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReMaxConfig(OnlineConfig):
    """ReMax (Li et al. 2023, "ReMax: A Simple, Effective, and Efficient Reinforcement Learning
    Method for Aligning Large Language Models", Algorithm 1).

    The baseline is the reward of the greedy response to the same prompt: one extra greedy
    rollout and reward call per prompt. Shared defaults as :class:`~rlhf_algos.base.OnlineConfig`
    (KL in the reward, k1). ``reward_norm`` must stay ``"none"``: the sampled and the greedy
    scores would be whitened with different statistics.
    """

    section: ClassVar[str] = "remax"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reward_norm != "none":
            self._fail("reward_norm", "'none' (the greedy baseline already centres the reward per prompt)")


class ReMax(OnlineAlgorithm):
    """ReMax: REINFORCE with the greedy response's reward as the baseline."""

    name: ClassVar[str] = "remax"
    config_class: ClassVar[type] = ReMaxConfig
    description: ClassVar[str] = "ReMax: REINFORCE with a greedy-rollout baseline, no critic (Li et al. 2023)"
    advantage_estimator: ClassVar[A.AdvantageEstimator] = A.GREEDY_BASELINE
    env_baseline: ClassVar[bool] = True

    config: ReMaxConfig

    def baseline_scores(self, exp: Experience) -> torch.Tensor:
        """Score ``(N,)`` of the greedy response to each row's prompt (computed once per prompt).

        Runs inside ``generate_experience`` (no grad, actor in eval mode). Greedy decoding draws
        no random numbers, so the sampled rollouts are the same as without the baseline. With an
        environment (``env_rollout``): the return of a greedy episode through it
        (:meth:`~rlhf_algos.multiturn.EnvRollout.greedy_returns`), the baseline of the sampled returns.
        """
        c, k = self.config, self.config.samples_per_prompt
        prompt_ids, prompt_mask, meta = exp.prompt_ids[::k], exp.prompt_mask[::k], exp.meta[::k]
        if self.env_rollout is not None:
            return self.env_rollout.greedy_returns(self, prompt_ids, prompt_mask, meta).repeat_interleave(k)  # (N,)
        gen = generate_responses(self.actor, prompt_ids, prompt_mask, max_new_tokens=c.max_new_tokens,
                                 do_sample=False, eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id)
        scores = self.reward_fn(gen.sequences, gen.attention_mask, gen.prompt_len, meta)
        baseline = self.process_scores(scores.float().cpu())  # (B,), clipped
        return baseline.repeat_interleave(k)  # (N,)
