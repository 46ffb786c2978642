"""Padding-free micro-batches: the same samples as the padded collators, laid out packed.

A padded micro-batch of ``B`` sequences spends ``B * max_len - sum(len)`` token slots of compute on
padding. The collators here take exactly the examples of one padded micro-batch and concatenate
them into rows, each sequence's ``position_ids`` restarting at 0 (the padding-free layout of
transformers' ``DataCollatorWithFlattening``; Kundu et al. 2024, "Enhancing training efficiency
using packing with flash attention"). Nothing else about the step changes (the same samples, the
same loss terms, the same normalisation), so the loss and gradients equal the padded ones up to
float rounding; ``tests/test_padding_free.py`` checks this against the padded path.
:func:`pack_padded_batch` does the same for a batch that is already padded (the RL learn step's
left-padded prompt + right-padded response rows) and :func:`unpack_to_padded` maps per-token
outputs back to the padded layout (``tests/test_padding_free_rl.py``).

How attention stays inside each sequence: the model is called with ``attention_mask=None``, these
``position_ids`` and no KV cache. transformers (5.x) then finds the sequences from the position ids
(``masking_utils.find_packed_sequence_indices``: a new sequence wherever a position is not the one
before plus 1) and, for ``sdpa`` and ``eager`` attention, builds a block-diagonal causal mask per
row; ``flash_attention_2`` instead runs its variable-length kernel, but only on a single row
(``modeling_flash_attention_utils._is_packed_sequence`` requires batch size 1): with flash
attention every micro-batch must be one row (``layout="one_row"``; ``rlhf_hybrid`` refuses more).

Row layout (``layout``), measured in docs/performance.md ("Padding-free batches"):

* ``"rows"`` (default): sequences are placed first-fit, in order, into rows no longer than the
  micro-batch's longest sequence (rows right-padded to the longest row). For ``sdpa``/``eager`` the
  mask is dense per row, so this keeps attention at most the padded batch's while removing most of
  its padding; the layout for CPUs and for GPUs without flash attention.
* ``"one_row"``: the whole micro-batch is one row of ``sum(len)`` tokens, no padding at all. The
  layout flash attention needs (its cost is then the sum of the sequences' own); with
  ``sdpa``/``eager`` attention costs ``sum(len)^2`` instead of ``B * max_len^2``.

The padding at the end of a short row gets positions ``0, 1, ...`` too, so it forms one more
sequence of its own, which no loss term reads.
"""

from __future__ import annotations

import torch

from .collate import collate_packed, pack_sft

__all__ = ["PADDING_FREE_LAYOUTS", "collate_pairs_padding_free", "collate_sft_padding_free", "first_fit_rows",
           "pack_padded_batch", "packed_positions", "unpack_to_padded"]

PADDING_FREE_LAYOUTS = ("rows", "one_row")


def _row_len(layout: str, lengths: list[int]) -> int | None:
    """The row capacity of ``layout`` for sequences of ``lengths`` (None: one row)."""
    if layout == "rows":
        return max(max(lengths, default=1), 1)
    if layout == "one_row":
        return None
    raise ValueError(f"padding-free layout {layout!r} is not one of {', '.join(map(repr, PADDING_FREE_LAYOUTS))}")


def first_fit_rows(lengths: list[int], row_len: int | None) -> list[list[int]]:
    """Place sequences of ``lengths`` into rows of at most ``row_len`` tokens, first fit, in order.

    Args:
        lengths: Each sequence's token count.
        row_len: Capacity of a row; None = one row holding every sequence.

    Returns:
        Per row, the indices of its sequences in the order they are laid out.

    Raises:
        ValueError: A sequence is longer than ``row_len``, or ``row_len`` < 1.
    """
    if row_len is None:
        return [list(range(len(lengths)))] if lengths else []
    if row_len < 1:
        raise ValueError(f"row_len must be None (one row) or >= 1; got {row_len}")
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        if n > row_len:
            raise ValueError(f"sequence {i} has {n} tokens, more than row_len={row_len}")
        r = next((k for k, u in enumerate(used) if u + n <= row_len), None)
        if r is None:
            rows.append([])
            used.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        used[r] += n
    return rows


def packed_positions(lengths: list[int], width: int) -> torch.Tensor:
    """Position ids of one row holding sequences of ``lengths`` then padding, all restarting at 0: ``(width,)``."""
    parts = [torch.arange(n) for n in lengths]
    parts.append(torch.arange(width - sum(lengths)))  # the padding: one more (ignored) sequence
    return torch.cat(parts)


def collate_sft_padding_free(examples: list[dict], pad_id: int, mask_prompt: bool = True,
                             layout: str = "rows") -> dict[str, torch.Tensor]:
    """The examples of one :func:`rlhf_data.collate_sft` micro-batch as packed rows.

    The loss positions are those of ``collate_sft``: every response token (with ``mask_prompt``) or
    every token but the first (without), never a token predicted across two examples.

    Args:
        examples: dicts with ``input_ids`` (prompt + response + eos) and ``prompt_len``.
        pad_id: Padding token id.
        mask_prompt: As in ``collate_sft``.
        layout: ``"rows"`` or ``"one_row"`` (see the module docstring).

    Returns:
        ``input_ids``, ``position_ids`` and ``labels`` (R, L), as :func:`rlhf_data.collate_packed`;
        call the model with ``attention_mask=None`` and these ``position_ids``.
    """
    lengths = [len(e["input_ids"]) for e in examples]
    row_len = _row_len(layout, lengths)
    if row_len is None:
        row_len = sum(lengths) or 1
    # pack_sft is first-fit in order (first_fit_rows' layout); collate_packed right-pads the rows
    return collate_packed(pack_sft(examples, row_len), pad_id, mask_prompt=mask_prompt)


