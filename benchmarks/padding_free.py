"""Training tokens/s of padding-free micro-batches against padded ones, on the demo data (CPU).

    OMP_NUM_THREADS=1 python benchmarks/padding_free.py                 # 8 timed steps per layout
    OMP_NUM_THREADS=1 python benchmarks/padding_free.py --steps 4 --attn eager
    OMP_NUM_THREADS=1 python benchmarks/padding_free.py --data ragged       # lengths 8-128 tokens
    OMP_NUM_THREADS=1 python benchmarks/padding_free.py --stages rl         # the RL learn step only

Issue 15, part 2. The SFT and reward-model stages' ``learn`` (forward, backward, optimizer step of
the demo's tiny Llama in a HybridEngine, ZeRO-0, fp32) on the demo task's SFT samples and preference
pairs, micro-batches of the demo's sizes (sft.batch_size, rm.batch_size), and the RL learn step
(``rl``: PPO's ``train_step`` on one micro-batch of rl.micro_batch_size rollout rows: the actor's
log-probs and entropy, policy loss, actor step, the critic's values, value loss, critic step; the
rows are left-padded prompts + right-padded responses, made from the SFT samples: prompt, then the
answer + EOS cut to rl.max_new_tokens, as a policy after SFT answers; old log-probs, values,
advantages and returns drawn at random), in three layouts of the same samples:

* ``padded``: today's right-padded rows (``collate_sft``, ``collate_pairs``), the baseline;
* ``one row``: the micro-batch packed into one row (``batch_layout="one_row"``, flash attention's layout);
* ``rows <= longest``: packed first-fit into rows no longer than the micro-batch's longest sequence
  (``batch_layout="rows"``, what ``sft.padding_free`` / ``rm.padding_free`` / ``rl.padding_free`` pick
  for sdpa and eager).

Each layout has its own engine over a copy of the same seeded model; every round runs one step of
each layout on the same micro-batch, in turn, so that load on the machine hits them alike. Reported
per layout: the median seconds per step, real (non-pad) tokens per second and the share of token
slots that are padding, and the ratio to the padded baseline of the same run. Writes
runs/padding-free.json (machine, versions, git SHA, command, rows) and prints a markdown table.
Not part of the test run; the results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("padded", "one row", "rows <= longest")


def _data(seed: int):
    """The demo's tokenizer, model and tokenized SFT samples / preference pairs, as ``rlhf run`` makes them."""
    import torch
    from rlhf_cli.config import load_config
    from rlhf_cli.context import Context, load_data, tokenized
    from rlhf_cli.data_report import tiny_vocab_size
    from rlhf_cli.report import Reporter
    from rlhf_data import train_demo_tokenizer
    from rlhf_hybrid import tiny_llama_config
    from transformers import LlamaForCausalLM

    cfg = load_config(None, [f"seed={seed}", "data.cache=false", "out=runs/padding-free-data"])
    ctx = Context(cfg, Reporter(enabled=False))
    data = load_data(ctx)
    tok = train_demo_tokenizer(data.corpus, vocab_size=tiny_vocab_size(cfg))
    m = cfg.model
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=m.hidden_size, num_layers=m.num_layers,
                                               num_heads=m.num_heads, intermediate_size=m.intermediate_size,
                                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    sft = tokenized(ctx, tok, data.sft, "sft", "sft", {})
    rm = tokenized(ctx, tok, data.rm, "rm", "rm", {})
    return cfg, tok, model, sft, rm


