"""The epoch loop that SFT, the reward model and the offline algorithms share: resumable epochs of
micro-batches, one ``learn`` per micro-batch, its row logged with the step's statistics, the state saved
when due (:mod:`rlhf_cli.resume`), and the stage's own end-of-epoch evaluation."""

from __future__ import annotations

from collections.abc import Callable

from ..context import Context
from ..resume import StageState
from ..sampling import resumable_epochs
from ..train_stats import StepTimer, example_tokens

__all__ = ["train_epochs"]


def train_epochs(ctx: Context, name: str, engine, state: StageState, rep, items: list, *, batch: int, steps: int,
                 epochs: int, rng, done: int, grad_accum: int, learn: Callable[[list], tuple[dict, dict]],
                 end_of_epoch: Callable[[int, int], None], extras) -> int:
    """Train from step ``done`` to the end; returns the last step.

    Args:
        learn: One micro-batch -> ``(show, log)``: what the progress line shows and the row's metrics.
        end_of_epoch: ``(epoch, step)`` -> None: evaluate (and log) at the end of an epoch.
        extras: What the saved state holds besides the engines and RNGs (a dict or a function giving one).
    """
    timer = StepTimer(engine, ctx.world_size)
    step = done
    for epoch, step, chunk in resumable_epochs(ctx, items, batch, steps, epochs, rng, done):
        if chunk is None:  # the end of an epoch (its evaluation runs after the last step's save)
            end_of_epoch(epoch, step)
            continue
        timer.start()
        show, log = learn(chunk)
        rep.update(show={"epoch": epoch + 1, **show},
                   log={"stage": name, "step": step, "epoch": epoch, **log,
                        **timer.stats(len(chunk), example_tokens(chunk))})
        state.after_step(step, extras, boundary=step % grad_accum == 0)
    return step
