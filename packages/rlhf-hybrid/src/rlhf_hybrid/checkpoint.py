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
from .models import ValueModel


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

    A :class:`ValueModel` is saved as its transformers sequence-classification model (config.architectures
    ``<Arch>ForSequenceClassification``, num_labels=1, the head as ``score.weight``), with
    ``config.pad_token_id`` set to ``tokenizer``'s pad token when one is given: transformers' sequence
    classification scores the last token that is not the pad token.

    Raises:
        NonFiniteWeightsError: a weight of ``state`` is nan/inf (checked before anything is written).
    """
    check_finite_state(state, str(out_dir))
    with atomic_dir(out_dir) as tmp:
        if isinstance(module, ValueModel):
            seq = module.model
            pad = getattr(tokenizer, "pad_token_id", None)
            old_pad = seq.config.pad_token_id
            if pad is not None:
                seq.config.pad_token_id = pad
            try:
                seq.save_pretrained(tmp, state_dict={k.removeprefix("model."): v for k, v in state.items()})
            finally:
                seq.config.pad_token_id = old_pad
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
