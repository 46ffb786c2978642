"""`rlhf run` with sft.padding_free / rm.padding_free / rl.padding_free trains as the padded run does.

Padding-free batches hold the same samples per step with the same loss, so the SFT and reward-model
stages of a tiny run must log the same training losses step for step (up to float rounding carried
through a few AdamW steps: rtol 1e-4) and end at the same held-out metrics.
"""

from __future__ import annotations

import json

import pytest

TINY = ["data.num_eval=40", "data.num_valid=20", "data.sft_samples=96", "data.rm_samples=48", "data.max_eval=40",
        "model.hidden_size=64", "model.intermediate_size=128", "sft.epochs=1", "sft.batch_size=32",
        "rm.epochs=1", "rm.batch_size=16"]


def _losses(out, stage: str) -> list[float]:
    rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow  # four `rlhf run` subprocesses: about 1 min idle, 3.5 min on the loaded 2-core machine
def test_padding_free_run_logs_the_padded_losses(tmp_path, rlhf, explain) -> None:
    outs = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        for stage in ("sft", "rm"):
            proc = rlhf(["run", "--stage", stage, "--out", out, *TINY, f"sft.padding_free={mode}",
                         f"rm.padding_free={mode}"], timeout=300)
            assert proc.returncode == 0, explain(proc)
        outs[mode] = out
    for stage in ("sft", "rm"):
        padded, packed = _losses(outs["false"], stage), _losses(outs["true"], stage)
        assert len(padded) == len(packed) >= 3, (stage, padded, packed)
        assert packed == pytest.approx(padded, rel=1e-4), stage
    summary = {m: json.loads((o / "summary.json").read_text()) for m, o in outs.items()}
    for stage, key in (("sft", "eval_loss_after"), ("rm", "heldout_accuracy")):
        assert summary["true"][stage][key] == pytest.approx(summary["false"][stage][key], rel=1e-4), (stage, summary)


RL = ["rl.reward=verifier", "rl.iterations=2", "rl.rollout_batch_size=16", "rl.micro_batch_size=8", "rl.epochs=2",
      "rl.eval_every=2", "rl.select=last"]


@pytest.mark.slow  # three `rlhf run` subprocesses (sft once, ppo twice)
def test_rl_padding_free_run_logs_the_padded_learn_metrics(tmp_path, rlhf, explain) -> None:
    """rl.padding_free=true (PPO: the actor and the critic, which starts from the SFT model under
    rl.reward=verifier) learns from the same rollouts as the padded run: generation is unchanged, so with the
    same seed every iteration's rollout and learn metrics agree up to float rounding."""
    import shutil

    base = tmp_path / "base"
    proc = rlhf(["run", "--stage", "sft", "--out", base, *TINY], timeout=300)
    assert proc.returncode == 0, explain(proc)
    rows = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        shutil.copytree(base, out)
        proc = rlhf(["run", "--stage", "ppo", "--out", out, *TINY, *RL, f"rl.padding_free={mode}"], timeout=300)
        assert proc.returncode == 0, explain(proc)
        rows[mode] = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()
                      if '"policy_loss"' in line]
    assert len(rows["true"]) == len(rows["false"]) == 2, rows
    for padded, packed in zip(rows["false"], rows["true"], strict=True):
        for key in ("reward_mean", "response_length", "policy_loss", "value_loss", "entropy", "approx_kl",
                    "kl_to_ref"):
            assert packed[key] == pytest.approx(padded[key], rel=1e-4, abs=1e-6), (key, padded, packed)
