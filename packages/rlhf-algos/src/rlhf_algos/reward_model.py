"""Reward-model training as an algorithm: the pairwise (Bradley-Terry) loss plus a centring term.

The batches are :func:`rlhf_data.collate_pairs`'s: ``2B`` right-padded rows, the ``B`` chosen
prompt + response sequences first, then the ``B`` rejected ones. The model scores each row at its
last real token (``score``; ``rlhf_hybrid.HybridEngine`` around a ``ValueModel``). With a packed
``batch_layout`` they are :func:`rlhf_data.collate_pairs_padding_free`'s: the same ``2B`` sequences
packed into rows, each scored at its own last token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import functional as F
from .base import Algorithm, AlgorithmConfig, _to_floats, option
from .protocols import TrainableScorer

__all__ = ["RM", "RMConfig"]


@dataclass(frozen=True)
class RMConfig(AlgorithmConfig):
    """Reward-model options."""

    section: ClassVar[str] = "rm"

    center_coef: float = option(0.01, "weight of the centring term mean((r_c + r_r)^2) that keeps scores "
                                      "comparable across prompts (Eisenstein et al. 2023); 0 = Bradley-Terry only")
    batch_layout: str = option("padded", "\"padded\" (right-padded rows), or the same micro-batch's pairs packed "
                                         "padding-free (rlhf_data.collate_pairs_padding_free: position ids restarting "
                                         "per sequence, each scored at its last token; the same loss): \"rows\" "
                                         "(rows no longer than the longest sequence: sdpa/eager attention) or "
                                         "\"one_row\" (flash attention)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.center_coef < float("inf"):  # nan fails this comparison too
            self._fail("center_coef", "a finite number >= 0")
        from rlhf_data import PADDING_FREE_LAYOUTS

        self._check_choice("batch_layout", ("padded", *PADDING_FREE_LAYOUTS))


class RM(Algorithm):
    """Reward model: one optimiser step per micro-batch of preference pairs.

    ``loss = mean(-log sigmoid(r_c - r_r)) + center_coef * mean((r_c + r_r)^2)``
    (:func:`~rlhf_algos.functional.pairwise_reward_loss`; Ouyang et al. 2022, eq. 1, plus the
    centring term), on the score at each sequence's last real token.

    Args:
        config: An :class:`RMConfig`.
        model: The reward model being trained (``score`` with its graph, ``backward``, ``step``,
            ``train``, ``eval``).
        reduce_metrics: Applied to the metrics dict before it is returned.

    Raises:
        TypeError: If ``config`` is not an :class:`RMConfig`.
    """

    name: ClassVar[str] = "rm"
    kind: ClassVar[str] = "reward_model"
    data_kind: ClassVar[str] = "pairs"
    required_models: ClassVar[tuple[str, ...]] = ("reward",)
    config_class: ClassVar[type] = RMConfig
    description: ClassVar[str] = "Reward model: pairwise Bradley-Terry loss + centring term (InstructGPT eq. 1)"

    config: RMConfig

    def __init__(self, config: RMConfig, *, model: TrainableScorer,
                 reduce_metrics: Callable[[dict], dict] | None = None) -> None:
        self._init_config(config, reduce_metrics)
        self.model = model

    def collate(self, examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
        """A micro-batch for :meth:`learn` from tokenized pairs: ``collate_pairs``, or
        ``collate_pairs_padding_free`` (a packed ``batch_layout``)."""
        from rlhf_data import collate_pairs, collate_pairs_padding_free

        if self.config.batch_layout != "padded":
            return collate_pairs_padding_free(examples, pad_token_id, layout=self.config.batch_layout)
        return collate_pairs(examples, pad_token_id)

    def learn(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One step on a micro-batch from :meth:`collate` (padded: ``2B`` rows; packed: ``2B`` sequences).

        Returns:
            ``loss``, ``train_accuracy`` (pairs with ``r_c > r_r``, a tie counting as wrong) and
            ``margin`` (mean ``r_c - r_r``) of the micro-batch.

        Raises:
            ValueError: If the batch has an odd number of rows.
        """
        packed = "last_index" in batch  # one score per packed sequence, not per row
        n = batch["last_index"].shape[0] if packed else batch["input_ids"].shape[0]
        if n % 2 != 0:
            what = "sequences" if packed else "rows"
            raise ValueError(f"{self.name}: a pairs batch has 2B {what} (B chosen, then B rejected); got {n}")
        half = n // 2
        self.model.train()
        if packed:
            scores = self.model.score(batch["input_ids"], None, position_ids=batch["position_ids"],
                                      last_index=batch["last_index"])  # (2B,)
        else:
            scores = self.model.score(batch["input_ids"], batch["attention_mask"])  # (2B,)
        out = F.pairwise_reward_loss(scores[:half], scores[half:], center_coef=self.config.center_coef)
        self.model.backward(out.loss)
        self.model.step()
        metrics = {"loss": out.loss.detach().float(), "train_accuracy": out.accuracy.float(),
                   "margin": out.margin.float()}
        return self.reduce_metrics(_to_floats(metrics))

    def scores(self, pairs: list[dict], pad_token_id: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and of the rejected responses of tokenized ``pairs``: two ``(n,)`` CPU tensors.

        No gradients; the model is left in train mode.
        """
        from rlhf_data import collate_pairs

        chosen, rejected = [], []
        self.model.eval()
        with torch.no_grad():
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i : i + batch_size]
                b = collate_pairs(chunk, pad_token_id)
                s = self.model.score(b["input_ids"], b["attention_mask"]).cpu()  # (2b,)
                chosen.append(s[: len(chunk)])
                rejected.append(s[len(chunk) :])
        self.model.train()
        return torch.cat(chosen), torch.cat(rejected)

    def evaluate(self, pairs: list[dict], pad_token_id: int, batch_size: int = 64) -> dict[str, float]:
        """Held-out pairwise accuracy of tokenized ``pairs``, a tie counting half.

        Against the true labels where the data knows them (a pair whose ``meta["flipped"]`` is true
        had its labels flipped on purpose, as the demo task's label noise: its "rejected" response is
        the right one) and against the labels as given. A constant scorer (a fresh, zero-initialised
        head) scores 0.5.

        Returns:
            ``accuracy`` (true labels), ``accuracy_noisy_labels`` (labels as given), ``score_mean``.
        """
        c, r = self.scores(pairs, pad_token_id, batch_size)
        flipped = torch.tensor([bool(p["meta"].get("flipped", False)) for p in pairs])
        true_c, true_r = torch.where(flipped, r, c), torch.where(flipped, c, r)
        return {"accuracy": F.pair_accuracy(true_c, true_r).item(),
                "accuracy_noisy_labels": F.pair_accuracy(c, r).item(),
                "score_mean": torch.cat([c, r]).mean().item()}

