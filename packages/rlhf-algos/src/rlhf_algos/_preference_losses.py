"""Offline preference losses: DPO and its variants (IPO, cDPO), SimPO, ORPO, KTO.

Part of :mod:`rlhf_algos.functional` (import from there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._pairs import pair_accuracy
from ._stats import masked_mean, masked_sum

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "ipo")


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each response: the masked sum (or mean) of its token log-probs.

    ``average=False`` gives ``log pi(y|x)`` (DPO, IPO, KTO); ``average=True`` gives the
    length-normalised ``log pi(y|x) / |y|`` of SimPO and ORPO. A row with no valid token gives 0.

    Args:
        token_logprobs: ``(B, T)`` log-probs of the response tokens.
        mask: ``(B, T)``, float or bool, 1 = response token.
        average: Divide each row's sum by its number of valid tokens.

    Returns:
        ``(B,)``, carrying the graph of ``token_logprobs``.
    """
    if average:
        return masked_mean(token_logprobs, mask, dim=-1)
    return masked_sum(token_logprobs, mask, dim=-1)


@dataclass(frozen=True, eq=False)
class DPOLossOutput:
    """Result of :func:`dpo_loss` and :func:`simpo_loss`.

    Attributes:
        loss: 0-dim differentiable loss (mean over pairs).
        chosen_rewards: Detached ``(B,)`` implicit rewards of the chosen responses
            (``beta * (log pi - log pi_ref)`` for DPO, ``beta * avg log pi`` for SimPO).
        rejected_rewards: Detached ``(B,)`` implicit rewards of the rejected responses.
        accuracy: Detached fraction of pairs with ``chosen_reward > rejected_reward`` (ties count as wrong).
        margin: Detached mean of ``chosen_reward - rejected_reward``.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (accuracy, margin) of two ``(B,)`` reward tensors; a tie counts as wrong (``tie=0``)."""
    with torch.no_grad():
        return pair_accuracy(chosen, rejected, tie=0.0), (chosen - rejected).mean()


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``-(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z)``, per element; finite for any ``z``."""
    losses = -F.logsigmoid(logits)
    if label_smoothing != 0.0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def _check_label_smoothing(label_smoothing: float) -> None:
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 0.5]")


def _check_dpo_options(loss_type: str, beta: float, label_smoothing: float) -> None:
    """The ``ValueError`` checks of :func:`dpo_loss`'s options, in the order it documents them."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not supported; expected one of {DPO_LOSS_TYPES}")
    if beta <= 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    _check_label_smoothing(label_smoothing)
    if label_smoothing != 0.0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing={label_smoothing!r} is only defined for loss_type='sigmoid'")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """Direct preference optimisation and the variants that share its log-ratio margin.

    With ``h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`` per pair:

    * ``"sigmoid"``: ``-log sigmoid(beta * h)`` (Rafailov et al. 2023, "Direct Preference
      Optimization", eq. 7). With ``label_smoothing = eps > 0`` this is conservative DPO
      (cDPO; Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"):
      ``-(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)``, i.e. the labels
      are assumed flipped with probability ``eps``.
    * ``"ipo"``: ``(h - 1 / (2 * beta))**2`` (Azar et al. 2023, "A General Theoretical Paradigm
      to Understand Learning from Human Preferences", eq. 17, with ``tau = beta``). Uses
      summed log-probs as the paper does; TRL length-normalises them for IPO.

    ``logsigmoid`` keeps the sigmoid losses finite for log-ratios of any size (``±1e4``
    included); the reference log-probs are treated as constants.

    Args:
        policy_chosen_logps: ``(B,)`` sequence log-probs of the chosen responses (with graph).
        policy_rejected_logps: ``(B,)`` sequence log-probs of the rejected responses.
        ref_chosen_logps: ``(B,)`` the same under the frozen reference policy.
        ref_rejected_logps: ``(B,)``.
        beta: Inverse temperature of the implicit reward (KL strength); ``tau`` for IPO.
        loss_type: One of :data:`DPO_LOSS_TYPES`.
        label_smoothing: cDPO label-flip probability, ``[0, 0.5]``; only for ``"sigmoid"``.

    Returns:
        :class:`DPOLossOutput`.

    Raises:
        ValueError: On an unknown ``loss_type``, ``beta <= 0``, ``label_smoothing`` outside
            ``[0, 0.5]`` or non-zero with a loss type other than ``"sigmoid"``.
    """
    _check_dpo_options(loss_type, beta, label_smoothing)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps.detach()  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps.detach()  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid_loss(beta * h, label_smoothing)
    else:  # "ipo"
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    accuracy, margin = _pair_metrics(chosen_rewards, rejected_rewards)
    return DPOLossOutput(loss=losses.mean(), chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                         accuracy=accuracy, margin=margin)


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
) -> DPOLossOutput:
    """SimPO: reference-free, length-normalised preference loss (Meng et al. 2024, eq. 6).

    ``-log sigmoid(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma)``, where
    ``avg_logp(y) = log pi(y|x) / |y|`` (see :func:`sequence_logprobs` with ``average=True``)
    and ``gamma`` is the target reward margin. ``label_smoothing`` applies the cDPO smoothing
    to the same logit (as the SimPO reference code does). Defaults: ``beta = 2.0`` and
    ``gamma = 1.0`` (``gamma / beta = 0.5``), the paper's Llama-3-Base setting.

    Args:
        chosen_avg_logps: ``(B,)`` length-normalised log-probs of the chosen responses.
        rejected_avg_logps: ``(B,)`` length-normalised log-probs of the rejected responses.
        beta: Reward scale.
        gamma: Target margin.
        label_smoothing: In ``[0, 0.5]``.

    Returns:
        :class:`DPOLossOutput` with rewards ``beta * avg_logp``.

    Raises:
        ValueError: If ``beta <= 0`` or ``label_smoothing`` is outside ``[0, 0.5]``.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    _check_label_smoothing(label_smoothing)
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma  # (B,)
    losses = _smoothed_sigmoid_loss(logits, label_smoothing)
    chosen_rewards = beta * chosen_avg_logps.detach()
    rejected_rewards = beta * rejected_avg_logps.detach()
    accuracy, margin = _pair_metrics(chosen_rewards, rejected_rewards)
    return DPOLossOutput(loss=losses.mean(), chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                         accuracy=accuracy, margin=margin)


@dataclass(frozen=True, eq=False)
class ORPOLossOutput:
    """Result of :func:`orpo_loss`.

    Attributes:
        loss: 0-dim differentiable ``nll + lam * or_loss``.
        nll: Detached 0-dim NLL (SFT) term on the chosen responses.
        or_loss: Detached 0-dim odds-ratio term (before ``lam``).
        log_odds_ratio: Detached 0-dim mean of ``log(odds(y_w) / odds(y_l))``.
        chosen_rewards: Detached ``(B,)`` ``lam * avg_logp(y_w)`` (TRL's convention).
        rejected_rewards: Detached ``(B,)`` ``lam * avg_logp(y_l)``.
        accuracy: Detached fraction of pairs with ``chosen_reward > rejected_reward`` (ties count as wrong).
        margin: Detached mean of ``chosen_reward - rejected_reward``.
    """

    loss: torch.Tensor
    nll: torch.Tensor
    or_loss: torch.Tensor
    log_odds_ratio: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


# log p of a response is <= 0, and its odds p / (1 - p) are infinite at log p = 0. Clamping log p
# to <= -1e-6 bounds the log-odds at about 13.8 (and the gradient at about 1e6) for degenerate
# inputs; the clamp never binds for a policy that puts less than 0.999999 average per-token
# probability on a response.
_ORPO_MAX_AVG_LOGP = -1e-6


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012, "Accurately
    Computing log(1 - exp(-|a|))"): ``log(-expm1(x))`` near 0, ``log1p(-exp(x))`` far from it.
    Both branches are finite for ``x <= -1e-6``, so neither leaks nan into the gradient."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    lam: float = 0.1,
) -> ORPOLossOutput:
    """Odds-ratio preference optimisation (Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model", eqs. 6-7).

    ``L = L_SFT + lam * L_OR`` with ``L_OR = -log sigmoid(log(odds(y_w) / odds(y_l)))`` and
    ``odds(y) = P(y|x) / (1 - P(y|x))`` where ``P(y|x) = exp(avg_logp(y))`` is the
    length-normalised likelihood (eq. 4). ``log odds = a - log(1 - exp(a))`` is computed with
    :func:`_log1mexp`, and ``a`` is clamped to ``<= -1e-6`` (a deviation: at ``a = 0`` the odds
    are infinite), so an average log-prob of 0 gives a finite loss and gradient. Default
    ``lam = 0.1`` as in the paper's experiments and TRL's ``ORPOConfig.beta``.

    Args:
        chosen_avg_logps: ``(B,)`` length-normalised log-probs of the chosen responses.
        rejected_avg_logps: ``(B,)`` length-normalised log-probs of the rejected responses.
        chosen_nll: The SFT term: token-mean NLL of the chosen responses, 0-dim (or ``(B,)``,
            averaged).
        lam: Weight ``lambda`` of the odds-ratio term.

    Returns:
        :class:`ORPOLossOutput`.

    Raises:
        ValueError: If ``lam < 0``.
    """
    if lam < 0:
        raise ValueError(f"lam={lam!r} must be >= 0")
    a_w = chosen_avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP)
    a_l = rejected_avg_logps.clamp(max=_ORPO_MAX_AVG_LOGP)
    log_odds_ratio = (a_w - _log1mexp(a_w)) - (a_l - _log1mexp(a_l))  # (B,)
    or_losses = -F.logsigmoid(log_odds_ratio)  # (B,)
    nll = chosen_nll.mean()
    loss = nll + lam * or_losses.mean()
    chosen_rewards = lam * chosen_avg_logps.detach()
    rejected_rewards = lam * rejected_avg_logps.detach()
    accuracy, margin = _pair_metrics(chosen_rewards, rejected_rewards)
    return ORPOLossOutput(loss=loss, nll=nll.detach(), or_loss=or_losses.detach().mean(),
                          log_odds_ratio=log_odds_ratio.detach().mean(), chosen_rewards=chosen_rewards,
                          rejected_rewards=rejected_rewards, accuracy=accuracy, margin=margin)


@dataclass(frozen=True, eq=False)
class KTOLossOutput:
    """Result of :func:`kto_loss`.

    Attributes:
        loss: 0-dim differentiable loss (mean over all rows).
        rewards: Detached ``(B,)`` implicit rewards ``beta * (log pi - log pi_ref)``.
        z0: Detached 0-dim reference point ``max(kl_ref, 0)`` that was used.
        desirable_reward: Detached mean reward of the desirable rows (0 if there are none).
        undesirable_reward: Detached mean reward of the undesirable rows (0 if there are none).
    """

    loss: torch.Tensor
    rewards: torch.Tensor
    z0: torch.Tensor
    desirable_reward: torch.Tensor
    undesirable_reward: torch.Tensor


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_ref: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """Kahneman-Tversky optimisation on unpaired feedback (Ethayarajh et al. 2024, eq. 8).

    With ``r = log pi(y|x) - log pi_ref(y|x)`` and the reference point ``z0 = max(kl_ref, 0)``
    (detached: no gradient flows through it, as in the paper and TRL)::

        v(x, y) = lambda_D * sigmoid(beta * (r - z0))   if y is desirable
                  lambda_U * sigmoid(beta * (z0 - r))   if y is undesirable
        L       = mean(lambda_y - v(x, y))

    ``lambda_y - v`` is computed as ``lambda_y * sigmoid(-(...))`` (the same value, without the
    cancellation of ``1 - sigmoid`` near 1), finite for any log-ratio.

    Args:
        policy_logps: ``(B,)`` sequence log-probs under the policy (with graph).
        ref_logps: ``(B,)`` sequence log-probs under the reference.
        desirable: ``(B,)`` bool, True for desirable examples.
        kl_ref: Estimate of ``KL(pi || pi_ref)`` (0-dim tensor or float), clamped at 0 and
            detached here. The paper estimates it on mismatched (x, y') pairs of the batch.
        beta: Inverse temperature.
        desirable_weight: ``lambda_D``.
        undesirable_weight: ``lambda_U``. The paper recommends
            ``lambda_D * n_D / (lambda_U * n_U)`` in ``[1, 4/3]``.

    Returns:
        :class:`KTOLossOutput`.

    Raises:
        ValueError: If ``beta <= 0`` or a weight is negative.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta!r} must be > 0")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"desirable_weight={desirable_weight!r} and undesirable_weight={undesirable_weight!r} "
                         "must be >= 0")
    z0 = torch.as_tensor(kl_ref, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0.0)
    logratios = policy_logps - ref_logps.detach()  # (B,)
    desirable = desirable.to(device=policy_logps.device, dtype=torch.bool)
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (logratios - z0)),
        undesirable_weight * torch.sigmoid(-beta * (z0 - logratios)),
    )  # (B,)
    with torch.no_grad():
        rewards = beta * logratios.detach()
        d = desirable.to(rewards.dtype)
        desirable_reward = masked_mean(rewards, d)
        undesirable_reward = masked_mean(rewards, 1.0 - d)
    return KTOLossOutput(loss=losses.mean(), rewards=rewards, z0=z0, desirable_reward=desirable_reward,
                         undesirable_reward=undesirable_reward)
