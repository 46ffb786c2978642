"""Stage 3 through the registry from the CLI: an online algorithm with a registered reward function
(no reward-model stage) and an offline one (no reward-model stage either), on a tiny demo run."""

from __future__ import annotations

import json

import pytest

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "rl.iterations=2", "rl.rollout_batch_size=8", "rl.micro_batch_size=16", "rl.eval_every=1",
        "pref.epochs=1", "pref.batch_size=64"]


@pytest.fixture(scope="module")
def sft_out(tmp_path_factory, rlhf, explain):
    out = tmp_path_factory.mktemp("algos") / "out"
    proc = rlhf(["run", "--stage", "sft", "--out", out, *TINY], timeout=300)
    assert proc.returncode == 0, explain(proc)
    return out


def test_all_with_grpo_a_registered_reward_and_fast_generation(tmp_path, rlhf, explain) -> None:
    out = tmp_path / "out"
    proc = rlhf(["run", "--stage", "all", "--algo", "grpo", "--out", out, *TINY, "rl.reward=addition",
                 "algo.samples_per_prompt=2", "algo.kl_coef=0.02", "rl.generation=fast"], timeout=600)
    assert proc.returncode == 0, explain(proc)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"sft", "grpo", "wall_seconds"}  # sft -> grpo, no rm stage
    g = summary["grpo"]
    assert g["algo"] == "grpo" and g["reward"] == "addition" and g["eval_metric"] == "verifier_score"
    assert (out / "grpo" / "config.json").is_file() and not (out / "rm").exists()
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("iteration", 0) > 0]
    assert len(trained) == 2 and all("reward_mean" in r and "policy_loss" in r for r in trained)
    card = json.loads((out / "grpo" / "run_card.json").read_text())
    assert dict(card["config"]["algo"]["options"]) == {"samples_per_prompt": 2, "kl_coef": 0.02}


@pytest.mark.parametrize("algo", ["dpo", "kto"])
def test_offline_stage_on_the_demo_pairs(sft_out, algo, rlhf, explain) -> None:
    proc = rlhf(["run", "--stage", algo, "--out", sft_out, *TINY], timeout=600)
    assert proc.returncode == 0, explain(proc)
    summary = json.loads((sft_out / "summary.json").read_text())
    s = summary[algo]
    assert s["algo"] == algo and s["train_steps"] > 0 and s["eval_metric"] == "verifier_score"
    assert (sft_out / algo / "config.json").is_file()
    assert f"│ {algo}" in proc.stdout + proc.stderr  # a row in the summary table


def test_stage_and_algo_must_agree(rlhf, tmp_path) -> None:
    proc = rlhf(["run", "--stage", "grpo", "--algo", "dpo", "--out", tmp_path], timeout=60)
    assert proc.returncode == 2 and "--algo: 'dpo' contradicts --stage grpo" in proc.stderr


def test_grpo_under_zero3_with_int8_gathered_fast_generation(sft_out, rlhf, explain) -> None:
    """rl.gather_quantization=int8: the actor's ZeRO-3 shards travel int8 on the wire, one all-gather
    per layer, and the metrics say so."""
    proc = rlhf(["run", "--stage", "grpo", "--out", sft_out, *TINY, "rl.reward=addition", "algo.samples_per_prompt=2",
                 "deepspeed.zero_stage=3", "rl.generation=fast", "rl.gather_quantization=int8"], timeout=600)
    assert proc.returncode == 0, explain(proc)
    rows = [json.loads(x) for x in (sft_out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("iteration", 0) > 0]
    assert len(trained) == 2
    for r in trained:
        assert r["gather_collectives"] == 3  # 2 decoder layers + embeddings/final norm/head
        assert r["gather_sent_mib"] == 0  # a world of one sends nothing to other ranks ...
        assert r["layout_copied_mib"] > 0  # ... but the layout is built from gathered (dequantized) copies
