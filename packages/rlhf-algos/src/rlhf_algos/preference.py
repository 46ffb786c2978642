"""Offline preference optimisation on chosen/rejected pairs: DPO, IPO, cDPO, SimPO, ORPO, KTO.

Each variant is one registered class over :class:`~rlhf_algos.offline.OfflineAlgorithm`, which does
the forward passes and the optimiser step; a class only turns token log-probs into its loss with
the pure functions of :mod:`rlhf_algos.functional`. Token log-probs come in as ``(2B, T)``,
the ``B`` chosen rows first, with a ``(2B, T)`` response mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from . import functional as F
from .base import option
from .offline import OfflineAlgorithm, OfflineConfig

__all__ = [
    "CDPO",
    "DPO",
    "IPO",
    "KTO",
    "ORPO",
    "CDPOConfig",
    "DPOConfig",
    "IPOConfig",
    "KTOConfig",
    "ORPOConfig",
    "SimPO",
    "SimPOConfig",
]

_Loss = tuple[torch.Tensor, dict[str, torch.Tensor]]


# --------------------------------------------------------------------------------------------
# DPO, IPO, cDPO: one loss function, three registered variants
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DPOConfig(OfflineConfig):
    """DPO (Rafailov et al. 2023): ``beta=0.1``, the paper's main setting and TRL's default."""

    section: ClassVar[str] = "dpo"

    beta: float = option(0.1, "inverse temperature of the implicit reward (strength of the KL to the reference)")

    def __post_init__(self) -> None:
        self._check_min("beta", 0.0, strict=True)


@dataclass(frozen=True)
class IPOConfig(OfflineConfig):
    """IPO (Azar et al. 2023): ``beta`` is the paper's ``tau``; 0.1 as TRL's default."""

    section: ClassVar[str] = "ipo"

    beta: float = option(0.1, "tau: regularisation; the target log-ratio margin is 1 / (2 * beta)")

    def __post_init__(self) -> None:
        self._check_min("beta", 0.0, strict=True)


@dataclass(frozen=True)
class CDPOConfig(OfflineConfig):
    """Conservative DPO (Mitchell 2023): DPO with labels assumed flipped with probability ``label_smoothing``.

    ``label_smoothing=0.1`` is our default (the note gives the formula, not a value; TRL's
    default is 0, i.e. plain DPO): it assumes 10% noisy labels, which keeps the loss from driving
    the margin to infinity on separable data.
    """

    section: ClassVar[str] = "cdpo"

    beta: float = option(0.1, "inverse temperature of the implicit reward")
    label_smoothing: float = option(0.1, "probability that a preference label is flipped, in (0, 0.5]")

    def __post_init__(self) -> None:
        self._check_min("beta", 0.0, strict=True)
        self._check_range("label_smoothing", 0.0, 0.5, low_open=True)


class _DPOFamily(OfflineAlgorithm):
    """Reference-based pairwise losses on summed sequence log-probs, via :func:`~rlhf_algos.functional.dpo_loss`."""

    required_models: ClassVar[tuple[str, ...]] = ("actor", "reference")
    loss_type: ClassVar[str] = "sigmoid"

    def _label_smoothing(self) -> float:
        return 0.0

    def compute_loss(self, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor) -> _Loss:
        assert ref_logps is not None  # required_models has "reference"
        pol = F.sequence_logprobs(logps, mask)  # (2B,)
        ref = F.sequence_logprobs(ref_logps, mask)  # (2B,)
        (pc, pr), (rc, rr) = self.split_pairs(pol), self.split_pairs(ref)
        out = F.dpo_loss(pc, pr, rc, rr, beta=self.config.beta, loss_type=self.loss_type,
                         label_smoothing=self._label_smoothing())
        return out.loss, self.pair_metrics(out.chosen_rewards, out.rejected_rewards, pc, pr)


class DPO(_DPOFamily):
    """Direct Preference Optimization, sigmoid loss (Rafailov et al. 2023, eq. 7)."""

    name: ClassVar[str] = "dpo"
    config_class: ClassVar[type] = DPOConfig
    description: ClassVar[str] = "DPO: -log sigmoid(beta * log-ratio margin) against a reference (Rafailov et al. 2023)"


class IPO(_DPOFamily):
    """Identity Preference Optimisation: squared loss towards a finite margin (Azar et al. 2023, eq. 17)."""

    name: ClassVar[str] = "ipo"
    config_class: ClassVar[type] = IPOConfig
    description: ClassVar[str] = "IPO: (log-ratio margin - 1/(2 beta))^2, bounded margin (Azar et al. 2023)"
    loss_type: ClassVar[str] = "ipo"


class CDPO(_DPOFamily):
    """Conservative DPO: the sigmoid loss with label smoothing (Mitchell 2023)."""

    name: ClassVar[str] = "cdpo"
    config_class: ClassVar[type] = CDPOConfig
    description: ClassVar[str] = "cDPO: DPO with label smoothing for noisy preferences (Mitchell 2023)"

    def _label_smoothing(self) -> float:
        return self.config.label_smoothing


# --------------------------------------------------------------------------------------------
# SimPO and ORPO: no reference model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimPOConfig(OfflineConfig):
    """SimPO (Meng et al. 2024): ``beta=2.0``, ``gamma=1.0`` (gamma / beta = 0.5), the paper's
    Llama-3-Base setting; its recommended ranges are beta in [2, 2.5], gamma / beta around 0.5."""

    section: ClassVar[str] = "simpo"

    beta: float = option(2.0, "scale of the length-normalised reward")
    gamma: float = option(1.0, "target reward margin")
    label_smoothing: float = option(0.0, "cDPO-style label smoothing, in [0, 0.5]")

    def __post_init__(self) -> None:
        self._check_min("beta", 0.0, strict=True)
        self._check_range("label_smoothing", 0.0, 0.5)


class SimPO(OfflineAlgorithm):
    """Simple Preference Optimization: reference-free, length-normalised (Meng et al. 2024, eq. 6)."""

    name: ClassVar[str] = "simpo"
    required_models: ClassVar[tuple[str, ...]] = ("actor",)
    config_class: ClassVar[type] = SimPOConfig
    description: ClassVar[str] = "SimPO: reference-free, length-normalised reward with a margin (Meng et al. 2024)"

    config: SimPOConfig

    def compute_loss(self, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor) -> _Loss:
        c = self.config
        chosen, rejected = self.split_pairs(F.sequence_logprobs(logps, mask, average=True))  # (B,), (B,)
        out = F.simpo_loss(chosen, rejected, beta=c.beta, gamma=c.gamma, label_smoothing=c.label_smoothing)
        return out.loss, self.pair_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)


@dataclass(frozen=True)
class ORPOConfig(OfflineConfig):
    """ORPO (Hong et al. 2024): ``lam=0.1``, the paper's setting and TRL's ``ORPOConfig.beta``."""

    section: ClassVar[str] = "orpo"

    lam: float = option(0.1, "weight of the odds-ratio term next to the NLL of the chosen responses")

    def __post_init__(self) -> None:
        self._check_min("lam", 0.0)


class ORPO(OfflineAlgorithm):
    """Odds Ratio Preference Optimization: SFT on the chosen responses plus an odds-ratio term (eqs. 6-7)."""

    name: ClassVar[str] = "orpo"
    required_models: ClassVar[tuple[str, ...]] = ("actor",)
    config_class: ClassVar[type] = ORPOConfig
    description: ClassVar[str] = "ORPO: NLL on chosen + odds-ratio preference term, no reference (Hong et al. 2024)"

    config: ORPOConfig

    def compute_loss(self, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor) -> _Loss:
        avg = F.sequence_logprobs(logps, mask, average=True)  # (2B,)
        chosen, rejected = self.split_pairs(avg)
        chosen_tok, _ = self.split_pairs(logps)
        chosen_mask, _ = self.split_pairs(mask)
        nll = F.sft_loss(chosen_tok, chosen_mask).loss  # token-mean NLL over the chosen responses
        out = F.orpo_loss(chosen, rejected, nll, lam=self.config.lam)
        metrics = self.pair_metrics(out.chosen_rewards, out.rejected_rewards, chosen, rejected)
        metrics.update(nll=out.nll, log_odds_ratio=out.log_odds_ratio)
        return out.loss, metrics


# --------------------------------------------------------------------------------------------
# KTO: unpaired desirable / undesirable examples
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KTOConfig(OfflineConfig):
    """KTO (Ethayarajh et al. 2024): ``beta=0.1`` and ``lambda_D = lambda_U = 1`` (the paper's
    defaults for balanced data; every pair gives one desirable and one undesirable example)."""

    section: ClassVar[str] = "kto"

    beta: float = option(0.1, "inverse temperature of the implicit reward")
    desirable_weight: float = option(1.0, "lambda_D: weight of the desirable (chosen) examples")
    undesirable_weight: float = option(1.0, "lambda_U: weight of the undesirable (rejected) examples")

    def __post_init__(self) -> None:
        self._check_min("beta", 0.0, strict=True)
        self._check_min("desirable_weight", 0.0)
        self._check_min("undesirable_weight", 0.0)


class KTO(OfflineAlgorithm):
    """Kahneman-Tversky Optimization on pairs split into unpaired examples (Ethayarajh et al. 2024, eq. 8).

    The chosen rows are the desirable examples and the rejected rows the undesirable ones; the
    loss never compares a chosen row with its own rejected row.

    Reference point ``z0``: the paper (and TRL) estimate ``KL(pi || pi_ref)`` on *mismatched*
    pairs ``(x_i, y_j)`` of the micro-batch, which costs an extra policy and reference forward
    over re-assembled sequences. Here ``z0`` is the mean of ``log pi(y|x) - log pi_ref(y|x)``
    over all ``2B`` rows of the micro-batch (matched pairs), clamped at 0 and detached (no
    gradient, as in the paper). Both are biased estimates of the KL (neither ``y`` is sampled
    from ``pi``); this one needs no extra forward but correlates with the examples it scores.
    Being a per-micro-batch statistic, it also makes KTO's gradient depend on how a batch is
    split into micro-batches (so does the paper's estimate).
    """

    name: ClassVar[str] = "kto"
    required_models: ClassVar[tuple[str, ...]] = ("actor", "reference")
    config_class: ClassVar[type] = KTOConfig
    description: ClassVar[str] = "KTO: unpaired desirable/undesirable prospect-theory loss (Ethayarajh et al. 2024)"

    config: KTOConfig

    def compute_loss(self, logps: torch.Tensor, ref_logps: torch.Tensor | None, mask: torch.Tensor) -> _Loss:
        assert ref_logps is not None  # required_models has "reference"
        c = self.config
        pol = F.sequence_logprobs(logps, mask)  # (2B,)
        ref = F.sequence_logprobs(ref_logps, mask)  # (2B,)
        half = pol.shape[0] // 2
        desirable = torch.arange(pol.shape[0], device=pol.device) < half  # chosen rows first
        kl_ref = (pol - ref).detach().mean()  # z0 before the clamp; see the class docstring
        out = F.kto_loss(pol, ref, desirable, kl_ref, beta=c.beta, desirable_weight=c.desirable_weight,
                         undesirable_weight=c.undesirable_weight)
        chosen_rewards, rejected_rewards = self.split_pairs(out.rewards)
        pc, pr = self.split_pairs(pol)
        metrics = self.pair_metrics(chosen_rewards, rejected_rewards, pc, pr)
        metrics["kl_ref"] = out.z0
        return out.loss, metrics
