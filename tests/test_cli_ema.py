"""rl.ema_beta end to end: the EMA actor is saved beside the actor and scored on the held-out prompts,
and keeping it changes nothing the actor learns (its weights are bitwise those of the same run without)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "rm.epochs=1", "data.rm_samples=128", "rl.iterations=3", "rl.rollout_batch_size=16",
        "rl.micro_batch_size=16", "rl.eval_every=1", "rl.select=last"]


@pytest.mark.slow
def test_ema_actor_is_saved_scored_and_leaves_training_unchanged(tmp_path, rlhf, explain) -> None:
    base = tmp_path / "base"
    for stage in ("sft", "rm"):  # PPO on a reward model: scores that vary, so the actor moves
        proc = rlhf(["run", "--stage", stage, "--out", base, *TINY], timeout=600)
        assert proc.returncode == 0, explain(proc)
    outs = {}
    for beta in ("0", "0.5"):
        out = outs[beta] = tmp_path / f"ema{beta}"
        shutil.copytree(base, out)
        proc = rlhf(["run", "--stage", "ppo", "--out", out, *TINY, f"rl.ema_beta={beta}"], timeout=600)
        assert proc.returncode == 0, explain(proc)
    plain, ema = outs["0"], outs["0.5"]
    wa, wb = load_file(str(plain / "ppo" / "model.safetensors")), load_file(str(ema / "ppo" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the EMA only reads the weights
    we = load_file(str(ema / "ppo_ema" / "model.safetensors"))
    w0 = load_file(str(ema / "sft" / "model.safetensors"))
    # beta 0.5 over the 3 iterations' optimizer steps: strictly between the start and the end, weight by weight
    k = next(k for k in we if not torch.equal(w0[k], wb[k]))
    assert not torch.equal(we[k], wb[k]) and not torch.equal(we[k], w0[k])
    s = json.loads((ema / "summary.json").read_text())["ppo"]
    assert s["ema"]["beta"] == 0.5 and "verifier_score_after" in s["ema"] and "kl_to_ref_after" in s["ema"]
    assert not (plain / "ppo_ema").exists() and "ema" not in json.loads((plain / "summary.json").read_text())["ppo"]
