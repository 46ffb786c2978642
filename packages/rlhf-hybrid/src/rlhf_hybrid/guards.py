"""Non-finite guards: a step whose loss or gradients are not finite is skipped, never applied.

One home for every stage: :class:`~rlhf_hybrid.HybridEngine` owns a :class:`NonFiniteGuard`, so SFT,
the reward model and every RL / preference algorithm (they all call ``engine.backward(loss)`` then
``engine.step()``) get the same rule without a line in the algorithms:

1. ``backward`` records whether the loss is finite (a device-side flag, no host sync);
2. the optimizer's own ``step`` is wrapped: at the accumulation boundary it runs only when every
   loss of the window was finite and every gradient it is about to apply is finite (after
   DeepSpeed's clipping, so a non-finite gradient norm shows up as non-finite gradients);
   otherwise it changes nothing (no weight, no optimizer state) and the step counts as skipped;
3. ``max_consecutive`` skipped steps in a row raise :class:`NonFiniteError`.

On finite runs the guard only reads: no float operation of the step changes and no random number
is drawn, so a seed gives the same weights with or without it. The checks are one host sync per
optimizer step (a ``bool`` of a reduced flag) and, with several ranks, one all-reduce of it.

:func:`check_finite_state` is the last line: ``save_hf_checkpoint`` refuses to write a state with a
non-finite weight, whatever produced it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

__all__ = ["NonFiniteError", "NonFiniteGuard", "NonFiniteWeightsError", "check_finite_state"]

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """``max_consecutive`` optimizer steps in a row had a non-finite loss or gradient.

    Attributes:
        name: the engine's name ("model", "actor", "critic", ...).
        step: the optimizer step (1-based, skipped ones included) of the last skipped step.
        consecutive: how many steps in a row were skipped.
        skipped: every skipped step of this engine so far.
        loss: the last non-finite loss seen (``nan``/``inf``), or None when only gradients were.
    """

    def __init__(self, name: str, step: int, consecutive: int, skipped: int, loss: float | None) -> None:
        self.name, self.step, self.consecutive, self.skipped, self.loss = name, step, consecutive, skipped, loss
        what = f"loss {loss}" if loss is not None else "non-finite gradients"
        super().__init__(f"{name}: {consecutive} optimizer steps in a row had a non-finite loss or gradient norm "
                         f"(last at step {step}: {what}); every one was skipped, no weight changed")


class NonFiniteWeightsError(ValueError):
    """A state dict about to be saved holds a non-finite value (nothing was written)."""


def check_finite_state(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming ``where`` and the first tensor with a nan/inf."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeightsError(f"{where}: not saved: weight {name!r} has {bad} non-finite value(s) "
                                        f"(nan/inf) of {t.numel()}")


class NonFiniteGuard:
    """Skip optimizer steps with a non-finite loss or gradient; raise after ``max_consecutive`` in a row.

    Args:
        optimizer: the torch optimizer DeepSpeed steps (the one given to ``deepspeed.initialize``,
            after that call); its ``step`` is wrapped in place.
        max_consecutive: skipped steps in a row that stop the run (>= 1).
        name: what the engine trains, for messages.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_consecutive: int, name: str = "model") -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_nonfinite_steps: must be >= 1, got {max_consecutive}")
        self.max_consecutive, self.name = max_consecutive, name
        self.skipped = 0  # every skipped step
        self.consecutive = 0  # skipped steps since the last applied one
        self.steps = 0  # optimizer steps (boundaries), skipped ones included
        self._loss_ok: torch.Tensor | None = None  # all losses of the accumulation window finite (device bool)
        self._loss: torch.Tensor | None = None  # the window's last loss (for the message)
        self._last_bad_loss: float | None = None
        self._decision: bool | None = None  # this boundary's verdict once taken (ZeRO steps per param group)
        # Wrap the instance's step (the class and its type stay: DeepSpeed checks ZeRO support by type).
        # Built after deepspeed.initialize, so that this wraps the LR scheduler's own wrapper of step
        # (torch schedulers re-bind ``step.__func__``, which a wrapper made before them would lose).
        inner = optimizer.step

        def step(*args, **kwargs):
            return self.guarded_step(inner, *args, **kwargs)

        optimizer.step = step
        # ZeRO-0 fp32 hands the optimizer itself to the engine, which skips the LR scheduler (and
        # counts engine.skipped_steps) when the optimizer reports an overflow
        optimizer.overflow = False
        self._optimizer = optimizer

    def record_loss(self, loss: torch.Tensor) -> None:
        """Note whether ``loss`` (a backward's) is finite; called for every micro-batch."""
        ok = torch.isfinite(loss.detach()).all()
        self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok
        self._loss = loss.detach()

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self._optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())  # host sync

    def _take_decision(self) -> bool:
        """Whether this boundary's step may be applied (the same on every rank)."""
        loss_ok = True if self._loss_ok is None else bool(self._loss_ok)
        ok = loss_ok and self._grads_finite()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([0.0 if ok else 1.0], device=self._loss_ok.device if self._loss_ok is not None
                                else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # collective: every rank steps at the same boundary
            ok = not bool(flag.item())
        if not loss_ok:
            self._last_bad_loss = float(self._loss.float().mean())
        return ok

    def guarded_step(self, inner_step, *args, **kwargs):
        """The optimizer's ``step``: ``inner_step`` (the real one) only if this boundary may step."""
        if self._decision is None:
            self._decision = self._take_decision()
        self._optimizer.overflow = not self._decision
        if self._decision:
            return inner_step(*args, **kwargs)
        return None

    def after_step(self, boundary: bool, engine_skipped: bool = False) -> bool:
        """Account for one ``engine.step()``; at a boundary, count a skip and raise past the limit.

        Returns whether this call applied an optimizer step (False off a boundary and for a skip).

        Args:
            boundary: whether this call ended an accumulation window (an optimizer step).
            engine_skipped: DeepSpeed itself skipped the step (its ZeRO-1/2 overflow check saw a
                non-finite gradient norm before the optimizer was called).
        """
        if not boundary:
            return False
        self.steps += 1
        if self._decision is not None:
            applied = self._decision
        else:  # the optimizer was not called: DeepSpeed skipped the step itself, or had nothing to step
            loss_ok = self._loss_ok is None or bool(self._loss_ok)
            if not loss_ok:
                self._last_bad_loss = float(self._loss.float().mean())
            applied = loss_ok and not engine_skipped
        self._decision, self._loss_ok = None, None
        self._optimizer.overflow = False
        if applied:
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        loss, self._last_bad_loss = self._last_bad_loss, None
        log.warning("%s: skipped optimizer step %d: non-finite %s (%d in a row; %d allowed)", self.name, self.steps,
                    f"loss {loss}" if loss is not None else "gradients", self.consecutive, self.max_consecutive)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteError(self.name, self.steps, self.consecutive, self.skipped, loss)
        return False
