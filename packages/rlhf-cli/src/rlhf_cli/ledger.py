"""The run ledger: which stage output was trained from which inputs, so outputs never mix silently.

Every stage directory's ``run_card.json`` carries a ``checkpoint_id`` (a random id drawn when it is
saved, from ``os.urandom``: no RNG a run uses is touched) and ``inputs``: the ``checkpoint_id`` of
every earlier stage output it read (``{"sft": "..."}`` for the reward model, ``{"sft": ..., "rm": ...}``
for PPO on a reward model). ``<out>/ledger.json`` lists them per stage with the time it finished and
a fingerprint of the run's config; it is rewritten, with ``summary.json``, after every stage.

Two rules, checked before any training:

* **Reading**: a stage reads an earlier output only if that output's own inputs are the outputs
  now in ``<out>`` (PPO refuses a reward model that was trained from another SFT model than
  ``<out>/sft``).
* **Re-running**: a stage may not be re-run while a later stage trained from its current output is
  kept: ``rlhf run --stage sft`` into a finished directory refuses, naming ``rm/`` and ``ppo/``;
  ``--overwrite`` deletes those stale outputs (and their summary sections) first.

Outputs written before the ledger existed have no ``checkpoint_id``; they are not checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

__all__ = ["LedgerError", "checkpoint_id", "check_inputs", "clean_orphans", "config_fingerprint", "new_checkpoint_id",
           "remove_stale", "stale_outputs", "write_ledger"]


class LedgerError(ValueError):
    """Outputs of ``<out>`` would mix runs from different inputs (a user error: the CLI prints it in one line)."""


def _card(stage_dir: Path) -> dict:
    try:
        card = json.loads((stage_dir / "run_card.json").read_text())
    except (OSError, ValueError):
        return {}
    return card if isinstance(card, dict) else {}


def checkpoint_id(stage_dir: Path) -> str | None:
    """The ``checkpoint_id`` in ``<stage_dir>/run_card.json``; None when absent (no output, or an old one)."""
    value = _card(stage_dir).get("checkpoint_id")
    return value if isinstance(value, str) else None


def new_checkpoint_id() -> str:
    """A fresh id for an output about to be saved (uuid4: from os.urandom, not from a seeded RNG)."""
    return uuid.uuid4().hex


def config_fingerprint(config: dict) -> str:
    """sha256 of the resolved config (sorted JSON), first 16 hex digits."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _inputs(stage_dir: Path) -> dict[str, str]:
    value = _card(stage_dir).get("inputs")
    return {k: v for k, v in value.items() if isinstance(v, str)} if isinstance(value, dict) else {}


def check_inputs(out: Path, stage: str) -> None:
    """Reading rule: ``<out>/<stage>`` was trained from the outputs now in ``out`` (see the module docstring)."""
    for upstream, wanted in _inputs(out / stage).items():
        current = checkpoint_id(out / upstream)
        if current is not None and current != wanted:
            raise LedgerError(
                f"{out / stage} was trained from another {upstream} output than the one now in {out / upstream} "
                f"(checkpoint {wanted[:8]}, now {current[:8]}); re-run `rlhf run --stage {stage}` first, or use a "
                f"new --out")


def stale_outputs(out: Path, rerun: list[str]) -> list[str]:
    """The finished stages not in ``rerun`` that were trained, directly or through another, from one in it."""
    stale: list[str] = []
    changed = set(rerun)
    finished = sorted(p.name for p in out.iterdir() if (p / "run_card.json").is_file()) if out.is_dir() else []
    grew = True
    while grew:
        grew = False
        for stage in finished:
            if stage in changed or stage in stale:
                continue
            if changed & set(_inputs(out / stage)):
                stale.append(stage)
                changed.add(stage)
                grew = True
    return stale


def remove_stale(out: Path, rerun: list[str], summary: dict, overwrite: bool) -> list[str]:
    """Re-running rule: the stale outputs of re-running ``rerun``; an error naming them unless ``overwrite``,
    which deletes them and their ``summary`` sections. Returns the stages removed."""
    stale = stale_outputs(out, rerun)
    if stale and not overwrite:
        dirs = ", ".join(f"{out / s}/" for s in stale)
        raise LedgerError(
            f"re-running {', '.join(rerun)} would leave {dirs} trained from the {', '.join(rerun)} output it replaces; "
            f"add --overwrite to delete {'them' if len(stale) > 1 else 'it'} first, run those stages too "
            f"(--stage all), or use a new --out")
    for stage in stale:
        shutil.rmtree(out / stage)
        summary.pop(stage, None)
        summary.get("wall_seconds", {}).pop(stage, None)
    return stale


def write_ledger(out: Path, config: dict) -> dict:
    """Rewrite ``<out>/ledger.json`` from the stage directories' run cards; returns what it wrote."""
    from rlhf_hybrid import write_json_atomic

    stages = {}
    for d in sorted(p for p in out.iterdir() if (p / "run_card.json").is_file()):
        card = _card(d)
        stages[d.name] = {"checkpoint_id": card.get("checkpoint_id"), "inputs": _inputs(d),
                          "finished": card.get("finished"), "config_fingerprint": card.get("config_fingerprint")}
    ledger = {"out": str(out), "config_fingerprint": config_fingerprint(config),
              "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": stages}
    write_json_atomic(out / "ledger.json", ledger)
    return ledger


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_orphans(out: Path) -> list[str]:
    """Remove what a process killed while saving a stage left in ``out`` (``rlhf_hybrid.atomic_dir``'s
    ``<stage>.tmp-<pid>`` and ``<stage>.old-<pid>`` of a process that is gone). A crash between the two
    renames of a save leaves no ``<stage>`` but its ``.old-<pid>``: that complete previous output is put
    back. Returns what was done, one line each."""
    done: list[str] = []
    if not out.is_dir():
        return done
    for p in sorted(out.iterdir()):
        name, sep, pid = p.name.rpartition(".tmp-") if ".tmp-" in p.name else p.name.rpartition(".old-")
        if not sep or not pid.isdigit() or not p.is_dir() or _alive(int(pid)):
            continue
        final = out / name
        if sep == ".old-" and not final.exists():
            os.replace(p, final)
            done.append(f"restored {final} from {p.name} (a save was interrupted between its two renames)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p} (left by process {pid}, which was killed while saving)")
    return done
