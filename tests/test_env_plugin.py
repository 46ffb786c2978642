"""A third-party environment package, built from docs/environments.md as written: pip-installed into this
environment, listed by ``rlhf envs list``, loaded through ``rlhf.environments`` and used by GRPO iterations."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "environments.md"

USE = textwrap.dedent('''
    import torch
    from rlhf_algos import GRPO, GRPOConfig
    from rlhf_algos.environments import EpisodeBudget, get_environment
    from rlhf_algos.multiturn import EnvRollout
    from rlhf_algos.testing import TinyPolicy

    cls = get_environment("guess")
    assert cls.__module__ == "rlhf_env_guess", cls
    V, EOS, PAD = 12, 1, 0
    # token t in 2..11 is the word str(t - 2); the hints are single tokens 10 ("higher") and 11 ("lower")
    words = {10: "higher", 11: "lower"}
    decode = lambda ids: " ".join(words.get(t, str(t - 2)) for t in ids if t not in (EOS, PAD))
    encode = lambda text: [{"higher": 10, "lower": 11}[w] for w in text.split()]
    actor = TinyPolicy(V, seed=0, lr=0.05)
    algo = GRPO(GRPOConfig(samples_per_prompt=4, micro_batch_size=8, max_new_tokens=2), actor=actor,
                reference=actor.frozen_copy(), reward_fn=None, eos_token_id=EOS, pad_token_id=PAD)
    algo.env_rollout = EnvRollout(cls, EpisodeBudget(max_turns=3, max_turn_tokens=2, max_total_tokens=12),
                                  decode=decode, encode=encode, vocab_size=V)
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6], [7, 8]])
    for it in range(2):
        exp = algo.generate_experience(ids, torch.ones_like(ids), [{"target": 3}, {"target": 7}])
        m = algo.learn(exp)
        env_tokens = (exp.attention_mask[:, 2:] == 1) & (exp.response_mask == 0)
        assert set(exp.sequences[:, 2:][env_tokens].tolist()) <= {10, 11}  # only hints are environment tokens
        print(it, m["env_turns_mean"], m["env_end_done"] + m["env_end_max_turns"], m["reward_mean"])
''')


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def plugin(tmp_path_factory):
    text = DOC.read_text()
    (module,) = [c for c in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "class GuessEnv" in c]
    (pyproject,) = re.findall(r"```toml\n(.*?)```", text, flags=re.S)
    src = tmp_path_factory.mktemp("env_plugin")
    (src / "pyproject.toml").write_text(pyproject)
    (src / "rlhf_env_guess.py").write_text(module)
    proc = pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(src))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield src
    finally:
        pip("uninstall", "-y", "rlhf-env-guess")


def test_the_documented_environment_is_listed_and_used(plugin, rlhf) -> None:
    listed = rlhf(["envs", "list"], timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "guess\trlhf_env_guess:GuessEnv\tguess a number; the environment answers higher / lower" in listed.stdout
    assert "reward\trlhf_algos.environments:RewardEnvironment" in listed.stdout
    run = subprocess.run([sys.executable, "-c", USE], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.split("\n")
    for it in (0, 1):
        _, turns, ended, _ = lines[it].split()
        assert 1.0 <= float(turns) <= 3.0 and float(ended) == 8.0  # every trajectory ended done or at max_turns


def test_the_plugin_is_selected_by_env_name_in_a_run(plugin, rlhf, explain, tmp_path) -> None:
    """``rlhf run ... env.name=guess``: the online stage rolls out against the installed plugin. The demo's
    prompt records carry no ``target``, so its ``reset`` raises: every trajectory ends ``env_error`` (counted,
    never the run), which shows that the plugin, not the single-turn reward, was used."""
    import json

    out = tmp_path / "out"
    proc = rlhf(["run", "--stage", "all", "--out", str(out), "algo.name=grpo", "rl.reward=verifier", "env.name=guess",
                 "sft.epochs=1", "data.sft_samples=64", "rl.iterations=1", "rl.rollout_batch_size=4", "data.num_eval=4", "data.num_valid=4",
                 "model.hidden_size=32", "model.num_layers=1", "model.num_heads=4", "model.intermediate_size=64"],
                timeout=600)
    assert proc.returncode == 0, explain(proc)
    rows = [json.loads(x) for x in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if r.get("iteration") == 1 and "reward_mean" in r]
    assert row["env_end_env_error"] == 4 * 4 and row["reward_mean"] == 0.0, row
    g = json.loads((out / "summary.json").read_text())["grpo"]
    assert g["eval_metric"] == "env_score" and g["env_score_before"] == 0.0 and g["env_turns_mean_before"] == 0.0
    assert not (out / "rm").exists()
