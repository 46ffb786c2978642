#!/usr/bin/env python3
r"""Tool-use learning check: SFT on imperfect calculator demonstrations, then GRPO against the calculator.

Not part of the test suite (it trains for real). From Python (no `rlhf run` wiring yet): the tool
demo's task (rlhf_data.tool_demo), a tiny Llama, the demo's in-process tokenizer, SFT on the
demonstrations laid out as trajectories (tool turns out of the loss), then GRPO with
``rlhf_algos.multiturn.EnvRollout`` on ``rlhf_algos.calculator.CalculatorEnv``. Held-out greedy
episodes are scored before RL (the SFT model) and after: verifier score, tool-call rate and
copy-error rate (rlhf_data.tool_demo.tool_use_stats). Prints one JSON object.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python benchmarks/tool_demo.py --seed 1 --sft-epochs 6 --iterations 20
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--num-sft", type=int, default=3000)
    ap.add_argument("--num-eval", type=int, default=100)
    ap.add_argument("--sft-epochs", type=int, default=6)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--prompts-per-iteration", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--rl-lr", type=float, default=3e-4)
    ap.add_argument("--temperature", type=float, default=1.0, help="GRPO's sampling temperature")
    args = ap.parse_args()

    from rlhf_algos import GRPO, SFT, GRPOConfig
    from rlhf_algos.calculator import CalculatorEnv
    from rlhf_algos.environments import EpisodeBudget
    from rlhf_algos.multiturn import EnvRollout
    from rlhf_algos.sft import SFTConfig
    from rlhf_algos.trajectories import make_session, run_episodes
    from rlhf_data import train_demo_tokenizer
    from rlhf_data.tool_demo import ToolAdditionTask, ToolTaskConfig, demonstration_example, tool_use_stats
    from rlhf_hybrid import EngineConfig, HybridEngine
    from rlhf_hybrid.testing import world_of_one
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    task = ToolAdditionTask(ToolTaskConfig(num_sft=args.num_sft, num_rl=2000, num_eval=args.num_eval, seed=args.seed))
    demos = task.demonstrations()
    fmt = "Human: {}\n\nAssistant: ".format
    tok = train_demo_tokenizer([fmt(q) + "".join(t for _, t in turns) for q, turns, _ in demos])
    pad, eos = tok.pad_token_id, tok.eos_token_id
    encode = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    examples = [demonstration_example(encode, encode(fmt(q)), turns, eos) for q, turns, _ in demos]

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=pad, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False))
    out: dict = {"seed": args.seed, "args": vars(args)}
    with world_of_one():
        actor = HybridEngine(model, EngineConfig(zero_stage=0, lr=args.sft_lr, micro_batch_size=32,
                                                 generation="fast"))
        # 1. SFT on the demonstrations (labels on the model's turns only)
        t0 = time.time()
        sft = SFT(SFTConfig(), policy=actor)
        for _ in range(args.sft_epochs):
            random.shuffle(examples)
            for i in range(0, len(examples), 32):
                b = examples[i : i + 32]
                width = max(len(e["input_ids"]) for e in b)
                ids = torch.tensor([e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in b])
                labels = torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in b])
                loss = sft.learn({"input_ids": ids, "attention_mask": (ids != pad).long(), "labels": labels})["loss"]
        out["sft_final_loss"], out["sft_s"] = loss, time.time() - t0

        budget = EpisodeBudget(max_turns=2, max_turn_tokens=20, max_total_tokens=60)

        def left_pad(prompts):
            enc = [encode(fmt(q)) for q, _ in prompts]
            width = max(map(len, enc))
            ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
            return ids, (ids != pad).long()

        def evaluate() -> dict:
            prompts = task.prompts("eval")
            ids, mask = left_pad(prompts)
            actor.eval()
            session = make_session(actor, ids, mask, max_total_tokens=budget.max_total_tokens, eos_token_id=eos,
                                   pad_token_id=pad, do_sample=False)
            batch = run_episodes(session, [CalculatorEnv() for _ in prompts], [m for _, m in prompts], budget=budget,
                                 decode=decode, encode=encode, prompt_ids=ids, prompt_mask=mask, pad_token_id=pad)
            stats = tool_use_stats(batch.final_info)
            P = batch.prompt_len
            stats["samples"] = [decode(batch.sequences[i, P:][batch.attention_mask[i, P:].bool()].tolist())
                                + f"  (want {m['a'] + m['b']})" for i, (_, m) in enumerate(prompts[:3])]
            return stats

        out["before"] = evaluate()
        # 2. GRPO against the calculator, from the SFT weights with a fresh optimizer
        sft_module = actor.module
        actor = HybridEngine(copy.deepcopy(sft_module), EngineConfig(zero_stage=0, lr=args.rl_lr, micro_batch_size=32,
                                                                     generation="fast"))
        reference = HybridEngine(copy.deepcopy(sft_module), EngineConfig(zero_stage=0, generation="fast"),
                                 trainable=False)
        algo = GRPO(GRPOConfig(samples_per_prompt=4, micro_batch_size=32, max_new_tokens=20, kl_coef=0.0,
                               temperature=args.temperature),
                    actor=actor, reference=reference, reward_fn=None, eos_token_id=eos, pad_token_id=pad,
                    seed=args.seed)
        algo.env_rollout = EnvRollout(CalculatorEnv, budget, decode=decode, encode=encode, vocab_size=len(tok))
        rl_prompts, t0, history = task.prompts("rl"), time.time(), []
        for it in range(args.iterations):
            chunk = rl_prompts[it * args.prompts_per_iteration : (it + 1) * args.prompts_per_iteration]
            ids, mask = left_pad(chunk)
            exp = algo.generate_experience(ids, mask, [m for _, m in chunk])
            m = algo.learn(exp)
            history.append({k: round(m[k], 4) for k in ("reward_mean", "env_turns_mean", "gen_logprob_gap_max")})
        out["rl_s"], out["rl_history"] = time.time() - t0, history
        out["after"] = evaluate()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
