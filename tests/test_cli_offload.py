"""ZeRO-3 offload through the CLI: ``offload.*`` and ``deepspeed.offload_optimizer`` in a two-process PPO run.

The models of stage 3 are built ZeRO-3 partitioned from the first byte (``rlhf_hybrid.zero_init``) in
both runs; one run also keeps the reference and reward models' parameters and the actor and critic's
parameters and optimizer state on the CPU. On a CPU-only machine offload moves nothing (the partitions
are in CPU memory already), so the two runs must learn the same: the same rewards and, to fp32
rounding, the same final weights. What this proves is that the configuration reaches DeepSpeed and
every offloaded engine generates, scores and trains; the memory saving on a GPU is not measured here.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

TINY = ["data.num_eval=20", "data.num_valid=10", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "rm.epochs=1", "data.rm_samples=64", "deepspeed.dtype=fp32"]
PPO = ["rl.iterations=2", "rl.rollout_batch_size=8", "rl.micro_batch_size=8", "rl.eval_every=2", "rl.select=last",
       "rl.reward=model", "rl.max_new_tokens=8", "--nproc", "2", "--zero-stage", "3"]
OFFLOAD = ["offload.reference=true", "offload.reward=true", "offload.params=true", "deepspeed.offload_optimizer=true"]


@pytest.mark.slow
def test_offloaded_ppo_learns_what_the_plain_run_learns(tmp_path, rlhf, explain) -> None:
    base = tmp_path / "base"
    for stage in ("sft", "rm"):
        proc = rlhf(["run", "--stage", stage, "--out", base, *TINY], timeout=600)
        assert proc.returncode == 0, explain(proc)
    outs = {}
    for name, extra in (("plain", []), ("offload", OFFLOAD)):
        out = outs[name] = tmp_path / name
        shutil.copytree(base, out)
        proc = rlhf(["run", "--stage", "ppo", "--out", out, *TINY, *PPO, *extra], timeout=900)
        assert proc.returncode == 0, explain(proc)
    card = json.loads((outs["offload"] / "ppo" / "run_card.json").read_text())
    assert card["world_size"] == 2 and card["config"]["offload"] == {"reference": True, "reward": True, "params": True}

    def rewards(out):
        rows = [json.loads(ln) for ln in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
        return [r["reward_mean"] for r in rows if "reward_mean" in r]

    assert len(rewards(outs["plain"])) == 2
    assert rewards(outs["offload"]) == pytest.approx(rewards(outs["plain"]), rel=1e-4, abs=1e-5)
    plain, off = (load_file(str(outs[n] / "ppo" / "model.safetensors")) for n in ("plain", "offload"))
    start = load_file(str(base / "sft" / "model.safetensors"))
    assert any(not torch.equal(plain[k], start[k]) for k in plain), "PPO did not change the actor"
    for k, v in plain.items():
        torch.testing.assert_close(off[k], v, rtol=1e-4, atol=1e-5)


def test_offload_needs_zero3(rlhf) -> None:
    proc = rlhf(["run", "--stage", "ppo", "offload.reference=true", "deepspeed.zero_stage=2"], timeout=120)
    assert proc.returncode != 0
    assert "offload.reference: needs deepspeed.zero_stage=3" in proc.stderr + proc.stdout, proc.stderr[-2000:]
