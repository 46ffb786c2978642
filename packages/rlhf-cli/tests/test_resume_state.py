"""rlhf_cli.resume's refusals, on saved states written by hand (no training): a saved state is never
dropped silently (no --resume), never used with other settings or another world size, and a directory
without meta.json (a save that did not finish) is never used."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from rlhf_cli.config import load_config, to_dict
from rlhf_cli.context import Context
from rlhf_cli.report import Reporter
from rlhf_cli.resume import ResumeError, StageState


def _ctx(tmp_path, *overrides: str) -> Context:
    cfg = load_config(None, [f"out={tmp_path}", *overrides])
    return Context(cfg, Reporter(enabled=False))


def _saved(ctx: Context, step: int, config: dict | None = None, world_size: int = 1) -> None:
    d = ctx.out / ".resume" / "sft" / f"step-{step:08d}"
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps({"stage": "sft", "step": step, "world_size": world_size,
                                             "config": json.loads(json.dumps(config or to_dict(ctx.cfg), default=str)),
                                             "metrics_rows": ""}))


def test_no_state_starts_afresh_and_an_unfinished_save_is_ignored_and_removed(tmp_path) -> None:
    ctx = _ctx(tmp_path)
    st = StageState(ctx, "sft", {}, 2, tmp_path / ".sft.metrics.jsonl")
    assert st.start(resume=True) is None
    (tmp_path / ".resume" / "sft" / ".tmp-step-00000004").mkdir(parents=True)  # killed while saving
    (tmp_path / ".resume" / "sft" / "step-00000002").mkdir()  # no meta.json: never complete
    assert st.start(resume=False) is None
    assert not (tmp_path / ".resume" / "sft" / ".tmp-step-00000004").exists()


def test_a_saved_state_without_resume_is_an_error_naming_the_flags(tmp_path) -> None:
    ctx = _ctx(tmp_path)
    _saved(ctx, 6)
    with pytest.raises(ResumeError, match=r"sft: a saved state \(.*step-00000006\) .* add --resume .* --overwrite"):
        StageState(ctx, "sft", {}, 2, tmp_path / "m.jsonl").start(resume=False)


def test_other_settings_or_world_size_are_refused_but_checkpoint_keys_may_change(tmp_path) -> None:
    ctx = _ctx(tmp_path, "sft.lr=0.002", "checkpoint.every=7")
    then = replace(ctx.cfg, sft=replace(ctx.cfg.sft, lr=0.001, epochs=3))
    _saved(ctx, 6, to_dict(then))
    with pytest.raises(ResumeError, match=r"other settings \(sft.epochs, sft.lr differ\)"):
        StageState(ctx, "sft", {}, 2, tmp_path / "m.jsonl").start(resume=True)
    ctx2 = _ctx(tmp_path / "b", "checkpoint.every=7")
    _saved(ctx2, 4, to_dict(replace(ctx2.cfg, checkpoint=replace(ctx2.cfg.checkpoint, every=3))), world_size=2)
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\), this run has 1; resume with --nproc 2"):
        StageState(ctx2, "sft", {}, 2, tmp_path / "m.jsonl").start(resume=True)


def test_finish_removes_the_stage_states_and_the_empty_resume_dir(tmp_path) -> None:
    ctx = _ctx(tmp_path)
    _saved(ctx, 2)
    other = tmp_path / ".resume" / "rm" / "step-00000004"
    other.mkdir(parents=True)
    StageState(ctx, "sft", {}, 2, tmp_path / "m.jsonl").finish()
    assert not (tmp_path / ".resume" / "sft").exists() and other.is_dir()  # another stage's state stays
    StageState(ctx, "rm", {}, 2, tmp_path / "m.jsonl").finish()
    assert not (tmp_path / ".resume").exists()
