"""Resumable training state: saved every ``checkpoint.every`` steps (``every_iterations`` online) and on
SIGTERM/SIGINT, so a killed or preempted run continues exactly where its last state left it.

One stage's states live in ``<out>/.resume/<stage>/step-<N>/``, each written into
``.tmp-step-<N>/`` and renamed into place when complete (``meta.json`` is written last; a directory
without it is never used), the newest ``checkpoint.keep`` kept. A state holds:

* every trainable engine's DeepSpeed checkpoint (weights or this rank's ZeRO-3 shards, optimizer,
  LR scheduler, step counters): ``engine-<name>/``;
* per rank (``rank-<r>.pt``): the Python, torch and CUDA RNG states and what the stage adds (the
  algorithm's shuffling RNG, the health monitor, the best-so-far weights and score, ...);
* ``meta.json``: the step, the resolved config, the metrics rows written so far.

Data positions are not stored: the data order is a pure function of the seed, so a resumed stage
replays the cheap part (the shuffles, the prompt stream) and skips the steps already done.

:func:`request_stop` is what the SIGTERM/SIGINT handlers call; the stage loops save at their next
step boundary (all ranks agree on it) and raise :class:`Stopped`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
from pathlib import Path

import torch

__all__ = ["ResumeError", "StageState", "Stopped", "install_stop_handlers", "request_stop"]

_STOP = {"signal": None}


class ResumeError(ValueError):
    """A saved state cannot be used (another config, world size or ZeRO stage; no --resume)."""


class Stopped(Exception):  # noqa: N818 (not an error: the run was asked to stop and saved its state)
    """A SIGTERM/SIGINT stopped the run after it saved its state."""

    def __init__(self, stage: str, step: int, path: Path, signame: str) -> None:
        super().__init__(f"{signame}: {stage} stopped after step {step}; its state is saved in {path}; continue it "
                         f"with the same command plus --resume")
        self.stage, self.step, self.path = stage, step, path


def request_stop(signum: int, frame=None) -> None:
    """Signal handler: note the request; the running stage saves and stops at its next step.

    A second SIGINT while a stop is pending interrupts at once (KeyboardInterrupt), as without it.
    """
    if _STOP["signal"] is not None and signum == signal.SIGINT:
        raise KeyboardInterrupt
    _STOP["signal"] = signal.Signals(signum).name


def install_stop_handlers() -> None:
    """Route SIGTERM and SIGINT to :func:`request_stop` (main thread only)."""
    _STOP["signal"] = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)


def _stop_agreed() -> bool:
    """Whether any rank was asked to stop (one small all-reduce per step when there are several ranks)."""
    import torch.distributed as dist

    flag = _STOP["signal"] is not None
    if dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL reduces CUDA tensors only; gloo CPU ones
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item() > 0)
        if flag and _STOP["signal"] is None:
            _STOP["signal"] = "SIGTERM (another rank)"
    return flag


def _rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StageState:
    """The resumable state of one stage (see the module docstring).

    Args:
        ctx: The run's context (config, rank, reporter).
        stage: The stage's name (its directory under ``<out>/.resume``).
        engines: The trainable engines, by name (``{"policy": engine}``, PPO adds ``"critic"``).
        every: Save after every ``every`` steps (0: only when asked to stop).
        jsonl: The stage's metrics file, which the reporter writes (its rows are saved with the state and
            written back through the reporter on resume: the stage must be inside ``reporter.stage``).
    """

    def __init__(self, ctx, stage: str, engines: dict, every: int, jsonl: Path) -> None:
        self.ctx, self.stage, self.engines, self.every, self.jsonl = ctx, stage, engines, every, jsonl
        self.root = ctx.out / ".resume" / stage

    # -- what is there --------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """The complete saved states, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if (p / "meta.json").is_file())

    def start(self, resume: bool) -> dict | None:
        """At the stage's start: clean orphaned temp dirs, then load the newest state when ``resume``.

        Returns what :meth:`save` was given (this rank's), plus ``step``; None when starting afresh.
        Raises ResumeError when a state exists but ``resume`` is off (it would be silently lost).
        """
        import torch.distributed as dist

        if self.ctx.is_main and self.root.is_dir():
            for tmp in self.root.glob(".tmp-*"):
                shutil.rmtree(tmp, ignore_errors=True)
        if dist.is_initialized():
            dist.barrier()
        states = self.complete()
        if not states:
            return None
        latest = states[-1]
        if not resume:
            raise ResumeError(f"{self.stage}: a saved state ({latest}) of an unfinished run is in the output directory; "
                              f"add --resume to continue it, or --overwrite to discard it")
        return self._load(latest)

    def begin(self, rep, fresh, first_row) -> dict:
        """:meth:`start` inside the stage's ``reporter.stage``: the saved values (progress advanced to their
        step) when resuming, else ``fresh()`` (e.g. the held-out scores before training), logged as the
        stage's first row ``first_row(values)``, with step 0. Returns the values with ``"step"``."""
        saved = self.start(self.ctx.resume)  # restores the RNGs, the engines and the metrics rows
        if saved:
            rep.update(advance=saved["step"])
            return saved
        values = fresh()
        rep.log(first_row(values))
        return values | {"step": 0}

    def _load(self, path: Path) -> dict:
        from .config import _flatten, to_dict

        meta = json.loads((path / "meta.json").read_text())
        then, now = _flatten(meta["config"]), _flatten(json.loads(json.dumps(to_dict(self.ctx.cfg), default=str)))
        # checkpoint.* may change between the runs: how often to save does not change what is trained
        changed = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k) and not k.startswith("checkpoint."))
        if changed:
            raise ResumeError(f"{self.stage}: the saved state {path} was written with other settings ({', '.join(changed)} "
                              f"differ); resume with the same settings, or use --overwrite to start the stage afresh")
        if meta["world_size"] != self.ctx.world_size:
            raise ResumeError(f"{self.stage}: the saved state {path} was written by {meta['world_size']} process(es), "
                              f"this run has {self.ctx.world_size}; resume with --nproc {meta['world_size']}")
        for name, engine in self.engines.items():
            engine.load_training_state(str(path / f"engine-{name}"))
        extra = torch.load(path / f"rank-{self.ctx.rank}.pt", weights_only=False)
        _set_rng_state(extra.pop("_rng"))
        if self.ctx.is_main and meta.get("metrics_rows"):
            self.ctx.reporter.restore_rows(meta["metrics_rows"])  # into the metrics file the reporter has open
        self.ctx.reporter.print(f"{self.stage}: resuming after step {meta['step']} from {path}")
        return extra | {"step": meta["step"]}

    # -- saving ---------------------------------------------------------------------------------
    def after_step(self, step: int, state, boundary: bool = True) -> None:
        """Save when ``step`` is due or a stop was requested (then raise :class:`Stopped`).

        ``state`` is a dict, or a function returning one, computed only when a save happens.
        ``boundary``: whether an optimizer step just ended (``step % grad_accum == 0``); states are
        only saved there, since DeepSpeed's checkpoint does not hold half-accumulated gradients.
        """
        if not boundary:
            return
        stop = _stop_agreed()
        if not stop and not (self.every > 0 and step % self.every == 0):
            return
        path = self.save(step, state() if callable(state) else state)
        if stop:
            raise Stopped(self.stage, step, path, _STOP["signal"])

    def save(self, step: int, state: dict) -> Path:
        """Write the state after ``step`` atomically (collective: every rank calls it)."""
        import torch.distributed as dist
        from rlhf_hybrid import write_json_atomic

        from .config import to_dict

        final, tmp = self.root / f"step-{step:08d}", self.root / f".tmp-step-{step:08d}"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(dist)
        for name, engine in self.engines.items():
            engine.save_training_state(str(tmp / f"engine-{name}"))
        torch.save({**state, "_rng": _rng_state()}, tmp / f"rank-{self.ctx.rank}.pt")
        _barrier(dist)
        if self.ctx.is_main:
            rows = self.jsonl.read_text() if self.jsonl.is_file() else None
            config = json.loads(json.dumps(to_dict(self.ctx.cfg), default=str))
            write_json_atomic(tmp / "meta.json", {"stage": self.stage, "step": step, "world_size": self.ctx.world_size,
                                                  "config": config, "metrics_rows": rows})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in self.complete()[: -self.ctx.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(dist)
        return final

    def finish(self) -> None:
        """The stage's output is saved: its states are of no further use."""
        import torch.distributed as dist

        _barrier(dist)
        if self.ctx.is_main:
            shutil.rmtree(self.root, ignore_errors=True)
            with contextlib.suppress(OSError):  # <out>/.resume itself, once no stage has a state left
                self.root.parent.rmdir()


def _barrier(dist) -> None:
    if dist.is_initialized():
        dist.barrier()

