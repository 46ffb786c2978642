"""Supervised fine-tuning as an algorithm: token-mean NLL of the responses, prompt tokens masked.

The batches are ``rlhf_data``'s: :func:`rlhf_data.collate_sft` (right-padded prompt + response +
EOS rows whose ``labels`` are ``IGNORE_INDEX`` on padding and, with ``mask_prompt``, on the prompt)
or, with ``packing``, :func:`rlhf_data.collate_packed` over :func:`rlhf_data.pack_sft` rows
(several samples per row, kept apart by their position ids). :meth:`SFT.collate` picks the one the
config asks for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from . import functional as F
from .base import Algorithm, AlgorithmConfig, _to_floats, option
from .protocols import TrainablePolicy

__all__ = ["SFT", "SFTConfig", "sft_batch_loss", "target_mask"]


def target_mask(labels: torch.Tensor) -> torch.Tensor:
    """The loss mask of next-token log-probs from collated ``labels`` ``(B, L)``: ``(B, L - 1)`` float.

    Position ``j`` scores token ``j + 1`` (``token_logprobs(..., start=1)``); it counts when that
    token's label is not ``rlhf_data.IGNORE_INDEX`` (-100: padding and, with ``mask_prompt``, the
    prompt), i.e. on the response tokens and their EOS.
    """
    from rlhf_data import IGNORE_INDEX

    return (labels[:, 1:] != IGNORE_INDEX).float()


def sft_batch_loss(policy: TrainablePolicy, batch: dict[str, torch.Tensor]) -> F.SFTLossOutput:
    """:func:`~rlhf_algos.functional.sft_loss` of ``policy`` on one collated batch (with grad).

    The one SFT forward: :meth:`SFT.learn` and the online algorithms' ptx term
    (:meth:`~rlhf_algos.base.OnlineAlgorithm.ptx_loss`) both call it.

    Args:
        policy: Anything with ``token_logprobs`` (and ``position_ids`` support for packed rows).
        batch: ``rlhf_data.collate_sft`` output (``input_ids``, ``attention_mask``, ``labels``: ``(B, L)``),
            or packed rows (``rlhf_data.collate_packed`` / ``collate_sft_padding_free``: ``input_ids``,
            ``position_ids``, ``labels``, no attention mask: the position ids keep attention inside each sample).
    """
    if "position_ids" in batch:
        lp = policy.token_logprobs(batch["input_ids"], None, 1, position_ids=batch["position_ids"])
    else:
        lp = policy.token_logprobs(batch["input_ids"], batch["attention_mask"], 1)  # (B, L - 1)
    return F.sft_loss(lp, target_mask(batch["labels"]).to(lp.device))


@dataclass(frozen=True)
class SFTConfig(AlgorithmConfig):
    """SFT options (the demo's and DeepSpeed-Chat's defaults: completion-only, no packing)."""

    section: ClassVar[str] = "sft"

    mask_prompt: bool = option(True, "no loss on prompt tokens (completion-only training, as DeepSpeed-Chat "
                                     "and TRL); the EOS is a response token, so the model learns to stop")
    packing: bool = option(False, "batches are packed rows (rlhf_data.pack_sft, collate_packed): several samples "
                                  "per row, attention kept inside each sample through position ids")
    batch_layout: str = option("padded", "\"padded\" (right-padded rows), or the same micro-batch's samples packed "
                                         "padding-free (rlhf_data.collate_sft_padding_free: position ids restarting "
                                         "per sample; the same loss): \"rows\" (rows no longer than the longest "
                                         "sample: sdpa/eager attention) or \"one_row\" (flash attention); not with "
                                         "packing, whose rows are packed already")

    def __post_init__(self) -> None:
        from rlhf_data import PADDING_FREE_LAYOUTS

        self._check_choice("batch_layout", ("padded", *PADDING_FREE_LAYOUTS))
        if self.packing and self.batch_layout != "padded":
            self._fail("batch_layout", "'padded' with packing=True (its rows are packed already)")


class SFT(Algorithm):
    """Supervised fine-tuning: one optimiser step per micro-batch of demonstrations.

    ``loss = -sum(m_t * log p(y_t | y_<t)) / sum(m_t)`` over every target token of the micro-batch
    (:func:`~rlhf_algos.functional.sft_loss`), ``m`` = :func:`target_mask`. Gradient accumulation is
    the policy engine's business (``step`` updates at the accumulation boundary).

    Args:
        config: An :class:`SFTConfig`.
        policy: The model being trained (``token_logprobs``, ``backward``, ``step``, ``train``,
            ``eval``; with ``packing`` or a packed ``batch_layout``, ``token_logprobs`` also takes ``position_ids``).
        reduce_metrics: Applied to the metrics dict before it is returned.

    Raises:
        TypeError: If ``config`` is not an :class:`SFTConfig`.
    """

    name: ClassVar[str] = "sft"
    kind: ClassVar[str] = "supervised"
    data_kind: ClassVar[str] = "demonstrations"
    required_models: ClassVar[tuple[str, ...]] = ("actor",)
    config_class: ClassVar[type] = SFTConfig
    description: ClassVar[str] = "SFT: token-mean NLL of the responses, prompt tokens masked (completion-only)"

    config: SFTConfig

    def __init__(self, config: SFTConfig, *, policy: TrainablePolicy,
                 reduce_metrics: Callable[[dict], dict] | None = None) -> None:
        self._init_config(config, reduce_metrics)
        self.policy = policy

    def collate(self, examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
        """A micro-batch for :meth:`learn` from tokenized examples (or packed rows, with ``packing``)."""
        from rlhf_data import collate_packed, collate_sft, collate_sft_padding_free

        if self.config.packing:
            return collate_packed(examples, pad_token_id, mask_prompt=self.config.mask_prompt)
        if self.config.batch_layout != "padded":
            return collate_sft_padding_free(examples, pad_token_id, mask_prompt=self.config.mask_prompt,
                                            layout=self.config.batch_layout)
        return collate_sft(examples, pad_token_id, mask_prompt=self.config.mask_prompt)

    def learn(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One step on a micro-batch from :meth:`collate`; returns ``{"loss": ...}``."""
        self.policy.train()
        loss = sft_batch_loss(self.policy, batch).loss
        self.policy.backward(loss)
        self.policy.step()
        return self.reduce_metrics(_to_floats({"loss": loss.detach().float()}))

    def evaluate(self, examples: list[dict], pad_token_id: int, batch_size: int = 64) -> float:
        """Held-out loss: the NLL per target token over all of ``examples`` (unpacked rows), no update.

        Each batch's token-mean loss is weighted by its number of target tokens, so the result does not
        depend on ``batch_size`` beyond float rounding. The policy is left in train mode.
        """
        from rlhf_data import collate_sft

        self.policy.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                b = collate_sft(examples[i : i + batch_size], pad_token_id, mask_prompt=self.config.mask_prompt)
                lp = self.policy.token_logprobs(b["input_ids"], b["attention_mask"], 1)
                out = F.sft_loss(lp.float(), target_mask(b["labels"]).to(lp.device))
                total += out.loss.item() * out.num_tokens.item()
                count += out.num_tokens.item()
        self.policy.train()
        return total / max(count, 1)
