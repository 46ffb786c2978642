"""RL health through the pipeline: a tiny ``rlhf run --stage all`` with PPO on the reward model logs,
every iteration, the sampling/training log-prob mismatch (``gen_kl_error``, ~0: HF generation and the
training forward use the same fp32 weights), the reward model's agreement with the demo's verifier on
the policy's own samples, and HealthMonitor's warnings (printed and in the row); plus the pipeline
helpers that compute them, on fakes: the online stage's progress line (rlhf_algos.RM's held-out accuracy
is tested with rlhf-algos, packages/rlhf-algos/tests/test_algos_supervised.py)."""

from __future__ import annotations

import json

from rlhf_cli.stages.online import progress_line

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=1", "rm.epochs=1", "rl.iterations=2", "rl.rollout_batch_size=16", "rl.micro_batch_size=16",
        "rl.eval_every=1"]


def test_ppo_on_the_reward_model_logs_rl_health(tmp_path, rlhf, explain) -> None:
    out = tmp_path / "out"
    # entropy_floor=100: every entropy is below it, so the collapse warning fires, once, at iteration 1
    proc = rlhf(["run", "--stage", "all", "--algo", "ppo", "--out", out, *TINY, "rl.reward=model",
                 "rl.entropy_floor=100"], timeout=600)
    assert proc.returncode == 0, explain(proc)
    rows = [json.loads(x) for x in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r.get("iteration", 0) > 0]
    assert len(trained) == 2
    for r in trained:
        assert 0.0 <= r["gen_kl_error"] < 1e-4, r["gen_kl_error"]
        assert r["gen_logprob_gap_max"] < 1e-2
        assert 0.0 <= r["verifier_score_rollout"] <= 1.0
        assert "rm_verifier_agreement" in r and r["rm_verifier_pairs"] >= 0
        if r["rm_verifier_pairs"] > 0:
            assert 0.0 <= r["rm_verifier_agreement"] <= 1.0
        else:
            assert r["rm_verifier_agreement"] is None
    assert [len(r["warnings"]) for r in trained] == [1, 0]
    assert trained[0]["warnings"][0].startswith("entropy collapse at iteration 1")
    assert "ppo: warning: entropy collapse at iteration 1" in proc.stdout + proc.stderr
    print({k: [r[k] for r in trained] for k in ("gen_kl_error", "gen_logprob_gap_max", "rm_verifier_agreement",
                                                "rm_verifier_pairs", "verifier_score_rollout", "entropy")})


def test_progress_line_shows_agreement_only_when_measured() -> None:
    row = {"reward_mean": 0.5, "kl_to_ref": 0.1, "gen_kl_error": 1e-9, "rm_verifier_agreement": None}
    assert progress_line(row, 0.7) == {"reward": 0.5, "kl": 0.1, "valid": 0.7, "gen_kl": 1e-9}
    row["rm_verifier_agreement"] = 0.8
    assert progress_line(row, 0.7)["agree"] == 0.8


def test_rl_health_keys_default_to_health_thresholds_defaults() -> None:
    # The rl.* health keys repeat HealthThresholds' defaults as literals (config.py does not import torch);
    # this keeps the two from drifting apart.
    import dataclasses

    from rlhf_algos import HealthThresholds
    from rlhf_cli.config import RLSection

    assert RLSection().health_thresholds() == HealthThresholds()
    assert set(RLSection.HEALTH_KEYS.values()) == {f.name for f in dataclasses.fields(HealthThresholds)}
