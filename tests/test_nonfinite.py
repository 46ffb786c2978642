"""Non-finite guards end to end (issue 13): a diverging stage stops with an error naming the stage, the
step and the learning-rate key, and no checkpoint holding a nan/inf weight is ever written.

* ``sft.lr=inf`` (and ``1e999``, which YAML and Python read as inf): rejected as a setting, before
  anything runs; the message names sft.lr. Before the guards, this trained to all-nan weights and
  saved them with exit 0.
* ``sft.lr=1e6``: finite, so the run starts; the updates blow the weights up within a few steps, the
  engine skips each non-finite step and after ``train.max_nonfinite_steps`` in a row the run stops.
  No ``<out>/sft`` (nor a temporary ``sft.tmp-*``) exists afterwards.
"""

from __future__ import annotations

import pytest

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "data.sft_samples=512"]


@pytest.mark.parametrize("lr", ["inf", "1e999", "nan"])
def test_non_finite_learning_rate_is_rejected_before_anything_runs(rlhf, tmp_path, lr: str) -> None:
    out = tmp_path / "o"
    proc = rlhf(["run", "--stage", "sft", "--out", out, *TINY, f"sft.lr={lr}"], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: sft.lr: {float(lr)!r} is not allowed; allowed: a finite number"
                                                if lr != "nan" else "error: sft.lr: must be > 0, got nan"]
    assert not out.exists() or not any(out.iterdir())


def test_diverging_sft_stops_naming_stage_step_and_setting_and_saves_nothing(rlhf, tmp_path) -> None:
    out = tmp_path / "o"
    proc = rlhf(["run", "--stage", "sft", "--out", out, *TINY, "sft.lr=1e6", "train.max_nonfinite_steps=2"],
                timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    for needle in ("sft: training diverged", "2 optimizer steps in a row", "stopped at optimizer step",
                   "train.max_nonfinite_steps=2", "sft.lr=1000000.0", "nothing was saved for sft"):
        assert needle in line, (needle, line)
    # each skipped step was reported as it happened (the engine's guard logs them)
    assert proc.stderr.count("skipped optimizer step") == 2, proc.stderr
    # no checkpoint: <out>/sft holds only the live metrics.jsonl (no config.json, no weights)
    assert sorted(p.name for p in (out / "sft").iterdir()) == ["metrics.jsonl"]
    assert not list(out.glob("sft.tmp-*")) and not list(out.glob("sft.old-*"))
    assert not (out / "summary.json").exists()
