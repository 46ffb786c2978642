"""The order in which each rank sees the data: epochs of shuffled micro-batches (SFT, reward model,
preference optimisation) and the endless stream of RL prompts (online algorithms).

Every shuffle is seeded and shared by all ranks; each rank takes every ``world_size``-th item.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .context import Context, PipelineError

__all__ = ["PtxBatches", "epoch_batches", "prompt_batches", "resumed_prompt_batches", "resumable_epochs",
           "steps_per_epoch"]


def steps_per_epoch(ctx: Context, n: int, batch: int, key: str, what: str) -> int:
    """Full batches of ``batch`` per rank in an epoch of ``n`` items (PipelineError naming ``key`` if none)."""
    steps = n // (batch * ctx.world_size)
    if steps == 0:
        raise PipelineError(f"{key}: {batch} x {ctx.world_size} rank(s) is more than the {n} {what}; lower it or "
                            f"add data")
    return steps


def epoch_batches(ctx: Context, items: list, batch: int, steps: int, rng: random.Random) -> Iterator[list]:
    """One epoch of this rank's micro-batches: a shuffle shared by all ranks (same seed), each
    rank taking every ``world_size``-th item, ``steps`` full batches (the same count on every rank,
    which ZeRO-3's collective forward passes need)."""
    order = list(range(len(items)))
    rng.shuffle(order)
    mine = order[ctx.rank :: ctx.world_size]
    for i in range(steps):
        yield [items[j] for j in mine[i * batch : (i + 1) * batch]]


def prompt_batches(ctx: Context, prompts: list[dict], per_rank: int, seed: int) -> Iterator[list[dict]]:
    """Endless batches of this rank's prompts: a seeded shuffle shared by all ranks (reshuffled when used
    up), every rank taking its slice of each ``per_rank * world_size`` prompts."""
    rng = random.Random(seed)
    order: list[int] = []
    need = per_rank * ctx.world_size
    while True:
        while len(order) < need:
            perm = list(range(len(prompts)))
            rng.shuffle(perm)
            order += perm
        take, order = order[:need], order[need:]
        yield [prompts[j] for j in take[ctx.rank :: ctx.world_size]]


def resumable_epochs(ctx: Context, items: list, batch: int, steps: int, epochs: int, rng: random.Random,
                     done: int = 0) -> Iterator[tuple[int, int, list | None]]:
    """``(epoch, step, batch)`` for every step after the first ``done``, then ``(epoch, step, None)`` at
    the end of each epoch whose end-of-epoch evaluation was not done yet (it runs after its last step's save).

    The skipped epochs' shuffles are drawn all the same, so a resumed stage sees the data in the order
    the uninterrupted one does (a resumed state stores no data position: this replay is it).
    """
    step = 0
    for epoch in range(epochs):
        for chunk in epoch_batches(ctx, items, batch, steps, rng):
            step += 1
            if step > done:
                yield epoch, step, chunk
        if step >= done:
            yield epoch, step, None


def resumed_prompt_batches(ctx: Context, prompts: list[dict], per_rank: int, seed: int,
                           done: int = 0) -> Iterator[list[dict]]:
    """:func:`prompt_batches` after its first ``done`` batches (replayed: cheap index shuffles only)."""
    batches = prompt_batches(ctx, prompts, per_rank, seed)
    for _ in range(done):
        next(batches)
    return batches


class PtxBatches:
    """The ptx term's SFT batches (rl.ptx_coef): :func:`prompt_batches`'s endless seeded stream of this rank's
    share of the SFT examples, collated on demand (``rlhf_data.collate_sft``).

    The online algorithm draws one per actor step. A resumed stage stores no position: :meth:`skip` replays
    the batches the finished iterations drew (index shuffles only, nothing collated).
    """

    def __init__(self, ctx: Context, examples: list[dict], per_rank: int, seed: int, pad_token_id: int,
                 mask_prompt: bool) -> None:
        self._raw = prompt_batches(ctx, examples, per_rank, seed)
        self._pad, self._mask_prompt = pad_token_id, mask_prompt

    def __iter__(self) -> PtxBatches:
        return self

    def __next__(self) -> dict:
        from rlhf_data import collate_sft

        return collate_sft(next(self._raw), self._pad, mask_prompt=self._mask_prompt)

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self._raw)
