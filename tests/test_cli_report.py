"""Tracking and reports end to end (issue 14): a tiny ``rlhf run --stage all`` with report.to=tensorboard.

* the TensorBoard event files hold exactly the numbers of each stage's metrics.jsonl;
* training rows carry lr (checked against the warm-up schedule), grad_norm, samples/s and tokens/s;
* the PNGs and report.md are written, valid, and ``rlhf report`` rebuilds them;
* ``rlhf run --config <out>/config.yaml`` reproduces the run's summary numbers;
* a missing sink package and an unreachable hub model each stop the run with one line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct

import pytest

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "sft.warmup_steps=4", "data.sft_samples=512", "rm.epochs=1", "data.rm_samples=64",
        "rl.iterations=2", "rl.rollout_batch_size=16", "rl.micro_batch_size=16", "rl.eval_every=1"]


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _numbers(summary: dict) -> dict:
    """The summary without what may differ between two equal runs: wall times and tokenization-cache hits."""
    out = {k: v for k, v in summary.items() if k != "wall_seconds"}
    for stage in out.values():
        for counts in stage.get("data", {}).values():
            counts.pop("cache_hit", None)
    return out


def _check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    from matplotlib.image import imread

    assert imread(path).shape[:2] == (height, width) and width > 100 and height > 100, path


def _check_tensorboard(out, stages) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for stage in stages:
        acc = EventAccumulator(str(out / "tensorboard" / stage))
        acc.Reload()
        tb = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
        expected: dict[str, dict[int, float]] = {}
        for row in _rows(out / stage / "metrics.jsonl"):
            step = row.get("step", row.get("iteration"))
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "iteration", "time"):
                    expected.setdefault(k, {})[step] = v  # a step logged twice keeps its last value, as TB does
        assert set(tb) == set(expected), stage
        for tag, by_step in expected.items():
            assert set(tb[tag]) == set(by_step), (stage, tag)
            for step, v in by_step.items():  # event files store float32
                assert tb[tag][step] == pytest.approx(v, rel=1e-6, abs=1e-30) or (math.isnan(v) and math.isnan(
                    tb[tag][step])), (stage, tag, step)


def test_run_with_tensorboard_plots_report_and_a_reproducible_config(tmp_path, rlhf, explain):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'rlhf-cli[tensorboard]')")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'rlhf-cli[plots]')")
    out = tmp_path / "run"
    proc = rlhf(["run", "--stage", "all", "--out", out, *TINY, "rl.reward=verifier", "report.to=tensorboard"],
                timeout=900)
    assert proc.returncode == 0, explain(proc)
    stages = ["sft", "ppo"]
    _check_tensorboard(out, stages)
    sft = _rows(out / "sft" / "metrics.jsonl")
    train = [r for r in sft if "loss" in r]
    assert train and all(r["grad_norm"] > 0 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in train)
    # linear warm-up over sft.warmup_steps=4 from sft.lr=1e-3: step k (1-based) runs at 1e-3 * k / 4
    assert [r["lr"] for r in train[:4]] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert not any("accel_mem_max_gib" in r for r in sft)  # CPU: no accelerator memory
    assert all("lr" in r and "grad_norm" in r for r in _rows(out / "ppo" / "metrics.jsonl") if r["iteration"] > 0)
    # plots and report.md
    for stage in stages:
        _check_png(out / "plots" / f"{stage}.png")
    report = (out / "report.md").read_text()
    assert "| sft | eval loss |" in report and "![ppo curves](plots/ppo.png)" in report
    (out / "report.md").unlink()
    (out / "plots" / "sft.png").unlink()
    proc = rlhf(["report", out], timeout=300)
    assert proc.returncode == 0, explain(proc)
    _check_png(out / "plots" / "sft.png")
    assert (out / "report.md").read_text().split("\n", 4)[4] == report.split("\n", 4)[4]  # all but the time line
    # the saved config reproduces the run
    again = tmp_path / "again"
    proc = rlhf(["run", "--stage", "all", "--config", out / "config.yaml", "--out", again], timeout=900)
    assert proc.returncode == 0, explain(proc)
    first, second = (json.loads((d / "summary.json").read_text()) for d in (out, again))
    assert _numbers(second) == _numbers(first)
    assert second["sft"]["eval_loss_after"] < second["sft"]["eval_loss_before"]  # it trained


def test_a_missing_sink_package_stops_the_run_before_training(tmp_path, rlhf, explain):
    missing = [n for n in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(n) is None]
    if not missing:
        pytest.skip("wandb, mlflow and trackio are all installed: no missing sink package to test with")
    out = tmp_path / "run"
    proc = rlhf(["run", "--stage", "sft", "--out", out, *TINY, f"report.to=tensorboard,{missing[0]}"], timeout=300)
    assert proc.returncode == 2, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: report.to: '{missing[0]}' needs the {missing[0]} package, which is not installed; "
                      f"install it with: pip install 'rlhf-cli[{missing[0]}]'"], explain(proc)
    assert "Traceback" not in proc.stderr and not (out / "sft").exists()


def test_an_unreachable_hub_model_is_one_line(tmp_path, rlhf, explain):
    name = "rlhf-test-no-such-org/no-such-model"
    proc = rlhf(["run", "--stage", "sft", "--out", tmp_path / "run", *TINY, "--actor-model", name],
                timeout=300, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    # the preflight (rlhf_cli.preflight) stops it before any data or model is loaded; a hub name that passes
    # it and still fails to load is rlhf_hybrid.ModelNotAvailableError's one line (test_model_loading_errors.py)
    assert line == (f"error: --actor-model (model.actor_model): {name!r} is neither a local directory nor in the "
                    f"Hugging Face cache, and the hub is offline (HF_HUB_OFFLINE=1)"), line
    assert not (tmp_path / "run" / "sft").exists()


def test_rlhf_report_on_a_directory_without_metrics_is_one_line(tmp_path, rlhf, explain):
    proc = rlhf(["report", tmp_path], timeout=120)
    assert proc.returncode == 2, explain(proc)
    assert proc.stderr.strip() == (f"error: OUT: {str(tmp_path)!r} has no <stage>/metrics.jsonl; allowed: the --out "
                                   f"directory of an `rlhf run` that has started a stage"), explain(proc)
    proc = rlhf(["report", tmp_path / "nope"], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: OUT: {str(tmp_path / 'nope')!r} is not a directory"
