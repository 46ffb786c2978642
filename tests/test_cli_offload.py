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


LEARN_SFT = ["data.num_eval=32", "data.num_valid=16", "data.max_eval=32", "model.hidden_size=64",
             "model.intermediate_size=128", "deepspeed.dtype=fp32", "sft.epochs=2", "data.sft_samples=1024",
             "sft.batch_size=32"]
LEARN_PPO = ["rl.iterations=10", "rl.rollout_batch_size=32", "rl.micro_batch_size=32", "rl.eval_every=5",
             "rl.select=last", "rl.max_new_tokens=8", "rl.actor_lr=5e-4", "--zero-stage", "3", "--nproc", "2"]


def _random_old_format_rm(d, tokenizer_dir, seed: int):
    """A random reward model in the older format (causal LM + value_head.safetensors): the reward PPO maximises.
    Returns the head weight (32,)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(d)
    w = torch.randn(1, 32)
    save_file({"v_head.weight": w}, str(d / "value_head.safetensors"))
    return w[0]


def _greedy_rewards(policy_dir, tokenizer_dir, rm_dir, w, prompts: list[str]) -> torch.Tensor:
    """Transformers only: each prompt's greedy answer (HF ``generate``, 8 new tokens, cut after EOS) from the
    policy at ``policy_dir``, scored by the older-format reward model by hand: the head ``w`` on the
    backbone's last hidden state at the last token."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    lm = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    backbone = AutoModel.from_pretrained(rm_dir).eval()
    scores = []
    with torch.no_grad():
        for p in prompts:
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
            new = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
            if (new == tok.eos_token_id).any():
                new = new[: int((new == tok.eos_token_id).nonzero()[0]) + 1]
            scores.append(float(backbone(torch.cat([ids[0], new])[None]).last_hidden_state[0, -1] @ w))
    return torch.tensor(scores)


@pytest.mark.slow
def test_zero3_ppo_with_every_offload_on_learns(tmp_path, rlhf, explain) -> None:
    """Two ranks, ZeRO-3, the actor and critic's parameters and the reference and reward models offloaded
    (the reward model in the older format, loaded partitioned): PPO raises the reward it is given. The
    measure is independent of the run's code: on 32 held-out prompts, the greedy answers of the trained
    policy and of its SFT start (HF ``generate``) scored with the reward model by hand (transformers'
    backbone and the head). Measured while choosing the settings (docs/performance.md): with reward model
    21, one rank, greedy reward mean -0.99 -> 2.39 (SFT spread 0.43; all 32 prompts higher); with seed 2,
    reward model 22 and two ranks, 15.43 -> 15.79 (spread 0.78; 31 of 32 higher). The test asks for a gain
    of a quarter of the SFT spread on the mean and 80% of the prompts higher."""
    from rlhf_data import AdditionTask, AdditionTaskConfig

    out = tmp_path / "out"
    proc = rlhf(["run", "--stage", "sft", "--out", out, "seed=1", *LEARN_SFT], timeout=900)
    assert proc.returncode == 0, explain(proc)
    w = _random_old_format_rm(tmp_path / "rm", out / "sft", seed=21)
    proc = rlhf(["run", "--stage", "ppo", "--out", out, "--reward-model", tmp_path / "rm", "seed=1", *LEARN_SFT,
                 *LEARN_PPO, *OFFLOAD[:3]], timeout=900)
    assert proc.returncode == 0, explain(proc)
    card = json.loads((out / "ppo" / "run_card.json").read_text())
    assert card["world_size"] == 2 and card["config"]["offload"] == {"reference": True, "reward": True, "params": True}
    prompts = [r.prompt for r in AdditionTask(AdditionTaskConfig(num_eval=32, num_valid=16)).prompt_records("eval")]
    before = _greedy_rewards(out / "sft", out / "sft", tmp_path / "rm", w, prompts)
    after = _greedy_rewards(out / "ppo", out / "sft", tmp_path / "rm", w, prompts)
    # the reward models' scales differ (random heads): the gain is measured against the spread over prompts
    assert float(after.mean() - before.mean()) > 0.25 * float(before.std()), (before, after)
    assert float((after > before).float().mean()) >= 0.8, (before, after)
