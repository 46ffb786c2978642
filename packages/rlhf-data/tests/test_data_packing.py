"""Padding-free collators (rlhf_data.packing): layouts, position ids, labels and last-token indices worked out by hand."""

from __future__ import annotations

import pytest
import torch
from rlhf_data import collate_pairs_padding_free, collate_sft, collate_sft_padding_free, first_fit_rows

N = -100  # IGNORE_INDEX


def test_first_fit_rows_in_order() -> None:
    # capacity 12: 9 -> row 0; 4 -> row 1 (13 > 12); 7 -> row 1 (11); 2 -> row 0 (11); 5 -> row 2;
    # 12 -> row 3; 7 -> row 2 (12); 10 -> row 4
    assert first_fit_rows([9, 4, 7, 2, 5, 12, 7, 10], 12) == [[0, 3], [1, 2], [4, 6], [5], [7]]
    assert first_fit_rows([3, 1, 2], None) == [[0, 1, 2]]
    assert first_fit_rows([], None) == []
    with pytest.raises(ValueError, match="sequence 1 has 5 tokens, more than row_len=4"):
        first_fit_rows([2, 5], 4)
    with pytest.raises(ValueError, match="row_len must be None"):
        first_fit_rows([2], 0)


def test_pairs_rows_and_one_row() -> None:
    pairs = [{"chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]}, {"chosen_ids": [3], "rejected_ids": [4, 4, 4]}]
    # sequences in collate_pairs' order: chosen 0, chosen 1, rejected 0, rejected 1 (lengths 3, 1, 2, 3);
    # rows of 3: [c0] [c1, r0] [r1]
    b = collate_pairs_padding_free(pairs, 0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [3, 8, 9], [4, 4, 4]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1], [0, 1, 2]]
    assert b["last_index"].tolist() == [[0, 2], [1, 0], [1, 2], [2, 2]]
    b = collate_pairs_padding_free(pairs, 0, layout="one_row")
    assert b["input_ids"].tolist() == [[5, 6, 7, 3, 8, 9, 4, 4, 4]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1, 2]]
    assert b["last_index"].tolist() == [[0, 2], [0, 3], [0, 5], [0, 8]]
    assert "attention_mask" not in b


def test_pairs_errors() -> None:
    with pytest.raises(ValueError, match="example 1 has empty rejected_ids"):
        collate_pairs_padding_free([{"chosen_ids": [1], "rejected_ids": [2]}, {"chosen_ids": [1], "rejected_ids": []}], 0)
    with pytest.raises(ValueError, match="layout 'flat' is not one of 'rows', 'one_row'"):
        collate_pairs_padding_free([{"chosen_ids": [1], "rejected_ids": [2]}], 0, layout="flat")


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_sft_rows_labels_and_the_padded_targets(mask_prompt: bool) -> None:
    examples = [{"input_ids": [5, 6, 7, 8], "prompt_len": 2}, {"input_ids": [9, 10], "prompt_len": 1},
                {"input_ids": [11, 12, 13], "prompt_len": 3}]
    b = collate_sft_padding_free(examples, 0, mask_prompt=mask_prompt)  # rows of 4: [e0] [e1] [e2] (2 + 3 > 4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 1], [0, 1, 2, 0]]  # padding: a sequence of its own
    if mask_prompt:  # response tokens only: e0's 7, 8; e1's 10; e2 has none
        assert b["labels"].tolist() == [[N, N, 7, 8], [N, 10, N, N], [N, N, N, N]]
    else:  # every token but each sample's first
        assert b["labels"].tolist() == [[N, 6, 7, 8], [N, 10, N, N], [N, 12, 13, N]]
    # the same target tokens, in the same order, as the padded collator's (whose column 0 is never a
    # target: rlhf_algos.target_mask reads labels[:, 1:])
    padded = collate_sft(examples, 0, mask_prompt=mask_prompt)["labels"][:, 1:]
    assert b["labels"][b["labels"] != N].tolist() == padded[padded != N].tolist()
    one = collate_sft_padding_free(examples, 0, mask_prompt=mask_prompt, layout="one_row")
    assert one["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13]]
    assert one["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert torch.equal(one["labels"][one["labels"] != N], padded[padded != N])


def test_pack_padded_batch_rows_one_row_and_the_way_back() -> None:
    from rlhf_data import pack_padded_batch, unpack_to_padded

    # left-padded prompt + right-padded response rows; real lengths 3, 5, 2 (columns 2-4, 1-5, 0-1)
    ids = torch.tensor([[0, 0, 5, 6, 7, 0], [0, 8, 9, 1, 2, 3], [4, 4, 0, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    rows = pack_padded_batch(ids, mask, 99, "rows")  # rows of 5, first fit: [3, 2] [5]
    assert rows["input_ids"].tolist() == [[5, 6, 7, 4, 4], [8, 9, 1, 2, 3]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert rows["index"].tolist() == [[-1, -1, 0, 1, 2, -1], [-1, 5, 6, 7, 8, 9], [3, 4, -1, -1, -1, -1]]
    one = pack_padded_batch(ids, mask, 99, "one_row")
    assert one["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4, 4]]
    assert one["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    for b in (rows, one):  # the packed tokens scattered back are the padded rows, 0 on padding
        back = unpack_to_padded(b["input_ids"].float().requires_grad_(), b["index"])
        assert torch.equal(back, (ids * mask).float())
        back.sum().backward()  # differentiable, no gradient from the padding


def test_pack_padded_batch_errors() -> None:
    from rlhf_data import pack_padded_batch

    with pytest.raises(ValueError, match=r"row 0's real tokens \(attention_mask == 1\) are not contiguous"):
        pack_padded_batch(torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1]]), 0)
    with pytest.raises(ValueError, match=r"must be the same \(N, L\)"):
        pack_padded_batch(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3), 0)
    with pytest.raises(ValueError, match=r"padding-free layout 'tight'"):
        pack_padded_batch(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4), 0, "tight")
