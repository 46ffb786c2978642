"""Peak resident memory per rank of loading four models and one PPO iteration under ZeRO-3, 2 ranks (CPU, gloo).

    OMP_NUM_THREADS=1 python benchmarks/zero3_memory.py --hidden 512 --layers 8 --intermediate 1536   # 35M params
    OMP_NUM_THREADS=1 python benchmarks/zero3_memory.py --hidden 1536 --layers 14 --intermediate 4096 \\
        --heads 16 --vocab 32000 --load-only                                          # 495M params, loading only

Issue 15 ("memory"). The actor, the reference, the critic and the reward model are all Llama-architecture
models of one shape built from a config (random weights; the critic and reward model are
``ValueModel``s of it), wrapped in ZeRO-3 ``HybridEngine``s; then one PPO iteration (rlhf-algos'
``PPO``: generate, actor/reference log-probs, values and rewards, one actor and one critic step). Each
mode runs as its own pair of fresh processes:

* ``whole``: today's loading: every rank builds every model whole in fp32, and the engine partitions it;
* ``partitioned``: ``rlhf_hybrid.zero_init``: every model is built partitioned from the first byte;
* ``partitioned+offload``: as ``partitioned``, the reference and reward models with ZeRO-3 parameter
  offload (``offload_param``, device cpu);
* ``partitioned+offload-all``: also the actor and critic with parameter and optimizer offload.

Per rank: the peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``, the process's high-water mark, so the
iteration's peak includes loading's) after loading and after the iteration, the RSS just before loading
(imports, process group), against the full fp32 size of one model (4 bytes x parameters). On a CPU-only
machine the offload device is where the partitions already are: offload changes nothing there but the
DeepSpeed code path; its saving is GPU memory, which this script does not measure (``--device cuda`` is
not supported here: untested, no GPU).

Writes ``--out`` (default runs/zero3-memory.json: machine, versions, git SHA, command, rows) and prints a
markdown table. Not part of the test run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from rlhf_hybrid.distributed import free_port

MODES = ("whole", "partitioned", "partitioned+offload", "partitioned+offload-all")
MODELS = ("actor", "reference", "critic", "reward")
PAD = 0


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _config(a):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                       num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.heads,
                       max_position_embeddings=max(128, a.prompt_len + a.new_tokens), tie_word_embeddings=False,
                       pad_token_id=PAD, eos_token_id=None, bos_token_id=None)


def _engines(a, mode: str, phases: list):
    """actor, reference, critic, reward: built as ``mode`` says, each wrapped in its ZeRO-3 engine; appends
    ``(what, RSS MiB, peak RSS MiB)`` to ``phases`` after each build and each engine."""
    from rlhf_hybrid import EngineConfig, HybridEngine
    from rlhf_hybrid.zero_init import build_causal_lm, build_value_model

    partition = mode != "whole"
    offload_frozen = mode.startswith("partitioned+offload")
    offload_all = mode == "partitioned+offload-all"
    train = EngineConfig(zero_stage=3, micro_batch_size=a.batch, lr=1e-6, offload_param=offload_all,
                         offload_optimizer=offload_all)
    frozen = EngineConfig(zero_stage=3, micro_batch_size=a.batch, offload_param=offload_frozen)
    config = _config(a)
    engines = []
    for name, build, cfg, trainable in (("actor", build_causal_lm, train, True),
                                        ("reference", build_causal_lm, frozen, False),
                                        ("critic", build_value_model, train, True),
                                        ("reward", build_value_model, frozen, False)):
        if name not in a.models.split(","):
            continue
        model = build(config, cfg, trainable=trainable, seed=len(engines), partition=partition)
        phases.append((f"{name} built", _rss_mib(), _maxrss_mib()))
        engines.append(HybridEngine(model, cfg, trainable=trainable, name=name))
        del model
        phases.append((f"{name} engine", _rss_mib(), _maxrss_mib()))
    return engines


def _worker(rank: int, world: int, port: int, mode: str, a, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from rlhf_algos import PPO, ModelReward, PPOConfig
    from rlhf_hybrid import init_distributed
    from rlhf_hybrid.engine import _import_deepspeed

    init_distributed()
    _import_deepspeed()
    before = _rss_mib()
    t0 = time.perf_counter()
    phases: list = []
    engines = _engines(a, mode, phases)
    load_s = time.perf_counter() - t0
    load_peak, after_load = _maxrss_mib(), _rss_mib()
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engines[0].module.parameters())
    t0 = time.perf_counter()
    if not a.load_only:
        actor, reference, critic, reward = engines
        algo = PPO(PPOConfig(max_new_tokens=a.new_tokens, micro_batch_size=a.batch), actor=actor,
                   reference=reference, critic=critic, reward_fn=ModelReward(reward), eos_token_id=None,
                   pad_token_id=PAD)
        g = torch.Generator().manual_seed(rank)
        prompts = torch.randint(1, a.vocab, (a.batch, a.prompt_len), generator=g)
        algo.learn(algo.generate_experience(prompts, torch.ones_like(prompts)))
    iter_s = time.perf_counter() - t0 if not a.load_only else float("nan")
    row = {"mode": mode, "rank": rank, "params_per_model": params, "fp32_model_mib": params * 4 / 2**20,
           "rss_before_load_mib": before, "peak_load_mib": load_peak, "rss_after_load_mib": after_load,
           "peak_iteration_mib": _maxrss_mib(), "load_s": load_s, "iteration_s": iter_s, "phases": phases}
    Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(row))
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()




def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--batch", type=int, default=2, help="prompts per rank (also the micro-batch)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--out", default="runs/zero3-memory.json")
    p.add_argument("--load-only", action="store_true", help="build the four engines, skip the PPO iteration "
                                                            "(its optimizer state is the bulk of the memory)")
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated, of actor, reference, critic, reward (in that order); fewer than all "
                        "four needs --load-only; `--models actor` measures the actor's build alone")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one mode's two ranks
    p.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    bad = [m for m in a.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"--modes: {', '.join(bad)} not allowed; allowed: {', '.join(MODES)}")
    bad = [m for m in a.models.split(",") if m not in MODELS]
    if bad or not a.models:
        p.error(f"--models: {a.models!r} not allowed; allowed: a comma-separated subset of {', '.join(MODELS)}")
    if set(a.models.split(",")) != set(MODELS) and not a.load_only:
        p.error(f"--models {a.models}: the PPO iteration needs all four models; add --load-only")
    return a


def _table(rows: list[dict]) -> str:
    lines = ["| mode | rank | params/model | fp32 model MiB | RSS before load MiB | actor built: peak + MiB | "
             "peak load MiB | peak iteration MiB | load s | iteration s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        actor = r["phases"][0][2] - r["rss_before_load_mib"]  # the peak RSS once the actor is built, over the start
        lines.append(f"| {r['mode']} | {r['rank']} | {r['params_per_model'] / 1e6:.1f}M | {r['fp32_model_mib']:.0f} | "
                     f"{r['rss_before_load_mib']:.0f} | {actor:.0f} | {r['peak_load_mib']:.0f} | "
                     f"{r['peak_iteration_mib']:.0f} | {r['load_s']:.1f} | {r['iteration_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import tempfile

    a = _args(argv)
    if a.worker:
        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(2, free_port(), a.worker, a, a.tmp), nprocs=2, join=True)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in a.modes.split(","):  # each mode in fresh processes: ru_maxrss is a process's high-water mark
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", mode,
                            "--tmp", tmp], env=env, check=True)
            rows += [json.loads(Path(tmp, f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]
    from rlhf_hybrid import bench

    report = {"machine": bench._device_name(__import__("torch").device("cpu")), "versions": bench._versions(),
              "git_sha": bench._git_sha(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
