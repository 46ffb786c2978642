"""``rlhf bench ppo``: full PPO iterations, our generate mode against the baseline in one run.

The baseline is what DeepSpeed-Chat does without its hybrid engine: transformers ``generate`` on
the (gathered) actor, DeepSpeed ZeRO training (``rl.generation=hf``). The hybrid run differs only
in generation (``rl.generation=fast``). Both use the same random weights of the chosen shapes
(actor, reference; critic and reward model), prompts and settings; EOS is disabled so every answer
has ``new_tokens`` tokens. Reported: samples/s and the per-iteration phase breakdown (gather,
generate, everything else of the rollout, train).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class PPORow:
    mode: str
    samples_per_s: float
    iteration_s: float
    gather_s: float
    generate_s: float
    score_s: float
    train_s: float
    peak_mem_gib: float | None = None
    speedup_vs_baseline: float | None = None


@dataclass
class PPOReport:
    device: str
    dtype: str
    actor_shape: str
    critic_shape: str
    batch: int
    prompt_len: int
    new_tokens: int
    iterations: int
    zero_stage: int
    versions: dict
    git_sha: str
    command: str
    rows: list[PPORow] = field(default_factory=list)


def run(actor_shape: str, critic_shape: str, batch: int, prompt_len: int, new_tokens: int, iterations: int,
        zero_stage: int, dtype: torch.dtype, device: torch.device, command: str = "") -> PPOReport:
    from rlhf_algos import PPO, ModelReward, PPOConfig
    from rlhf_hybrid import EngineConfig, HybridEngine, ValueModel, bench, init_distributed

    init_distributed()
    report = PPOReport(bench._device_name(device), str(dtype).replace("torch.", ""), actor_shape, critic_shape, batch,
                       prompt_len, new_tokens, iterations, zero_stage, bench._versions(), bench._git_sha(), command)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    for mode, generation in (("baseline (hf generate)", "hf"), ("hybrid (fast generate)", "fast")):
        def cfg(lr: float, gen: str = generation) -> EngineConfig:
            return EngineConfig(zero_stage=zero_stage, dtype=name, lr=lr, micro_batch_size=batch, generation=gen)

        actor = HybridEngine(bench.build_model(actor_shape, dtype, device), cfg(1e-6))
        reference = HybridEngine(bench.build_model(actor_shape, dtype, device), cfg(1e-6, "hf"), trainable=False)
        critic = HybridEngine(ValueModel(bench.build_model(critic_shape, dtype, device)), cfg(5e-6, "hf"))
        reward = HybridEngine(ValueModel(bench.build_model(critic_shape, dtype, device)), cfg(5e-6, "hf"),
                              trainable=False)
        algo = PPO(PPOConfig(max_new_tokens=new_tokens, micro_batch_size=batch), actor=actor, reference=reference,
                   critic=critic, reward_fn=ModelReward(reward), eos_token_id=None, pad_token_id=0)
        g = torch.Generator().manual_seed(0)
        vocab = actor.module.config.vocab_size
        prompts = torch.randint(3, vocab, (batch, prompt_len), generator=g)
        mask = torch.ones_like(prompts)
        algo.learn(algo.generate_experience(prompts, mask))  # warm-up
        totals = {"gather_s": 0.0, "generate_s": 0.0, "rollout_s": 0.0}
        train0 = actor.timings["train_s"] + critic.timings["train_s"]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for _ in range(iterations):
            r0 = time.perf_counter()
            exp = algo.generate_experience(prompts, mask)
            totals["rollout_s"] += time.perf_counter() - r0
            totals["gather_s"] += actor.timings["gather_s"]
            totals["generate_s"] += actor.timings["generate_s"]
            algo.learn(exp)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        train = actor.timings["train_s"] + critic.timings["train_s"] - train0
        n = iterations
        row = PPORow(mode, batch * n / wall, wall / n, totals["gather_s"] / n, totals["generate_s"] / n,
                     (totals["rollout_s"] - totals["gather_s"] - totals["generate_s"]) / n, train / n,
                     torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        report.rows.append(row)
        del actor, reference, critic, reward, algo
    base = report.rows[0].samples_per_s
    for r in report.rows:
        r.speedup_vs_baseline = r.samples_per_s / base
    return report


def to_json(report: PPOReport) -> str:
    import json

    return json.dumps(asdict(report), indent=2)
