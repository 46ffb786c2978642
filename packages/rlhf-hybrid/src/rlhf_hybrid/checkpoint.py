"""Atomic HF-format checkpoints.

A checkpoint directory is first written next to its final place (``<dir>.tmp-<pid>``) and then
renamed into place, so a crash never leaves a half-written directory that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .guards import check_finite_state
from .models import VALUE_HEAD_FILE, ValueModel


def atomic_dir(final: str | os.PathLike):
    """Context manager yielding a temporary directory that replaces ``final`` on success."""
    import contextlib

    @contextlib.contextmanager
    def _cm():
        final_p = Path(final)
        final_p.parent.mkdir(parents=True, exist_ok=True)
        tmp = final_p.with_name(f"{final_p.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = final_p.with_name(f"{final_p.name}.old-{os.getpid()}")
        if final_p.exists():
            os.replace(final_p, old)
        os.replace(tmp, final_p)
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)

    return _cm()


def save_hf_checkpoint(module: torch.nn.Module, state: dict[str, torch.Tensor], out_dir: str, tokenizer=None,
                       extra_files: dict[str, str] | None = None) -> None:
    """Save ``state`` (a full state dict of ``module``) as a HF checkpoint directory.

    For a :class:`ValueModel` the causal LM goes in the usual files and the head in
    ``value_head.safetensors``.

    Raises:
        NonFiniteWeightsError: a weight of ``state`` is nan/inf (checked before anything is written).
    """
    from safetensors.torch import save_file

    check_finite_state(state, str(out_dir))
    with atomic_dir(out_dir) as tmp:
        if isinstance(module, ValueModel):
            lm_state = {k.removeprefix("lm."): v for k, v in state.items() if k.startswith("lm.")}
            head = {k: v.contiguous() for k, v in state.items() if k.startswith("v_head.")}
            module.lm.save_pretrained(tmp, state_dict=lm_state)
            save_file(head, str(tmp / VALUE_HEAD_FILE))
        else:
            module.save_pretrained(tmp, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
