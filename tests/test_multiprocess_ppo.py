"""PPO with ZeRO-3 in two processes on CPU (gloo), end to end through the CLI.

1. ``rlhf run --stage sft`` in one process trains a small demo model until it adds (most
   non-carry questions right, most carry questions wrong: the demonstrations forget the carry).
2. ``rlhf run --stage ppo --nproc 2 --zero-stage 3 rl.reward=verifier`` relaunches itself under
   torchrun; actor, critic and the frozen reference are all ZeRO-3 sharded over the two ranks, and
   generation runs on gathered weights. No reward model is needed: the verifier is the reward and
   the critic starts from the SFT model.

The run must finish (a hang fails at the timeout and the process tree is killed), record
``world_size: 2``, and raise the verifier score: held-out greedy and sampled, and the training
reward. ``rl.select=last`` so that the scores measure what PPO learnt, not which iterate a
50-prompt validation set happened to pick.

Every setting that matters is pinned here so that tuning the defaults does not change this test.
Measured on a 2-core CPU (the durations and scores are in the assertions' comments).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

SEED = "3"
ITERATIONS = 30
MODEL = ["model.hidden_size=128", "model.intermediate_size=512", "model.num_layers=2", "model.num_heads=4",
         "data.num_eval=100", "data.num_valid=50", "data.sft_carry_error=0.7", "data.max_prompt_len=64",
         "data.max_response_len=16", "data.sources=demo", "deepspeed.dtype=fp32", "deepspeed.offload_optimizer=false"]
SFT = ["deepspeed.zero_stage=0", "sft.epochs=5", "sft.batch_size=16", "sft.lr=1e-3", "sft.grad_accum=1", "sft.warmup_steps=20",
       "sft.mask_prompt=true"]
PPO = [f"rl.iterations={ITERATIONS}", "rl.rollout_batch_size=32", "rl.micro_batch_size=32", "rl.epochs=1",
       "rl.actor_lr=3e-4", "rl.critic_lr=5e-4", "algo.kl_coef=0.1", "algo.kl_estimator=k1", "algo.clip_eps=0.2",
       "algo.value_clip_eps=0.2", "algo.gamma=1.0", "algo.lam=0.95", "algo.whiten_advantages=true",
       "rl.max_new_tokens=8", "rl.temperature=1.0", "rl.reward=verifier", "rl.eval_every=5",
       "rl.select=last", "algo.clip_reward=5.0"]


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, rlhf, explain):
    out = tmp_path_factory.mktemp("mp") / "out"
    sft = rlhf(["run", "--stage", "sft", "--out", out, "--seed", SEED, *MODEL, *SFT], timeout=300)
    assert sft.returncode == 0, explain(sft)
    ppo = rlhf(["run", "--stage", "ppo", "--out", out, "--seed", SEED, "--nproc", "2", "--zero-stage", "3",
                *MODEL, *PPO], timeout=360)
    assert ppo.returncode == 0, explain(ppo)
    return out, ppo


def test_ppo_ran_in_two_processes_under_zero3(ppo_run) -> None:
    out, proc = ppo_run
    card = json.loads((out / "ppo" / "run_card.json").read_text())
    assert card["world_size"] == 2
    assert card["config"]["deepspeed"]["zero_stage"] == 3
    assert card["config"]["deepspeed"]["nproc"] == 2
    assert "world_size=2 zero_stage=3" in proc.stderr
    rows = [json.loads(ln) for ln in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    iterations = [r["iteration"] for r in rows if r.get("stage") == "ppo" and "reward_mean" in r]
    assert iterations == list(range(1, ITERATIONS + 1))


def test_ppo_checkpoint_loads(ppo_run) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = ppo_run
    model = AutoModelForCausalLM.from_pretrained(out / "ppo")
    assert model.config.hidden_size == 128


def test_ppo_raises_the_verifier_score(ppo_run) -> None:
    """Measured on 2 CPU cores with exactly this recipe, seeds 1, 3, 4, 5, 6 and 42:

    * held-out greedy score (100 prompts), after - before: +0.07 to +0.33; seed 3 (this test):
      0.60 -> 0.83;
    * held-out sampled score: +0.07 to +0.23; seed 3: 0.59 -> 0.76;
    * training reward (the verifier on the rollouts), mean of the last 5 iterations - the first 5:
      +0.06 to +0.19; seed 3: 0.53 -> 0.72.

    (With rl.actor_lr=1e-4, 20 iterations and rl.select=best the greedy change ranged from -0.06
    to +0.19 across seeds: too weak a push, and a 50-prompt validation set picks early iterates.)
    """
    out, _ = ppo_run
    summary = json.loads((out / "summary.json").read_text())
    sft, ppo = summary["sft"], summary["ppo"]
    # SFT must have produced a model that adds: its eval loss drops from ~0.6 to ~0.1-0.2 once it
    # has learnt (seed 3 by epoch 3 of 5).
    assert sft["eval_loss_after"] < 0.3, sft
    assert ppo["verifier_score_before"] > 0.3, ppo
    assert ppo["selected_iteration"] == ITERATIONS, ppo
    assert ppo["verifier_score_after"] >= ppo["verifier_score_before"] + 0.05, ppo
    assert ppo["verifier_score_sampled_after"] >= ppo["verifier_score_sampled_before"] + 0.03, ppo
    rows = [json.loads(ln) for ln in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    reward = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert sum(reward[-5:]) / 5 >= sum(reward[:5]) / 5 + 0.03, reward
    assert ppo["kl_to_ref"] > 0.0
