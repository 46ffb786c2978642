"""Time one DeepSpeed training step of the demo model (CPU), e.g. to compare thread counts.

    OMP_NUM_THREADS=1 python benchmarks/bench_train_step.py
    python benchmarks/bench_train_step.py            # torch's default: one thread per core

Prints the mean seconds per step over ``--steps`` steps after ``--warmup`` steps, with the
thread count and versions. Not part of the test run.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rlhf_hybrid import EngineConfig, HybridEngine, init_distributed, tiny_llama_config
    from transformers import LlamaForCausalLM

    init_distributed()
    torch.manual_seed(0)
    engine = HybridEngine(LlamaForCausalLM(tiny_llama_config(320, hidden_size=256, intermediate_size=1024)),
                          EngineConfig(lr=1e-3, micro_batch_size=args.batch))
    x = torch.randint(0, 320, (args.batch, args.tokens))
    mask = torch.ones_like(x)

    def step() -> None:
        loss = -engine.token_logprobs(x, mask, 1).mean()
        engine.backward(loss)
        engine.step()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    per_step = (time.perf_counter() - t0) / args.steps
    print(f"threads={torch.get_num_threads()} batch={args.batch}x{args.tokens} step_s={per_step:.4f} "
          f"python={platform.python_version()} torch={torch.__version__}")


if __name__ == "__main__":
    main()
