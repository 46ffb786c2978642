"""Advantage estimators: how a scored rollout becomes per-token advantages.

An online algorithm differs from another mainly in this one step, so it is a value the algorithm
holds rather than a method it inherits: every :class:`~rlhf_algos.base.OnlineAlgorithm` declares
an ``advantage_estimator`` (a class variable), and a user can pass another to its constructor
(``GRPO(cfg, ..., advantage_estimator=my_estimator)``).

An estimator is any callable ``(experience, config) -> AdvantageEstimate``: it reads the scored
:class:`~rlhf_algos.rollout.Experience` (``train_scores``, ``logprobs``, ``ref_logprobs``, ``values``,
``response_mask``, ...) and the algorithm's config, and returns per-token rewards, KL, advantages
and returns, all ``(N, R)`` and 0 on padding. It runs under ``torch.no_grad()`` on CPU float32.

The built-ins:

=====================  ======================================================================
``GAEEstimator()``     PPO: KL-shaped per-token rewards, GAE with the critic's values
                       (``gamma``, ``lam``), whitened when ``whiten_advantages``
``GROUP_NORMALIZED``   GRPO, Dr. GRPO: ``(r - mean_group) / (std_group + eps)`` (no std when
                       ``scale_rewards`` is False)
``LEAVE_ONE_OUT``      RLOO: ``r - mean of the other k - 1 samples`` of the prompt
``BATCH_WHITENED``     REINFORCE++: ``r`` (no baseline); the returns whitened over the batch
``GREEDY_BASELINE``    ReMax: ``r - r(greedy response to the same prompt)`` (``baseline_scores``)
=====================  ======================================================================

The last four are :class:`OutcomeEstimator` s (critic-free, outcome reward): one advantage per
sequence, placed at the last response token; the per-token KL penalty ``-kl_coef * KL_t`` added on
every token when ``kl_placement == "reward"``; the advantage of token ``t`` is the discounted
reward-to-go (:func:`~rlhf_algos.functional.discounted_returns`, as OpenRLHF does). With the KL in
the loss (GRPO's default) every token of a response simply gets its sequence advantage.

Multi-turn trajectories (``Experience.turn_rewards`` set, :mod:`rlhf_algos.multiturn`): the
``response_mask`` is the loss mask, 1 on the model's tokens only, so rewards, advantages and returns
live on model tokens only; the environment's tokens between turns are skipped by GAE and the
reward-to-go (not time steps). PPO (GAE) takes each non-final turn's reward as it is, at that turn's
last model token, and the final reward at the last model token.

The critic-free estimators use one rule for per-turn rewards (*return-normalised reward-to-go*).
A trajectory's return is ``G_i = sum of its turn rewards r_ij + its final reward``. The baseline
``b_i`` and the scale ``s_i`` come from the returns: GRPO ``b`` = the group mean of ``G``, ``s = 1 /
(std_group(G) + eps)`` (``s = 1`` without ``scale_rewards``); RLOO ``b_i`` = the mean ``G`` of the
other samples, ``s = 1``; ReMax ``b_i`` = the return of the greedy episode, ``s = 1``; REINFORCE++
``b = 0``, ``s = 1`` (its returns whitened over the batch afterwards). The advantage of a token in
turn ``j`` of trajectory ``i`` is its reward-to-go minus the baseline, scaled::

    A_ij = s_i * (r_ij + r_i,j+1 + ... + final_i - b_i)

so the first turn's tokens get exactly the single-turn advantage of the whole return (for GRPO,
``(G_i - mean G) / (std G + eps)``), and a later turn's tokens do not get credit for the rewards of
turns before it (which they did not cause). Implemented by placing ``s_i * r_ij`` at each turn's last
model token and ``A_i - s_i * sum_j r_ij`` (``A_i`` the estimator's advantage of ``G_i``) at the last
model token, then the reward-to-go (``gamma`` 1 by default). A group of identical returns (or of one
sample) gets 0 on every token (``s = 0``), as in single-turn GRPO / RLOO. Turn rewards are not
clipped nor whitened (``clip_reward`` / ``reward_norm`` apply to the final reward). Sources: the
return normalised per group as verl's GRPO estimator does (its token-level rewards summed into one
score per response), but credited per turn as DeepSeekMath's process-supervision GRPO credits steps
(Shao et al. 2024, sec. 4.1.3: a token's advantage sums the normalised rewards of the steps from its
own on); unlike there, the statistics are those of the returns, not of the individual step rewards,
so that a trajectory's number of turns does not shift its baseline. Hand-computed cases:
``packages/rlhf-algos/tests/test_multiturn_advantages.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from . import functional as F
from .rollout import AdvantageEstimate, Experience

__all__ = [
    "BATCH_WHITENED",
    "GAEEstimator",
    "GREEDY_BASELINE",
    "GROUP_NORMALIZED",
    "LEAVE_ONE_OUT",
    "AdvantageEstimator",
    "OutcomeEstimator",
]


class AdvantageEstimator(Protocol):
    """``(experience, config) -> AdvantageEstimate``; see the module docstring."""

    def __call__(self, exp: Experience, config: Any) -> AdvantageEstimate: ...


def _reward_kl_coef(config: Any) -> float:
    """The KL coefficient *in the reward*: ``kl_coef``, or 0 when the KL is in the loss."""
    return config.kl_coef if config.kl_placement == "reward" else 0.0


def _shaped(exp: Experience, sequence_scores: torch.Tensor, config: Any,
            turn_scale: torch.Tensor | None = None) -> F.ShapedRewards:
    """KL-shaped rewards with ``sequence_scores (N,)`` at the last model token; multi-turn: each non-final
    turn's reward (already at that turn's last model token) times ``turn_scale (N,)`` (default 1)."""
    # The scores were clipped (clip_reward) when the experience was scored; clamping twice would change nothing.
    shaped = F.kl_shaped_rewards(sequence_scores, exp.logprobs, exp.ref_logprobs, exp.response_mask,
                                 kl_coef=_reward_kl_coef(config), clip_reward=None, estimator=config.kl_estimator)
    if exp.turn_rewards is None:
        return shaped
    turn = exp.turn_rewards * exp.response_mask  # (N, R)
    if turn_scale is not None:
        turn = turn * turn_scale[:, None]
    return F.ShapedRewards(rewards=shaped.rewards + turn, kl=shaped.kl)


@dataclass(frozen=True)
class GAEEstimator:
    """PPO's estimator (Schulman et al. 2016): KL-shaped rewards, then GAE with the critic's values.

    Reads ``config.gamma``, ``config.lam`` and ``config.whiten_advantages``; the returns are the
    value targets.
    """

    def __call__(self, exp: Experience, config: Any) -> AdvantageEstimate:
        mask = exp.response_mask
        shaped = _shaped(exp, exp.train_scores, config)
        adv = F.gae(shaped.rewards, exp.values * mask, mask, gamma=config.gamma, lam=config.lam)
        advantages = F.whiten(adv.advantages, mask) if config.whiten_advantages else adv.advantages
        return AdvantageEstimate(rewards=shaped.rewards, kl=shaped.kl, advantages=advantages, returns=adv.returns)


@dataclass(frozen=True)
class OutcomeEstimator:
    """A critic-free estimator from a sequence-level advantage (see the module docstring).

    Attributes:
        sequence_advantages: ``(experience, config) -> (N,)``, one advantage per row of its ``train_scores``
            (on multi-turn trajectories: of the returns, final reward plus turn rewards).
        whiten_returns: Whiten the per-token returns over the batch's valid tokens (REINFORCE++).
        turn_scale: ``(experience, config) -> (N,)``, multi-turn only: the factor on each row's turn
            rewards (``s_i`` of the module docstring); None: 1.

    The reward-to-go is discounted by ``config.gamma`` when the config has one, else by 1.
    """

    sequence_advantages: Callable[[Experience, Any], torch.Tensor]
    whiten_returns: bool = False
    turn_scale: Callable[[Experience, Any], torch.Tensor] | None = None

    def __call__(self, exp: Experience, config: Any) -> AdvantageEstimate:
        mask = exp.response_mask
        if exp.turn_rewards is None:
            seq, scale = self.sequence_advantages(exp, config), None  # (N,)
        else:  # multi-turn: the return-normalised reward-to-go of the module docstring
            turn_total = (exp.turn_rewards * mask).sum(dim=1)  # (N,)
            whole = dataclasses.replace(exp, train_scores=exp.train_scores + turn_total)  # returns G_i
            scale = torch.ones_like(turn_total) if self.turn_scale is None else self.turn_scale(whole, config)
            seq = self.sequence_advantages(whole, config) - scale * turn_total  # (N,)
        shaped = _shaped(exp, seq, config, turn_scale=scale)  # (N, R)
        returns = F.discounted_returns(shaped.rewards, mask, gamma=getattr(config, "gamma", 1.0))  # (N, R)
        advantages = F.whiten(returns, mask) if self.whiten_returns else returns
        return AdvantageEstimate(rewards=shaped.rewards, kl=shaped.kl, advantages=advantages, returns=returns)


def _group_normalized(exp: Experience, c: Any) -> torch.Tensor:
    return F.group_advantages(exp.train_scores, c.samples_per_prompt, scale=c.scale_rewards, eps=c.std_eps)


def _group_scale(exp: Experience, c: Any) -> torch.Tensor:
    return F.group_scale(exp.train_scores, c.samples_per_prompt, scale=c.scale_rewards, eps=c.std_eps)


def _leave_one_out(exp: Experience, c: Any) -> torch.Tensor:
    return F.rloo_advantages(exp.train_scores, c.samples_per_prompt)


def _leave_one_out_scale(exp: Experience, c: Any) -> torch.Tensor:
    return F.group_scale(exp.train_scores, c.samples_per_prompt, scale=False)


def _no_baseline(exp: Experience, c: Any) -> torch.Tensor:
    return exp.train_scores


def _greedy_baseline(exp: Experience, c: Any) -> torch.Tensor:
    if exp.baseline_scores is None:
        raise ValueError("GREEDY_BASELINE: the experience has no baseline_scores (the algorithm must fill them "
                         "while scoring, as ReMax's baseline_scores() does)")
    return exp.train_scores - exp.baseline_scores


GROUP_NORMALIZED = OutcomeEstimator(_group_normalized, turn_scale=_group_scale)
LEAVE_ONE_OUT = OutcomeEstimator(_leave_one_out, turn_scale=_leave_one_out_scale)
BATCH_WHITENED = OutcomeEstimator(_no_baseline, whiten_returns=True)
GREEDY_BASELINE = OutcomeEstimator(_greedy_baseline)