def collate_pairs_padding_free(examples: list[dict], pad_id: int, layout: str = "rows") -> dict[str, torch.Tensor]:
    """The sequences of one :func:`rlhf_data.collate_pairs` micro-batch as packed rows.

    Args:
        examples: dicts with ``chosen_ids`` and ``rejected_ids``.
        pad_id: Padding token id.
        layout: ``"rows"`` or ``"one_row"`` (see the module docstring).

    Returns:
        ``input_ids`` and ``position_ids`` (R, L), and ``last_index`` (2B, 2) long: the ``(row, column)``
        of each sequence's last token, the ``B`` chosen sequences first, then the ``B`` rejected ones
        (``collate_pairs``' row order), i.e. where a reward model scores each sequence.

    Raises:
        ValueError: An empty sequence (it has no last token).
    """
    seqs = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    for i, s in enumerate(seqs):
        if not s:
            which = "chosen_ids" if i < len(examples) else "rejected_ids"
            raise ValueError(f"collate_pairs_padding_free: example {i % max(len(examples), 1)} has empty {which}")
    ids, pos, start = _lay_out([torch.tensor(s, dtype=torch.long) for s in seqs], pad_id, layout)
    last = start.clone()
    last[:, 1] += torch.tensor([len(s) - 1 for s in seqs])
    return {"input_ids": ids, "position_ids": pos, "last_index": last}


def _lay_out(seqs: list[torch.Tensor], pad_id: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequences ``seqs`` (1-d long tensors) packed first-fit into right-padded rows of ``layout``.

    Returns:
        ``input_ids`` and ``position_ids`` (R, W), and ``start`` (N, 2) long: the ``(row, column)`` of
        each sequence's first token.
    """
    lengths = [len(s) for s in seqs]
    rows = first_fit_rows(lengths, _row_len(layout, lengths))
    width = max((sum(lengths[i] for i in row) for row in rows), default=0) or 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    start = torch.zeros((len(seqs), 2), dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            n = lengths[i]
            ids[r, col : col + n] = seqs[i]
            start[i, 0], start[i, 1] = r, col
            col += n
        pos[r] = packed_positions([lengths[i] for i in row], width)
    return ids, pos, start


def pack_padded_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int,
                      layout: str = "rows") -> dict[str, torch.Tensor]:
    """An already padded batch ``(N, L)`` (e.g. an RL rollout: left-padded prompt + right-padded response)
    laid out padding-free: each row's real tokens (``attention_mask == 1``) packed into rows, as above.

    The model run on the packed rows sees each sequence exactly as the padded forward does (positions
    counted over real tokens from 0, attention over the sequence's own real tokens), so any per-token
    output maps back to the padded layout through ``index`` (:func:`unpack_to_padded`).

    Args:
        input_ids: ``(N, L)`` token ids.
        attention_mask: ``(N, L)``, 1 on real tokens; each row's real tokens must be one contiguous run
            (left and/or right padding only).
        pad_id: Fills the end of short rows.
        layout: ``"rows"`` or ``"one_row"`` (see the module docstring).

    Returns:
        ``input_ids`` and ``position_ids`` (R, W), and ``index`` (N, L) long: the flat position
        ``row * W + column`` in the packed rows of the token at each padded position, -1 on padding.

    Raises:
        ValueError: A row's real tokens are not contiguous (naming the row), or the shapes differ.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"pack_padded_batch: input_ids {tuple(input_ids.shape)} and attention_mask "
                         f"{tuple(attention_mask.shape)} must be the same (N, L)")
    input_ids, mask = input_ids.cpu(), attention_mask.cpu() != 0
    N, L = mask.shape
    lengths = mask.sum(1)  # (N,)
    first = torch.where(lengths > 0, mask.long().argmax(1), 0)  # (N,) first real column
    cols = torch.arange(L)
    run = (cols >= first[:, None]) & (cols < (first + lengths)[:, None])  # (N, L): one run per row
    bad = (run != mask).any(1).nonzero().flatten()
    if len(bad):
        raise ValueError(f"pack_padded_batch: row {bad[0].item()}'s real tokens (attention_mask == 1) are not "
                         f"contiguous; a padded row must be left and/or right padding around one run of tokens")
    ids, pos, start = _lay_out([input_ids[i, run[i]] for i in range(N)], pad_id, layout)
    flat_start = start[:, 0] * ids.shape[1] + start[:, 1]  # (N,)
    index = torch.where(mask, flat_start[:, None] + (cols - first[:, None]), -1)  # (N, L)
    return {"input_ids": ids, "position_ids": pos, "index": index}


def unpack_to_padded(packed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-token values of packed rows back in the padded layout; differentiable.

    Args:
        packed: ``(R, W)`` one value per packed token (e.g. log-probs, values).
        index: ``(N, T)`` flat packed positions (:func:`pack_padded_batch`'s ``index``, or columns of it); -1
            where the padded layout has padding.

    Returns:
        ``(N, T)``: ``packed`` at each position of ``index``, 0 where ``index`` is -1 (no gradient flows there).
    """
    index = index.to(packed.device)
    out = packed.reshape(-1)[index.clamp(min=0)]  # (N, T)
    return torch.where(index >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))

