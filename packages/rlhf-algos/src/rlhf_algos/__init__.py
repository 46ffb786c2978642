"""rlhf-algos: RLHF algorithms behind one interface; the math as pure tensor functions."""

from ._version import __version__
from .functional import (
    explained_variance,
    gae,
    kl_penalty,
    kl_shaped_rewards,
    masked_mean,
    masked_sum,
    masked_var,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
    whiten,
)
from .ppo import PPO, Experience, PPOConfig, response_mask_from
from .protocols import RewardFunction, ScoringPolicy, TrainablePolicy, ValueFunction

__all__ = [
    "PPO",
    "Experience",
    "PPOConfig",
    "RewardFunction",
    "ScoringPolicy",
    "TrainablePolicy",
    "ValueFunction",
    "__version__",
    "explained_variance",
    "gae",
    "kl_penalty",
    "kl_shaped_rewards",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "response_mask_from",
    "sft_loss",
    "whiten",
]
