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
        examples: dicts with ``input_ids`` (prompt + response + eos) and ``prompt_len``, or with
            ``labels`` of their own (a multi-turn demonstration whose tool turns are out of the loss,
            :func:`rlhf_data.tool_demo.demonstration_example`): those are used as given.
        pad_id: padding token id.
        mask_prompt: if True the prompt tokens get label ``-100`` (no loss), as in DeepSpeed-Chat's
            and TRL's completion-only training (examples with their own ``labels`` keep them).

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` — each (B, L); labels are -100 on padding
        (and on the prompt when masked) and equal ``input_ids`` elsewhere (HF convention: unshifted).
    """
    ids, mask = _pad([e["input_ids"] for e in examples], pad_id, left=False)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    for i, e in enumerate(examples):
        if "labels" in e:
            if len(e["labels"]) != len(e["input_ids"]):
                raise ValueError(f"collate_sft: example {i} has {len(e['labels'])} labels for {len(e['input_ids'])} "
                                 "input_ids; they must be equal")
            labels[i, : len(e["labels"])] = torch.tensor(e["labels"], dtype=torch.long)
        elif mask_prompt:
            labels[i, : e["prompt_len"]] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded pairwise batch: rows ``[0, B)`` are chosen, rows ``[B, 2B)`` rejected.

    Args:
        examples: dicts with ``chosen_ids`` and ``rejected_ids`` (prompt + response + eos) and,
            optionally, ``prompt_len`` (as :func:`rlhf_data.tokenize_records` gives them).

    Returns:
        ``input_ids`` and ``attention_mask`` (2B, L); with ``prompt_len``, also ``response_mask``
        (2B, L): 1 on response tokens (EOS included), 0 on the prompt and padding — what preference
        optimisation (DPO, ...) sums log-probs over.
    """
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    ids, mask = _pad(seqs, pad_id, left=False)
    out = {"input_ids": ids, "attention_mask": mask}
    if examples and all("prompt_len" in e for e in examples):
        resp = mask.clone()
        for i, e in enumerate(examples + examples):  # chosen rows, then rejected rows share the prompt
            resp[i, : e["prompt_len"]] = 0
        out["response_mask"] = resp
    return out


def collate_prompts(examples: list[dict], pad_id: int) -> dict:
    """Left-padded prompt batch for generation.

    Returns:
        ``input_ids`` and ``attention_mask`` (B, P), and ``meta``: the examples' ``meta`` dicts.
    """
    ids, mask = _pad([e["input_ids"] for e in examples], pad_id, left=True)
    return {"input_ids": ids, "attention_mask": mask, "meta": [e.get("meta", {}) for e in examples]}


# ----------------------------------------------------------------------------------------------
# sequence packing (SFT)
# ----------------------------------------------------------------------------------------------
def pack_sft(examples: list[dict], max_len: int) -> list[dict]:
    """Pack SFT examples into rows of at most ``max_len`` tokens (first fit, in order).

    Each packed row holds ``input_ids``, ``position_ids`` (restarting at 0 for every example, which
    is how the model tells the examples apart) and ``loss_mask`` (1 on response tokens, 0 on prompt
    tokens and on each example's first token, which must not be predicted from the example before).

    Raises:
        ValueError: an example is longer than ``max_len``.
    """
    rows: list[dict] = []
    open_rows: list[dict] = []
    for n, e in enumerate(examples):
        ids, plen = list(e["input_ids"]), e["prompt_len"]
        if len(ids) > max_len:
            raise ValueError(f"pack_sft: example {n} has {len(ids)} tokens, more than max_len={max_len}")
        target = next((r for r in open_rows if len(r["input_ids"]) + len(ids) <= max_len), None)
        if target is None:
            target = {"input_ids": [], "position_ids": [], "loss_mask": []}
            rows.append(target)
            open_rows.append(target)
        target["input_ids"] += ids
        target["position_ids"] += list(range(len(ids)))
        target["loss_mask"] += [0] * max(plen, 1) + [1] * (len(ids) - max(plen, 1))
        open_rows = [r for r in open_rows if len(r["input_ids"]) < max_len]
    return rows


def collate_packed(rows: list[dict], pad_id: int, mask_prompt: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded batch of packed rows (see :func:`pack_sft`).

    Returns:
        ``input_ids``, ``position_ids`` and ``labels`` (B, L). No ``attention_mask``: the model
        must be called with ``attention_mask=None``, these ``position_ids`` and ``use_cache=False``
        so that its attention stays inside each example (transformers' packed-sequence masking
        reads the position ids only without a mask and without a KV cache). Padding
        positions restart at 0 too, so they form one more (ignored) sequence.
    """
    ids, mask = _pad([r["input_ids"] for r in rows], pad_id, left=False)
    pos = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        pos[i, :n] = torch.tensor(r["position_ids"])
        pos[i, n:] = torch.arange(ids.shape[1] - n)
        keep = torch.tensor(r["loss_mask"], dtype=torch.bool)
        if not mask_prompt:  # only each example's first token stays unlearned
            keep = torch.tensor(r["position_ids"]) > 0
        labels[i, :n] = torch.where(keep, ids[i, :n], IGNORE_INDEX)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}
