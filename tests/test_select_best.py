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
        "sft.epochs=1", "rl.iterations=2", "rl.rollout_batch_size=16", "rl.micro_batch_size=16",
        "rl.eval_every=1", "pref.epochs=1", "data.rm_samples=64", "pref.batch_size=32"]


def _weights(d) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def test_no_winner_keeps_the_starting_model_bitwise(tmp_path, rlhf, explain) -> None:
    base = tmp_path / "base"
    proc = rlhf(["run", "--stage", "sft", "--out", base, *TINY], timeout=600)
    assert proc.returncode == 0, explain(proc)
    for stage, lr_key, kept_key in (("grpo", "rl.actor_lr", "selected_iteration"), ("dpo", "pref.lr", "selected_epoch")):
        out = tmp_path / stage
        shutil.copytree(base / "sft", out / "sft")
        proc = rlhf(["run", "--stage", stage, "--out", out, *TINY, "rl.reward=verifier", f"{lr_key}=1.0"], timeout=600)
        assert proc.returncode == 0, explain(proc)
        summary = json.loads((out / "summary.json").read_text())[stage]
        # lr=1 wrecks the policy: its greedy validation score cannot beat the start's
        assert summary[kept_key] == 0, summary
        assert "keeping the starting model" in proc.stdout + proc.stderr
        before, after = _weights(out / "sft"), _weights(out / stage)
        assert before.keys() == after.keys()
        for k in before:
            assert torch.equal(before[k], after[k]), (stage, k)
        assert summary["verifier_score_after"] == summary["verifier_score_before"]
