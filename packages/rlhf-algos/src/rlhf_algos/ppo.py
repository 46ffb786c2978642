"""PPO for RLHF (Ouyang et al. 2022; Schulman et al. 2017), as in DeepSpeed-Chat step 3.

The recipe of one iteration, top to bottom (the plumbing is :class:`~rlhf_algos.base.OnlineAlgorithm`'s):

1. generate responses to a batch of prompts with the actor (sampling);
2. score them: actor and reference log-probs, critic values, the sequence reward;
3. shape per-token rewards: -beta * KL(actor || ref) on every token, clipped score on the last;
4. estimate advantages and returns with GAE (optionally whiten the advantages);
5. for ``ppo_epochs`` passes over micro-batches: clipped policy loss -> actor step, clipped value
   loss -> critic step.

The math lives in :mod:`rlhf_algos.functional`; steps 3-4 are the estimator
:class:`rlhf_algos.advantages.GAEEstimator`; this class adds the critic update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import advantages as A
from . import functional as F
from .base import Experience, OnlineAlgorithm, OnlineConfig, option

__all__ = ["PPO", "PPOConfig"]


@dataclass(frozen=True)
class PPOConfig(OnlineConfig):
    """PPO hyper-parameters (defaults follow DeepSpeed-Chat / InstructGPT where they exist).

    Shared options (KL, aggregation, sampling, ...) are :class:`~rlhf_algos.base.OnlineConfig`'s;
    with their defaults (KL in the reward, token-mean, one sample per prompt) this is the
    DeepSpeed-Chat recipe.
    """

    section: ClassVar[str] = "ppo"

    gamma: float = option(1.0, "GAE discount")
    lam: float = option(0.95, "GAE lambda")
    value_clip_eps: float = option(0.2, "value clip range around the rollout-time values")
    whiten_advantages: bool = option(True, "normalise advantages to mean 0 / std 1 over the batch's valid tokens")

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_min("value_clip_eps", 0.0)
        for name in ("gamma", "lam"):
            self._check_range(name, 0.0, 1.0)


class PPO(OnlineAlgorithm):
    """PPO with a critic: KL-shaped rewards, GAE, clipped policy and value losses."""

    name: ClassVar[str] = "ppo"
    required_models: ClassVar[tuple[str, ...]] = ("actor", "reference", "critic", "reward")
    config_class: ClassVar[type] = PPOConfig
    description: ClassVar[str] = "PPO with a critic and GAE (InstructGPT / DeepSpeed-Chat step 3)"
    # 3. KL-shaped per-token rewards; 4. GAE advantages and returns (whitened if configured)
    advantage_estimator: ClassVar[A.AdvantageEstimator] = A.GAEEstimator()

    config: PPOConfig

    def critic_step(self, mb: Experience, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Clipped value loss on the micro-batch -> critic step."""
        values = self.learn_values(mb)  # (n, R)
        vmask = mask.to(values.device)
        vl = F.ppo_value_loss(values, mb.values.to(values.device), mb.returns.to(values.device), vmask,
                              clip_eps=self.config.value_clip_eps)
        self.critic.backward(vl.loss)
        self.critic.step()
        return {"value_loss": vl.loss.detach().float(), "value_clip_frac": vl.clip_frac.float()}
