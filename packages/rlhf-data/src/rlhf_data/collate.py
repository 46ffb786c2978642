"""Collators: lists of token-id examples -> padded tensors.

* SFT and pairwise batches are right-padded (training).
* Prompt batches are left-padded so that every prompt ends at the same column and generation
  appends to all rows at once.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if not s:
            continue
        if left:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids, mask


def collate_sft(examples: list[dict], pad_id: int, mask_prompt: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded SFT batch.

    Args:
        examples: dicts with ``input_ids`` (prompt + response + eos) and ``prompt_len``.
        pad_id: padding token id.
        mask_prompt: if True the prompt tokens get label ``-100`` (no loss), as in DeepSpeed-Chat's
            and TRL's completion-only training.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` — each (B, L); labels are -100 on padding
        (and on the prompt when masked) and equal ``input_ids`` elsewhere (HF convention: unshifted).
    """
    ids, mask = _pad([e["input_ids"] for e in examples], pad_id, left=False)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    if mask_prompt:
        for i, e in enumerate(examples):
            labels[i, : e["prompt_len"]] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded pairwise batch: rows ``[0, B)`` are chosen, rows ``[B, 2B)`` rejected.

    Args:
        examples: dicts with ``chosen_ids`` and ``rejected_ids`` (prompt + response + eos).

    Returns:
        ``input_ids`` and ``attention_mask`` (2B, L).
    """
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    ids, mask = _pad(seqs, pad_id, left=False)
    return {"input_ids": ids, "attention_mask": mask}


def collate_prompts(examples: list[dict], pad_id: int) -> dict:
    """Left-padded prompt batch for generation.

    Returns:
        ``input_ids`` and ``attention_mask`` (B, P), and ``meta``: the examples' ``meta`` dicts.
    """
    ids, mask = _pad([e["input_ids"] for e in examples], pad_id, left=True)
    return {"input_ids": ids, "attention_mask": mask, "meta": [e.get("meta", {}) for e in examples]}
