#!/usr/bin/env python3
r"""Tool-use learning check: SFT on imperfect calculator demonstrations, then GRPO against the calculator.

Not part of the test suite (it trains for real). From Python; `rlhf run --data tool-demo` runs the
same recipe (its settings: rlhf_cli.tool_demo_preset). The tool demo's task (rlhf_data.tool_demo), a
tiny Llama, the demo's in-process tokenizer (one token per digit), SFT on the demonstrations laid
out as trajectories (tool turns out of the loss), then GRPO with ``rlhf_algos.multiturn.EnvRollout``
on ``rlhf_algos.calculator.CalculatorEnv``. Held-out greedy episodes are scored before RL (the SFT
model) and after: verifier score, tool-call rate and copy-error rate
(rlhf_data.tool_demo.tool_use_stats). Prints one JSON object per seed, then a summary line (the lift
= after - before verifier score: mean/min/max over the seeds).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/tool_demo.py --seeds 1,2,3
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="1", help="comma-separated seeds, one whole run (SFT + RL + evaluations) each")
    ap.add_argument("--num-sft", type=int, default=3000)
    ap.add_argument("--num-eval", type=int, default=100)
    ap.add_argument("--skip-tool", type=float, default=None, help="ToolTaskConfig.skip_tool (default: its default)")
    ap.add_argument("--copy-error", type=float, default=None, help="ToolTaskConfig.copy_error (default: its default)")
    ap.add_argument("--wrong-operands", type=float, default=None,
                    help="ToolTaskConfig.wrong_operands (default: its default)")
    ap.add_argument("--sft-epochs", type=int, default=6)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-warmup", type=int, default=0, help="SFT linear warm-up steps")
    ap.add_argument("--sft-cosine", type=int, default=0,
                    help="1: SFT lr decays (cosine) to 10%% over all SFT steps (EngineConfig.decay_steps); 0: constant")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--prompts-per-iteration", type=int, default=16)
    ap.add_argument("--samples-per-prompt", type=int, default=4)
    ap.add_argument("--rl-lr", type=float, default=3e-4)
    ap.add_argument("--kl-coef", type=float, default=0.0)
    ap.add_argument("--temperature", type=float, default=1.0, help="GRPO's sampling temperature")
    ap.add_argument("--max-turn-tokens", type=int, default=20)
    return ap.parse_args()


class _Demo:
    """The tool demo's task, tokenizer and helpers for one seed."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        from rlhf_data import train_demo_tokenizer
        from rlhf_data.tool_demo import ToolAdditionTask, ToolTaskConfig, demonstration_example

        mix = {k: getattr(args, k) for k in ("skip_tool", "copy_error", "wrong_operands") if getattr(args, k) is not None}
        self.task = ToolAdditionTask(ToolTaskConfig(num_sft=args.num_sft, num_rl=2000, num_eval=args.num_eval,
                                                    seed=seed, **mix))
        demos = self.task.demonstrations()
        self.fmt = "Human: {}\n\nAssistant: ".format
        self.tok = tok = train_demo_tokenizer(self.task.corpus())  # the same texts as fmt(q) + turns
        self.pad, self.eos = tok.pad_token_id, tok.eos_token_id
        self.examples = [demonstration_example(self.encode, self.encode(self.fmt(q)), turns, self.eos)
                         for q, turns, _ in demos]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def left_pad(self, prompts: list[tuple[str, dict]]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = [self.encode(self.fmt(q)) for q, _ in prompts]
        width = max(map(len, enc))
        ids = torch.tensor([[self.pad] * (width - len(e)) + e for e in enc])  # (B, P), left-padded
        return ids, (ids != self.pad).long()


def _sft(demo: _Demo, actor, args: argparse.Namespace) -> float:
    """SFT epochs over the demonstrations (labels on the model's turns only); returns the last loss."""
    from rlhf_algos import SFT
    from rlhf_algos.sft import SFTConfig

    sft, pad, examples = SFT(SFTConfig(), policy=actor), demo.pad, list(demo.examples)
    for _ in range(args.sft_epochs):
        random.shuffle(examples)
        for i in range(0, len(examples), args.sft_batch):
            b = examples[i : i + args.sft_batch]
            width = max(len(e["input_ids"]) for e in b)
            ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in b])
            labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in b])
            loss = sft.learn({"input_ids": ids, "attention_mask": (ids != pad).long(), "labels": labels})["loss"]
    return loss


def _evaluate(demo: _Demo, actor, budget) -> dict:
    """Greedy episodes on the held-out problems: tool_use_stats plus three decoded samples."""
    from rlhf_algos.calculator import CalculatorEnv
    from rlhf_algos.trajectories import make_session, run_episodes
    from rlhf_data.tool_demo import tool_use_stats

    prompts = demo.task.prompts("eval")
    ids, mask = demo.left_pad(prompts)
    actor.eval()
    session = make_session(actor, ids, mask, max_total_tokens=budget.max_total_tokens, eos_token_id=demo.eos,
                           pad_token_id=demo.pad, do_sample=False)
    batch = run_episodes(session, [CalculatorEnv() for _ in prompts], [m for _, m in prompts], budget=budget,
                         decode=demo.decode, encode=demo.encode, prompt_ids=ids, prompt_mask=mask,
                         pad_token_id=demo.pad)
    stats = tool_use_stats(batch.final_info)
    P = batch.prompt_len
    stats["samples"] = [demo.decode(batch.sequences[i, P:][batch.attention_mask[i, P:].bool()].tolist())
                        + f"  (want {m['a'] + m['b']})" for i, (_, m) in enumerate(prompts[:3])]
    return stats


