"""``rlhf run --stage all`` from user-supplied local HF checkpoints, fully offline.

Two tiny random OPT models of different sizes (actor: hidden 64, 2 layers; reward: hidden 32,
1 layer) share one tokenizer trained here; the run goes through the hub-name/local-directory
loading path (``--actor-model``/``--reward-model``) instead of the demo's built-in Llama. Then
every output directory must load with ``AutoModelForCausalLM`` and ``rlhf chat`` must answer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

TINY = [
    "data.num_eval=40", "data.num_valid=20",
    "sft.epochs=2", "sft.batch_size=64",
    "rm.epochs=1", "rm.batch_size=32",
    "rl.iterations=3", "rl.rollout_batch_size=16", "rl.micro_batch_size=16", "rl.eval_every=3",
    "rl.reward=model", "deepspeed.zero_stage=0", "deepspeed.dtype=fp32",
]

ACTOR = {"hidden_size": 64, "num_hidden_layers": 2, "ffn_dim": 128, "num_attention_heads": 4}
REWARD = {"hidden_size": 32, "num_hidden_layers": 1, "ffn_dim": 64, "num_attention_heads": 2}


def make_opt(path, tokenizer, seed: int, **size) -> None:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
           "bos_token_id": tokenizer.eos_token_id}
    config = OPTConfig(vocab_size=len(tokenizer), word_embed_proj_dim=size["hidden_size"],
                       max_position_embeddings=128, **size, **ids)
    OPTForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def opt_run(tmp_path_factory, rlhf, explain):
    from rlhf_data import AdditionTask, train_demo_tokenizer

    root = tmp_path_factory.mktemp("opt")
    tok = train_demo_tokenizer(AdditionTask().corpus())
    make_opt(root / "actor", tok, seed=0, **ACTOR)
    make_opt(root / "reward", tok, seed=1, **REWARD)
    out = root / "out"
    proc = rlhf(["run", "--stage", "all", "--out", out, "--actor-model", root / "actor",
                 "--reward-model", root / "reward", *TINY], timeout=600)
    assert proc.returncode == 0, explain(proc)
    return out


def test_every_stage_output_loads_with_automodel(opt_run) -> None:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        OPTForCausalLM,
        OPTForSequenceClassification,
    )

    widths = {"sft": 64, "rm": 32, "ppo": 64}  # the reward model keeps its own (smaller) architecture
    for stage, width in widths.items():
        d = opt_run / stage
        auto, cls = ((AutoModelForSequenceClassification, OPTForSequenceClassification) if stage == "rm" else
                     (AutoModelForCausalLM, OPTForCausalLM))  # the reward model: its trained head loads too
        model = auto.from_pretrained(d)
        assert isinstance(model, cls), (stage, type(model))
        assert model.config.hidden_size == width, stage
        tok = AutoTokenizer.from_pretrained(d)
        assert len(tok) == model.config.vocab_size
        assert (d / "metrics.jsonl").is_file() and (d / "metrics.jsonl").read_text().strip(), stage
        card = json.loads((d / "run_card.json").read_text())
        assert card["stage"] == stage and card["world_size"] == 1
        assert card["config"]["model"]["actor_model"].endswith("actor")
        assert card["config"]["model"]["reward_model"].endswith("reward")
    assert torch.count_nonzero(AutoModelForSequenceClassification.from_pretrained(opt_run / "rm").score.weight) > 0
    assert not list(opt_run.glob("*.tmp-*")) and not list(opt_run.glob(".*.metrics.jsonl"))


def test_summary_has_the_headline_metrics(opt_run) -> None:
    summary = json.loads((opt_run / "summary.json").read_text())
    keys = {
        "sft": ["eval_loss_before", "eval_loss_after"],
        "rm": ["heldout_accuracy"],
        "ppo": ["verifier_score_before", "verifier_score_after", "verifier_score_sampled_before",
                "verifier_score_sampled_after", "kl_to_ref"],
    }
    for stage, names in keys.items():
        for name in names:
            value = summary[stage][name]
            assert isinstance(value, float) and math.isfinite(value), (stage, name, value)
    for name in keys["ppo"][:4] + ["heldout_accuracy"]:
        section = "rm" if name == "heldout_accuracy" else "ppo"
        assert 0.0 <= summary[section][name] <= 1.0
    assert summary["sft"]["eval_loss_after"] < summary["sft"]["eval_loss_before"]  # SFT learned something
    assert summary["ppo"]["kl_to_ref"] >= 0.0
    assert set(summary["wall_seconds"]) >= {"sft", "rm", "ppo", "total"}


def test_chat_answers_from_the_ppo_checkpoint(opt_run, rlhf, explain) -> None:
    proc = rlhf(["chat", "--model", opt_run / "ppo", "--prompt", "What is 12 + 34?", "--max-new-tokens", "8"],
                timeout=180)
    assert proc.returncode == 0, explain(proc)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].strip(), explain(proc)
