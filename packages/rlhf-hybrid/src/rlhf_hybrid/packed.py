"""Checks for packed (padding-free) rows before they reach the model.

Packed rows (``rlhf_data.collate_sft_padding_free``, ``collate_pairs_padding_free``,
``collate_packed``) hold several sequences per row, told apart only by ``position_ids`` that
restart at 0; the model is called with ``attention_mask=None``. transformers keeps attention inside
each sequence from those position ids: for ``sdpa`` and ``eager`` attention on any number of rows
(``masking_utils.find_packed_sequence_indices`` builds a block-diagonal causal mask), for flash
attention only on a single row (``modeling_flash_attention_utils._is_packed_sequence`` returns False
for a batch of more than one row, and the kernel then attends across the sequences of a row).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["attn_implementation", "packed_positions_checked", "padding_free_layout"]


def attn_implementation(module: nn.Module) -> str:
    """The attention implementation transformers runs for ``module`` ("" when it has no HF config)."""
    config = getattr(module, "config", None)
    return str(getattr(config, "_attn_implementation", "") or "")


def packed_positions_checked(module: nn.Module, position_ids: torch.Tensor | None) -> torch.Tensor:
    """``position_ids`` (R, L) of packed rows, after checking the model keeps their sequences apart.

    Raises:
        ValueError: ``position_ids`` is missing, or the model uses flash attention and there is more than
            one row (flash attention keeps packed sequences apart on a single row only).
    """
    if position_ids is None:
        raise ValueError("packed rows (attention_mask=None) need position_ids restarting at 0 for each sequence")
    impl = attn_implementation(module)
    if "flash" in impl and position_ids.dim() == 2 and position_ids.shape[0] > 1:
        raise ValueError(f"packed rows: the model's attention is {impl!r}, which keeps packed sequences apart only "
                         f"in a single row, but the batch has {position_ids.shape[0]} rows; pack each micro-batch "
                         f"into one row (rlhf_data.collate_*_padding_free with layout='one_row') or use "
                         f"attn_implementation 'sdpa' or 'eager'")
    return position_ids


def padding_free_layout(module: nn.Module) -> str:
    """The ``rlhf_data`` padding-free layout for ``module``: ``"one_row"`` under flash attention (the only
    layout it keeps apart), else ``"rows"`` (rows no longer than the longest sequence: with ``sdpa``/``eager``
    a dense mask per row, so attention costs at most the padded batch's)."""
    return "one_row" if "flash" in attn_implementation(module) else "rows"
