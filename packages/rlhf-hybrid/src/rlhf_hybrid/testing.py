"""Test helpers that ship with rlhf-hybrid."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch

from .distributed import DistInfo, init_distributed

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_group_env: dict[str, str] | None = None


@contextlib.contextmanager
def world_of_one() -> Iterator[DistInfo]:
    """A one-process gloo world for in-process tests.

    The environment variables ``init_distributed`` sets (RANK, WORLD_SIZE, ...) are restored on
    exit, so later subprocesses and launcher checks do not mistake this process for a torchrun
    worker. The process group itself stays for the rest of the process: DeepSpeed caches its
    groups at the first ``deepspeed.initialize``, and engines built after a destroy and re-init
    would broadcast over a group that no longer exists.
    """
    global _group_env
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    info = init_distributed()
    if _group_env is None:  # the variables of the group's first init; DeepSpeed reads LOCAL_RANK ...
        _group_env = {k: os.environ[k] for k in _DIST_ENV if k in os.environ}
    os.environ.update(_group_env)  # ... at every deepspeed.initialize, so set them again for each user
    try:
        yield info
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ragged_prompts(vocab: int, lengths: Sequence[int] = (5, 2, 7), *, pad: int = 0, low: int = 1,
                   seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of the given ``lengths``: ids and mask, each (B, max(lengths)).

    Token ids are drawn from ``[low, vocab)``, so choose ``low`` above the pad and EOS ids to keep
    them out of the prompts.
    """
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(low, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return ids, mask
