"""The order in which each rank sees the data: epochs of shuffled micro-batches (SFT, reward model,
preference optimisation) and the endless stream of RL prompts (online algorithms).

Every shuffle is seeded and shared by all ranks; each rank takes every ``world_size``-th item.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from .context import Context, PipelineError

__all__ = ["epoch_batches", "prompt_batches", "steps_per_epoch"]


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