def _grpo(demo: _Demo, sft_module, args: argparse.Namespace, budget, seed: int) -> tuple[list[dict], object]:
    """GRPO against the calculator from the SFT weights (fresh optimizer); returns the per-iteration metrics and the trained actor."""
    from rlhf_algos import GRPO, GRPOConfig
    from rlhf_algos.calculator import CalculatorEnv
    from rlhf_algos.multiturn import EnvRollout
    from rlhf_hybrid import EngineConfig, HybridEngine

    actor = HybridEngine(copy.deepcopy(sft_module), EngineConfig(zero_stage=0, lr=args.rl_lr, micro_batch_size=32,
                                                                 generation="fast"))
    reference = HybridEngine(copy.deepcopy(sft_module), EngineConfig(zero_stage=0, generation="fast"),
                             trainable=False)
    algo = GRPO(GRPOConfig(samples_per_prompt=args.samples_per_prompt, micro_batch_size=32,
                           max_new_tokens=args.max_turn_tokens, kl_coef=args.kl_coef, temperature=args.temperature),
                actor=actor, reference=reference, reward_fn=None, eos_token_id=demo.eos, pad_token_id=demo.pad,
                seed=seed)
    algo.env_rollout = EnvRollout(CalculatorEnv, budget, decode=demo.decode, encode=demo.encode,
                                  vocab_size=len(demo.tok))
    rl_prompts, history, n = demo.task.prompts("rl"), [], args.prompts_per_iteration
    for it in range(args.iterations):
        chunk = rl_prompts[(it * n) % len(rl_prompts) :][:n]
        ids, mask = demo.left_pad(chunk)
        m = algo.learn(algo.generate_experience(ids, mask, [meta for _, meta in chunk]))
        history.append({k: round(m[k], 4) for k in ("reward_mean", "env_turns_mean", "gen_logprob_gap_max")})
    return history, actor


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    """One whole run: SFT, greedy evaluation, GRPO, greedy evaluation; wall and CPU seconds of each part."""
    from rlhf_algos.environments import EpisodeBudget
    from rlhf_hybrid import EngineConfig, HybridEngine
    from rlhf_hybrid.testing import world_of_one
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    random.seed(seed)
    t_start, c_start = time.time(), time.process_time()
    demo = _Demo(args, seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(demo.tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=128, pad_token_id=demo.pad, eos_token_id=demo.eos, bos_token_id=None,
        tie_word_embeddings=False))
    out: dict = {"seed": seed}
    budget = EpisodeBudget(max_turns=2, max_turn_tokens=args.max_turn_tokens, max_total_tokens=60)
    with world_of_one():
        steps = args.sft_epochs * -(-len(demo.examples) // args.sft_batch)
        actor = HybridEngine(model, EngineConfig(zero_stage=0, lr=args.sft_lr, micro_batch_size=args.sft_batch,
                                                 warmup_steps=args.sft_warmup,
                                                 decay_steps=steps if args.sft_cosine else 0, generation="fast"))
        t0 = time.time()
        out["sft_final_loss"] = _sft(demo, actor, args)
        out["sft_s"] = round(time.time() - t0, 1)
        out["before"] = _evaluate(demo, actor, budget)
        t0 = time.time()
        out["rl_history"], actor = _grpo(demo, actor.module, args, budget, seed)
        out["rl_s"] = round(time.time() - t0, 1)
        out["after"] = _evaluate(demo, actor, budget)
    out["lift"] = round(out["after"]["verifier_score"] - out["before"]["verifier_score"], 4)
    out["total_wall_s"] = round(time.time() - t_start, 1)
    out["total_cpu_s"] = round(time.process_time() - c_start, 1)
    return out


def main() -> None:
    args = _args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = []
    for seed in seeds:
        r = run_seed(args, seed)
        runs.append(r)
        print(json.dumps(r, indent=1), flush=True)
    keys = ("verifier_score", "tool_call_rate", "copy_error_rate")
    summary = {
        "args": vars(args),
        "per_seed": [{"seed": r["seed"], "lift": r["lift"], "total_wall_s": r["total_wall_s"],
                      "total_cpu_s": r["total_cpu_s"], "sft_s": r["sft_s"], "rl_s": r["rl_s"],
                      **{f"{k}_{when}": round(r[when][k], 3) for when in ("before", "after") for k in keys}}
                     for r in runs],
        "lift": {"mean": round(sum(r["lift"] for r in runs) / len(runs), 4),
                 "min": min(r["lift"] for r in runs), "max": max(r["lift"] for r in runs)},
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
