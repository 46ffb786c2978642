"""The ptx term's SFT batches (rlhf_cli.sampling.PtxBatches, rlhf_cli.stages.online.ptx_batches): each rank its
own share, the same order on every run, and skip(n) lands where drawing n batches does (what an exact resume
relies on: the position is replayed, never stored)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from rlhf_cli.config import load_config
from rlhf_cli.context import PipelineError
from rlhf_cli.sampling import PtxBatches
from rlhf_cli.stages.online import ptx_batches

PAD = 0
# 10 demonstrations: prompt [i, i] and response [100 + i, 2] (2 = EOS); row i is recognisable by its tokens
EXAMPLES = [{"input_ids": [i + 3, i + 3, 100 + i, 2], "prompt_len": 2} for i in range(10)]


def _ctx(rank: int = 0, world: int = 1, *overrides: str):
    return SimpleNamespace(cfg=load_config(None, list(overrides)), rank=rank, world_size=world)


def _ids(batch: dict) -> list[int]:
    return [int(row[2]) - 100 for row in batch["input_ids"]]


def test_batches_are_collated_sft_rows() -> None:
    batch = next(PtxBatches(_ctx(), EXAMPLES, 3, seed=1, pad_token_id=PAD, mask_prompt=True))
    assert batch["input_ids"].shape == (3, 4)
    assert (batch["labels"][:, :2] == -100).all()  # the prompt is masked
    assert torch.equal(batch["labels"][:, 2:], batch["input_ids"][:, 2:])


def test_ranks_share_each_draw_and_runs_repeat() -> None:
    def draws(rank: int, n: int) -> list[list[int]]:
        it = PtxBatches(_ctx(rank, 2), EXAMPLES, 2, seed=7, pad_token_id=PAD, mask_prompt=True)
        return [_ids(next(it)) for _ in range(n)]

    r0, r1 = draws(0, 5), draws(1, 5)
    assert draws(0, 5) == r0  # seeded: the same order on every run
    # within one pass over the data the ranks' rows are different samples, and every sample comes once before
    # any repeats: the first 10 rows (2 ranks x 2 rows x 2.5 draws) are the 10 samples (the third draw straddles
    # the reshuffle, so its second rows may repeat a sample)
    first = sorted(sum(r0[:2] + r1[:2], []) + r0[2][:1] + r1[2][:1])
    assert len(set(first)) == len(first) == 10


@pytest.mark.parametrize("done", [0, 1, 4, 9])
def test_skip_lands_where_drawing_does(done: int) -> None:
    drawn = PtxBatches(_ctx(), EXAMPLES, 3, seed=5, pad_token_id=PAD, mask_prompt=True)
    for _ in range(done):
        next(drawn)
    skipped = PtxBatches(_ctx(), EXAMPLES, 3, seed=5, pad_token_id=PAD, mask_prompt=True)
    skipped.skip(done)
    for _ in range(3):
        a, b = next(drawn), next(skipped)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_off_and_no_sft_data() -> None:
    data = SimpleNamespace(sft=[], why_empty=lambda name: f"no {name} part in the split")
    assert ptx_batches(_ctx(), data, tokenizer=None, stats={}) is None  # rl.ptx_coef=0: nothing is tokenized
    with pytest.raises(PipelineError, match=r"rl.ptx_coef=0.5: the ptx term draws SFT demonstrations, but the data "
                                            r"has none: no sft part in the split"):
        ptx_batches(_ctx(0, 1, "rl.ptx_coef=0.5"), data, tokenizer=None, stats={})