def _ragged(vocab: int, seed: int, n_sft: int, n_rm: int) -> tuple[list[dict], list[dict]]:
    """Random-token samples whose lengths are log-uniform in [8, 128] (chat data is this ragged; the demo's
    addition questions are not), the prompt half of each SFT sample; the same counts as the demo's."""
    import math

    rng = random.Random(seed)

    def seq() -> list[int]:
        n = int(round(math.exp(rng.uniform(math.log(8), math.log(128)))))
        return [rng.randrange(3, vocab) for _ in range(n)]

    sft = [{"input_ids": s, "prompt_len": len(s) // 2} for s in (seq() for _ in range(n_sft))]
    rm = [{"chosen_ids": seq(), "rejected_ids": seq(), "prompt_len": 1} for _ in range(n_rm)]
    return sft, rm


def _collate(stage: str, layout: str, chunk: list[dict], pad: int) -> dict:
    from rlhf_data import (
        collate_pairs,
        collate_pairs_padding_free,
        collate_sft,
        collate_sft_padding_free,
    )

    if stage == "sft":
        if layout == "padded":
            return collate_sft(chunk, pad)
        return collate_sft_padding_free(chunk, pad, layout="one_row" if layout == "one row" else "rows")
    if layout == "padded":
        return collate_pairs(chunk, pad)
    return collate_pairs_padding_free(chunk, pad, layout="one_row" if layout == "one row" else "rows")


def _batch_layout(layout: str) -> str:
    return {"padded": "padded", "one row": "one_row", "rows <= longest": "rows"}[layout]


def _rollout(chunk: list[dict], pad: int, eos: int, max_new_tokens: int, seed: int):
    """An ``rlhf_algos.Experience`` of ``chunk``'s SFT samples as a rollout: the prompt left-padded, the answer
    (its EOS included) cut to ``max_new_tokens`` and right-padded; old log-probs, values, advantages and
    returns drawn at random (0 on padding), as the rollout leaves them."""
    import torch
    from rlhf_algos import Experience, response_mask_from
    from rlhf_data import collate_prompts

    prompts = collate_prompts([{"input_ids": e["input_ids"][: e["prompt_len"]]} for e in chunk], pad)
    answers = [e["input_ids"][e["prompt_len"] :][:max_new_tokens] for e in chunk]
    resp = torch.full((len(chunk), max(map(len, answers))), pad)
    for i, a in enumerate(answers):
        resp[i, : len(a)] = torch.tensor(a)
    P = prompts["input_ids"].shape[1]
    seqs = torch.cat([prompts["input_ids"], resp], 1)
    mask = response_mask_from(seqs, P, eos) * (resp != pad).float()  # (n, R): up to the EOS or the cut
    g = torch.Generator().manual_seed(seed)

    def drawn(shift: float = 0.0) -> torch.Tensor:
        return (shift + torch.randn(mask.shape, generator=g)) * mask

    n = len(chunk)
    return Experience(prompt_ids=prompts["input_ids"], prompt_mask=prompts["attention_mask"], meta=[{}] * n,
                      sequences=seqs, attention_mask=torch.cat([prompts["attention_mask"], mask.long()], 1),
                      prompt_len=P, response_mask=mask, logprobs=drawn(-3.0), ref_logprobs=drawn(-3.0),
                      values=drawn(), scores=torch.zeros(n), train_scores=torch.zeros(n), advantages=drawn(),
                      returns=drawn())


def _learner(stage: str, layout: str, model, lr: float, batch: int, pad: int, eos: int, max_new_tokens: int):
    """``step(chunk, k) -> (the timed step, the token slots its forwards run on)`` of one layout's own engines."""
    from rlhf_algos import PPO, RM, SFT, PPOConfig, RMConfig, SFTConfig
    from rlhf_data import pack_padded_batch
    from rlhf_hybrid import EngineConfig, HybridEngine, ValueModel

    engine_cfg = EngineConfig(lr=lr, micro_batch_size=batch)
    if stage == "rl":
        actor = HybridEngine(copy.deepcopy(model), engine_cfg)
        critic = HybridEngine(ValueModel(copy.deepcopy(model)), engine_cfg)
        ppo = PPO(PPOConfig(batch_layout=_batch_layout(layout), micro_batch_size=batch, max_new_tokens=max_new_tokens),
                  actor=actor, reference=actor, critic=critic, reward_fn=None, eos_token_id=eos, pad_token_id=pad)

        def rl_step(chunk: list[dict], k: int):
            exp = _rollout(chunk, pad, eos, max_new_tokens, k)
            if layout == "padded":
                slots = exp.sequences.numel()
            else:
                slots = pack_padded_batch(exp.sequences, exp.attention_mask, pad, _batch_layout(layout))["input_ids"].numel()
            return (lambda: ppo.train_step(exp)), slots, int(exp.attention_mask.sum())

        return rl_step
    # learn() reads the layout from the batch (position_ids / last_index); batch_layout only picks the collator
    if stage == "sft":
        algo = SFT(SFTConfig(batch_layout="padded" if layout == "padded" else "rows"),
                   policy=HybridEngine(copy.deepcopy(model), engine_cfg))
    else:
        algo = RM(RMConfig(batch_layout="padded" if layout == "padded" else "rows"),
                  model=HybridEngine(ValueModel(copy.deepcopy(model)), engine_cfg))

    def step(chunk: list[dict], k: int):
        b = _collate(stage, layout, chunk, pad)
        return (lambda: algo.learn(b)), b["input_ids"].numel(), _real_tokens(stage, chunk)

    return step


def _real_tokens(stage: str, chunk: list[dict]) -> int:
    if stage == "sft":
        return sum(len(e["input_ids"]) for e in chunk)
    return sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in chunk)


def run_stage(stage: str, model, items: list[dict], pad: int, batch: int, lr: float, steps: int, warmup: int,
              seed: int, eos: int = -1, max_new_tokens: int = 0) -> list[dict]:
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    chunks = [[items[i] for i in order[k * batch : (k + 1) * batch]] for k in range(warmup + steps)]
    learners = {layout: _learner(stage, layout, model, lr, batch, pad, eos, max_new_tokens) for layout in LAYOUTS}
    times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    slots: dict[str, int] = dict.fromkeys(LAYOUTS, 0)
    real = 0
    for k, chunk in enumerate(chunks):
        for layout in LAYOUTS:
            run, n_slots, n_real = learners[layout](chunk, k)  # collation / rollout building: not timed
            t0 = time.perf_counter()
            run()
            if k >= warmup:
                times[layout].append(time.perf_counter() - t0)
                slots[layout] += n_slots
        if k >= warmup:
            real += n_real
    rows = []
    for layout in LAYOUTS:
        step_s = statistics.median(times[layout])
        rows.append({"stage": stage, "layout": layout, "step_s": step_s, "real_tokens_per_step": real / steps,
                     "tokens_per_s": real / steps / step_s, "pad_share": 1 - real / slots[layout]})
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["vs_padded"] = r["tokens_per_s"] / base
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="timed steps per layout and stage")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--data", default="demo", choices=["demo", "ragged"],
                    help="demo: the demo task's samples; ragged: random tokens, lengths log-uniform in [8, 128]")
    ap.add_argument("--stages", default="sft,rm,rl", help="comma-separated, of sft, rm, rl (the RL learn step)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "padding-free.json"))
    args = ap.parse_args()
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29547", "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(k, v)
    import torch
    from rlhf_hybrid import bench, init_distributed

    init_distributed()
    cfg, tok, model, sft, rm = _data(args.seed)
    if args.data == "ragged":
        sft, rm = _ragged(len(tok), args.seed, len(sft), len(rm))
    model.set_attn_implementation(args.attn)
    stages = args.stages.split(",")
    if not set(stages) <= {"sft", "rm", "rl"}:
        ap.error(f"--stages: {args.stages!r}; allowed: a comma-separated list of sft, rm, rl")
    rows = []
    if "sft" in stages:
        rows += run_stage("sft", model, sft, tok.pad_token_id, cfg.sft.batch_size, cfg.sft.lr, args.steps,
                          args.warmup, args.seed)
    if "rm" in stages:
        rows += run_stage("rm", model, rm, tok.pad_token_id, cfg.rm.batch_size, cfg.rm.lr, args.steps, args.warmup,
                          args.seed)
    if "rl" in stages:  # ragged data: responses up to 64 tokens (the demo's answers fit in rl.max_new_tokens = 8)
        rows += run_stage("rl", model, sft, tok.pad_token_id, cfg.rl.micro_batch_size, cfg.rl.actor_lr, args.steps,
                          args.warmup, args.seed, eos=tok.eos_token_id,
                          max_new_tokens=cfg.rl.max_new_tokens if args.data == "demo" else 64)
    report = {"device": bench._device_name(torch.device("cpu")), "attn": args.attn, "data": args.data, "versions": bench._versions(),
              "git_sha": bench._git_sha(), "command": " ".join(["python", *sys.argv]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{report['device']}, attention {args.attn}, data {args.data}, git {report['git_sha']}")
    print("| stage | layout | pad share of token slots | s/step (median) | real tokens/s | vs padded |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['layout']} | {r['pad_share']:.1%} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['vs_padded']:.2f}x |")


if __name__ == "__main__":
    main()
