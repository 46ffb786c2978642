"""Plumbing of the offline (preference) algorithms: DPO, IPO, cDPO, SimPO, ORPO, KTO and plugins.

:class:`OfflineAlgorithm` forwards the chosen and rejected rows of a micro-batch of pairs,
computes a loss from their token log-probs and steps; a variant overrides only
:meth:`OfflineAlgorithm.compute_loss` (the variants are in :mod:`rlhf_algos.preference`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from . import functional as F
from .base import Algorithm, _to_floats
from .config import OfflineConfig  # its home is config.py, with the other configs; re-exported here
from .protocols import ScoringPolicy, TrainablePolicy

__all__ = ["OfflineAlgorithm", "OfflineConfig"]


class OfflineAlgorithm(Algorithm):
    """Shared plumbing of the preference algorithms; subclasses implement :meth:`compute_loss`.

    :meth:`learn` takes one micro-batch of ``B`` pairs as ``rlhf_data.collate_pairs`` builds it:
    ``input_ids``, ``attention_mask`` and ``response_mask``, each ``(2B, L)``, rows ``[0, B)``
    the chosen and ``[B, 2B)`` the rejected sequences, right-padded, ``response_mask`` 1 on
    response tokens. It runs one forward of the policy (and, without gradients, of the
    reference when the algorithm needs one), computes the loss, ``policy.backward(loss)``,
    ``policy.step()``. Gradient accumulation over micro-batches is the engine's business (as
    for DeepSpeed engines: ``step`` only updates at the accumulation boundary).

    Args:
        config: An instance of ``config_class``.
        policy: The model being trained.
        reference: The frozen reference policy; required exactly when
            ``"reference" in required_models``.
        reduce_metrics: Applied to the metrics dict before it is returned.

    Raises:
        TypeError: If ``config`` is not a ``config_class``.
        ValueError: If a reference is required and missing.
    """

    kind: ClassVar[str] = "offline"
    data_kind: ClassVar[str] = "pairs"
    required_models: ClassVar[tuple[str, ...]] = ("actor", "reference")
    config_class: ClassVar[type] = OfflineConfig

    def __init__(self, config: OfflineConfig, *, policy: TrainablePolicy, reference: ScoringPolicy | None = None,
                 reduce_metrics: Callable[[dict], dict] | None = None) -> None:
        self._init_config(config, reduce_metrics)
        if "reference" in self.required_models and reference is None:
            raise ValueError(f"{self.name}: a reference policy is required (required_models={self.required_models})")
        self.policy = policy
        self.reference = reference if "reference" in self.required_models else None

    def learn(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step on a micro-batch of pairs; returns its metrics."""
        ids, attn = batch["input_ids"], batch["attention_mask"]
        if ids.shape[0] % 2 != 0:
            raise ValueError(f"{self.name}: a pairs batch has 2B rows (B chosen, then B rejected); "
                             f"got {ids.shape[0]}")
        self.policy.train()
        logps = self.policy.token_logprobs(ids, attn, 1)  # (2B, L - 1): log p(token j | < j), j >= 1
        mask = batch["response_mask"][:, 1:].to(device=logps.device, dtype=logps.dtype)  # (2B, L - 1)
        ref_logps = None
        if self.reference is not None:
            self.reference.eval()
            with torch.no_grad():
                ref_logps = self.reference.token_logprobs(ids, attn, 1).to(device=logps.device, dtype=logps.dtype)
        loss, metrics = self.compute_loss(logps, ref_logps, mask)
        self.policy.backward(loss)
        self.policy.step()
        metrics = {"loss": loss.detach().float(), **metrics}
        return self.reduce_metrics(_to_floats(metrics))

    def compute_loss(self, logps: torch.Tensor, ref_logps: torch.Tensor | None,
                     mask: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and detached 0-dim metrics from token log-probs.

        Args:
            logps: ``(2B, T)`` policy token log-probs (with graph), chosen rows first.
            ref_logps: ``(2B, T)`` reference token log-probs, or None without a reference.
            mask: ``(2B, T)`` float, 1 on response tokens.
        """
        raise NotImplementedError

    @staticmethod
    def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2B, ...)`` -> (chosen ``(B, ...)``, rejected ``(B, ...)``)."""
        half = x.shape[0] // 2
        return x[:half], x[half:]

    @staticmethod
    def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
                     rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The metrics every preference algorithm reports (all detached 0-dim).

        ``reward_accuracy`` counts a tie as wrong (:func:`~rlhf_algos.functional.pair_accuracy` with
        ``tie=0``, TRL's convention): at the start of DPO every implicit reward is 0, so it starts at 0.
        """
        with torch.no_grad():
            diff = chosen_rewards - rejected_rewards
            return {
                "chosen_reward": chosen_rewards.mean(),
                "rejected_reward": rejected_rewards.mean(),
                "reward_accuracy": F.pair_accuracy(chosen_rewards, rejected_rewards, tie=0.0).float(),
                "reward_margin": diff.mean(),
                "chosen_logp": chosen_logps.detach().mean(),
                "rejected_logp": rejected_logps.detach().mean(),
            }
