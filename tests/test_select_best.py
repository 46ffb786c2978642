"""``select=best`` when no iteration / epoch beats the starting model keeps exactly the starting model.

The run trains with a learning rate so large that every update wrecks the policy (its validation
score can only fall or stay at the start's), so selection must fall back to iteration / epoch 0; the
saved weights must then be bitwise those of the SFT model (before this was fixed, the last
iteration's weights were saved while summary.json said ``selected_iteration: 0``).
"""

from __future__ import annotations

import json
import shutil

import torch
from safetensors.torch import load_file

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "rm.epochs=1", "rl.iterations=2", "rl.rollout_batch_size=16", "rl.micro_batch_size=16",
        "rl.eval_every=1", "pref.epochs=1", "data.rm_samples=64", "pref.batch_size=32"]


def _weights(d) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def _moved(out, stage: str) -> bool:
    """Whether training moved the policy at all (else restoring the start would prove nothing)."""
    rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
    if stage == "grpo":
        return max(r.get("kl_to_ref") or 0.0 for r in rows if r.get("iteration", 0) > 0) > 0
    losses = [r["loss"] for r in rows if "loss" in r]
    return len(set(losses)) > 1


def test_no_winner_keeps_the_starting_model_bitwise(tmp_path, rlhf, explain) -> None:
    base = tmp_path / "base"
    for s in ("sft", "rm"):  # GRPO learns from the reward model's scores: they vary, so the policy moves
        proc = rlhf(["run", "--stage", s, "--out", base, *TINY], timeout=600)
        assert proc.returncode == 0, explain(proc)
    for stage, lr_key, kept_key in (("grpo", "rl.actor_lr", "selected_iteration"), ("dpo", "pref.lr", "selected_epoch")):
        out = tmp_path / stage
        shutil.copytree(base, out)
        proc = rlhf(["run", "--stage", stage, "--out", out, *TINY, "rl.reward=model", f"{lr_key}=1.0"], timeout=600)
        assert proc.returncode == 0, explain(proc)
        summary = json.loads((out / "summary.json").read_text())[stage]
        # lr=1 wrecks the policy: its greedy validation score cannot beat the start's
        assert summary[kept_key] == 0, summary
        assert "keeping the starting model" in proc.stdout + proc.stderr
        assert _moved(out, stage), f"{stage}: training never changed the policy; the test would prove nothing"
        before, after = _weights(out / "sft"), _weights(out / stage)
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), (stage, k)
        assert summary["verifier_score_after"] == summary["verifier_score_before"]
