"""Pure RLHF math: masked statistics, KL estimators, reward shaping, GAE and losses.

Every function here takes explicit tensors and masks and returns tensors (or a small frozen
dataclass of tensors). Nothing here knows about configs, models, optimisers or process groups;
micro-batching, accumulation and distributed reductions live in the algorithm classes.

Conventions shared by all functions:

* ``B`` is the batch (number of sequences), ``T`` the number of response tokens.
* A mask is a float or bool tensor with the same shape as the data, ``1``/``True`` = valid.
  Masked-out positions are *selected away* (``torch.where``) before any non-linear math rather
  than only multiplied by 0, so garbage at padding positions (``inf``, ``nan``, ``-inf``
  log-probs) never leaks into a result or a gradient.
* Reductions over a fully masked row or batch give ``0``, never ``nan``: denominators are
  clamped to at least 1.
* No function calls ``.item()`` or branches on tensor values in Python, so none of them forces a
  host-device sync.
* Loss functions return a frozen dataclass whose ``loss`` carries the graph and whose other fields
  are detached metrics.

This module is the public home of these names; the code lives in focused private modules, one
topic each: ``_stats`` (masked statistics, whitening, :func:`aggregate_loss`), ``_kl`` (KL
estimators, :data:`KL_ESTIMATORS`, KL-shaped rewards), ``_advantages`` (GAE, GRPO / RLOO
advantages, reward-to-go), ``_pairs`` (pair accuracy and ranking agreement, the one home of the
tie rule), ``_losses`` (PPO policy and value losses, the reward-model and SFT losses) and
``_preference_losses`` (DPO, IPO, cDPO, SimPO, ORPO, KTO and sequence log-probs).
"""

from __future__ import annotations

from ._advantages import GAEOutput, discounted_returns, gae, group_advantages, group_scale, rloo_advantages
from ._kl import KL_ESTIMATORS, KLEstimator, ShapedRewards, kl_penalty, kl_shaped_rewards
from ._losses import (
    PolicyLossOutput,
    RewardLossOutput,
    SFTLossOutput,
    ValueLossOutput,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sft_loss,
)
from ._pairs import pair_accuracy, ranked_pairs, ranking_agreement
from ._preference_losses import (
    DPO_LOSS_TYPES,
    DPOLossOutput,
    KTOLossOutput,
    ORPOLossOutput,
    dpo_loss,
    kto_loss,
    orpo_loss,
    sequence_logprobs,
    simpo_loss,
)
from ._stats import (
    LOSS_AGG_MODES,
    aggregate_loss,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    whiten,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "LOSS_AGG_MODES",
    "DPOLossOutput",
    "GAEOutput",
    "KTOLossOutput",
    "ORPOLossOutput",
    "KLEstimator",
    "KL_ESTIMATORS",
    "PolicyLossOutput",
    "RewardLossOutput",
    "SFTLossOutput",
    "ShapedRewards",
    "ValueLossOutput",
    "aggregate_loss",
    "discounted_returns",
    "dpo_loss",
    "explained_variance",
    "gae",
    "group_advantages",
    "group_scale",
    "kl_penalty",
    "kl_shaped_rewards",
    "kto_loss",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "orpo_loss",
    "pair_accuracy",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranked_pairs",
    "ranking_agreement",
    "rloo_advantages",
    "sequence_logprobs",
    "sft_loss",
    "simpo_loss",
    "whiten",
]
