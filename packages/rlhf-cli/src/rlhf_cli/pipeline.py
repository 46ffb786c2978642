"""The three-stage pipeline: SFT -> reward model -> PPO, composed from the other packages.

Each stage reads the previous stage's output directory, so stages can be run one at a time
(``rlhf run --stage rm`` after ``--stage sft``) or together (``--stage all``).
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rlhf_algos import TextReward

from .config import RunConfig
from .report import Reporter

log = logging.getLogger(__name__)

STAGES = ("sft", "rm", "ppo")


class PipelineError(RuntimeError):
    """A problem with the run's inputs or outputs (missing previous stage, bad model, ...)."""


@dataclass
class Context:
    cfg: RunConfig
    reporter: Reporter
    rank: int = 0
    world_size: int = 1
    summary: dict = field(default_factory=dict)
    data: object = None  # rlhf_data.StageData, loaded once per process by _data()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------
def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _data(ctx: Context):
    """The run's per-stage datasets (``rlhf_data.StageData``), loaded once; every rank loads the
    same (the spec, split and blend are seeded)."""
    if ctx.data is None:
        import json

        from .data_report import load_stage_data

        ctx.data = load_stage_data(ctx.cfg)
        report = ctx.data.report_dict()
        if ctx.is_main:
            from rlhf_hybrid import write_json_atomic

            ctx.out.mkdir(parents=True, exist_ok=True)
            write_json_atomic(ctx.out / "data_report.json", report)
            for r in report["sources"]:
                dropped = sum(r["dropped"].values())
                ctx.reporter.print(f"data: {r['label']} ({r['format']}): sft {r['used']['sft']}, rm {r['used']['rm']}, "
                                   f"rl {r['used']['rl']} samples" + (f"; {dropped} rows dropped "
                                   f"({json.dumps(r['dropped'])})" if dropped else ""))
    return ctx.data


def _tokenized(ctx: Context, tokenizer, records: list, stage: str, what: str, stats: dict) -> list[dict]:
    """Tokenize ``records`` for ``stage`` (cached by content), record the length-limit counts in
    ``stats[what]`` and say when samples were truncated or dropped."""
    from rlhf_data import default_cache_dir, tokenize_records

    from .data_report import tokenize_config

    d = ctx.cfg.data
    if not records:
        raise PipelineError(f"data: no {what} samples (data.sources={d.sources!r}, data.split={d.split!r}); "
                            f"`rlhf data inspect` shows what each source gives each stage")
    cache = (Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir()) if d.cache else None
    out = tokenize_records(tokenizer, records, stage, tokenize_config(ctx.cfg), cache_dir=cache)
    c = out.stats.counts()
    stats[what] = c | {"cache_hit": out.stats.cache_hit}
    cut = {k: v for k, v in c.items() if k.startswith(("truncated", "dropped")) and v}
    if cut:
        ctx.reporter.print(f"data: {what}: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in cut.items()) +
                           f" of {c['samples']} (data.max_prompt_len={d.max_prompt_len}, "
                           f"data.max_response_len={d.max_response_len}, data.truncation={d.truncation})")
    if not out.examples:
        raise PipelineError(f"data: every {what} sample was dropped by the length limits; raise data.max_prompt_len "
                            f"/ data.max_response_len or use data.truncation=truncate")
    return out.examples


def _engine_cfg(cfg: RunConfig, *, lr: float, batch: int, grad_accum: int = 1, warmup: int = 0, decay: int = 0,
                weight_decay: float = 0.0):
    from rlhf_hybrid import EngineConfig

    ds = cfg.deepspeed
    return EngineConfig(zero_stage=ds.zero_stage, dtype=ds.dtype, lr=lr, weight_decay=weight_decay, micro_batch_size=batch,
                        grad_accum=grad_accum, offload_optimizer=ds.offload_optimizer, warmup_steps=warmup,
                        decay_steps=decay, generation=cfg.rl.generation,
                        inference_tp_size=cfg.rl.inference_tp_size,
                        cuda_graphs=cfg.rl.cuda_graphs, keep_decode_cache=cfg.rl.keep_decode_cache,
                        gather_quantization=cfg.rl.gather_quantization)


def _lora(ctx: Context, model, stage: str):
    """Adapters on the policy trained in ``stage`` ("sft", "rl", "pref") when lora.rank > 0 and
    lora.stages names it, before the model is wrapped in its engine; returns ``model``.

    Only the adapters train. The stage's checkpoint is still a plain HF model (``save_pretrained``
    writes the fused weights), so the next stage loads it like any other.
    """
    lo = ctx.cfg.lora
    if not lo.applies_to(stage):
        return model
    from rlhf_hybrid.lora import DEFAULT_TARGETS, apply_lora
    from torch import nn

    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    targets = lo.target_list()
    # the default names several families' layers, each model has some of them; names given by hand must all match
    unmatched = [t for t in targets if t not in linear]
    if len(unmatched) == len(targets) or (unmatched and targets != DEFAULT_TARGETS):
        raise PipelineError(f"lora.targets: {', '.join(map(repr, unmatched))} match(es) no linear layer of "
                            f"{type(model).__name__}; its linear layers: {', '.join(linear)}")
    names = apply_lora(model, rank=lo.rank, alpha=lo.alpha, targets=targets)
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    ctx.reporter.print(f"{stage}: LoRA rank {lo.rank} (alpha {lo.alpha:g}) on {len(names)} layers "
                       f"({', '.join(t for t in targets if t in linear)}): {train:,} of {total:,} parameters train")
    return model


def _require_stage_output(ctx: Context, stage: str, needed_by: str) -> Path:
    d = ctx.stage_dir(stage)
    if not (d / "config.json").is_file():
        raise PipelineError(
            f"--stage {needed_by} needs the {stage} stage's output at {d} (no config.json there); "
            f"run `rlhf run --stage {stage}` first or use --stage all"
        )
    return d


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _steps_per_epoch(ctx: Context, n: int, batch: int, key: str, what: str) -> int:
    """Full batches of ``batch`` per rank in an epoch of ``n`` items (PipelineError naming ``key`` if none)."""
    steps = n // (batch * ctx.world_size)
    if steps == 0:
        raise PipelineError(f"{key}: {batch} x {ctx.world_size} rank(s) is more than the {n} {what}; lower it or "
                            f"add data")
    return steps


def _epoch_batches(ctx: Context, items: list, batch: int, steps: int, rng: random.Random):
    """One epoch of this rank's micro-batches: a shuffle shared by all ranks (same seed), each
    rank taking every ``world_size``-th item, ``steps`` full batches (the same count on every rank,
    which ZeRO-3's collective forward passes need)."""
    order = list(range(len(items)))
    rng.shuffle(order)
    mine = order[ctx.rank :: ctx.world_size]
    for i in range(steps):
        yield [items[j] for j in mine[i * batch : (i + 1) * batch]]


def _run_card(ctx: Context, stage: str, metrics: dict) -> str:
    import json
    import platform

    import rlhf_algos
    import rlhf_data
    import rlhf_hybrid
    import rlhf_kernels
    import transformers

    from . import __version__

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception:  # pragma: no cover
        ds_version = None
    card = {
        "stage": stage,
        "command": " ".join(sys.argv),
        "seed": ctx.cfg.seed,
        "world_size": ctx.world_size,
        "config": asdict(ctx.cfg),
        "metrics": metrics,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "deepspeed": ds_version,
            "rlhf-cli": __version__,
            "rlhf-data": rlhf_data.__version__,
            "rlhf-algos": rlhf_algos.__version__,
            "rlhf-hybrid": rlhf_hybrid.__version__,
            "rlhf-kernels": rlhf_kernels.__version__,
        },
    }
    return json.dumps(card, indent=2, default=str) + "\n"


def _save(ctx: Context, engine, stage: str, tokenizer, metrics: dict) -> None:
    """Write ``<out>/<stage>`` atomically: model, tokenizer, run card (collective under ZeRO-3)."""
    from rlhf_hybrid import save_hf_checkpoint

    state = engine.export_state_dict()
    if ctx.is_main:
        jsonl = ctx.out / f".{stage}.metrics.jsonl"
        extra = {"run_card.json": _run_card(ctx, stage, metrics)}
        if jsonl.exists():
            extra["metrics.jsonl"] = jsonl.read_text()
        save_hf_checkpoint(engine.module, state, str(ctx.stage_dir(stage)), tokenizer, extra_files=extra)
        jsonl.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# stage 1: SFT
# ----------------------------------------------------------------------------------------------
def _sft_eval_loss(engine, examples: list[dict], pad_id: int, mask_prompt: bool, batch: int = 64) -> float:
    from rlhf_algos.functional import sft_loss
    from rlhf_data import IGNORE_INDEX, collate_sft

    engine.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in _batches(examples, batch):
            b = collate_sft(chunk, pad_id, mask_prompt=mask_prompt)
            lp = engine.token_logprobs(b["input_ids"], b["attention_mask"], 1)
            mask = (b["labels"][:, 1:] != IGNORE_INDEX).float().to(lp.device)
            out = sft_loss(lp.float(), mask)
            total += out.loss.item() * out.num_tokens.item()
            count += out.num_tokens.item()
    engine.train()
    return total / max(count, 1)


def run_sft(ctx: Context) -> dict:
    from rlhf_algos.functional import sft_loss
    from rlhf_data import IGNORE_INDEX, collate_packed, collate_sft, pack_sft, train_demo_tokenizer
    from rlhf_hybrid import HybridEngine, load_causal_lm, load_tokenizer, tiny_llama_config

    cfg, s = ctx.cfg, ctx.cfg.sft
    _seed(cfg.seed)
    data = _data(ctx)
    if cfg.model.actor_model:
        tokenizer = load_tokenizer(cfg.model.actor_model)
        model = load_causal_lm(cfg.model.actor_model)
    else:
        from transformers import LlamaForCausalLM

        from .data_report import tiny_vocab_size

        m = cfg.model
        tokenizer = train_demo_tokenizer(data.corpus, vocab_size=tiny_vocab_size(cfg))
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), hidden_size=m.hidden_size, num_layers=m.num_layers,
                                                   num_heads=m.num_heads, intermediate_size=m.intermediate_size,
                                                   pad_token_id=tokenizer.pad_token_id,
                                                   eos_token_id=tokenizer.eos_token_id))
    if len(tokenizer) > model.config.vocab_size:
        raise PipelineError(f"model.actor_model: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                            f"{model.config.vocab_size}")
    data_stats: dict = {}
    train = _tokenized(ctx, tokenizer, data.sft, "sft", "sft", data_stats)
    evals = _tokenized(ctx, tokenizer, data.sft_eval, "sft", "sft held-out", data_stats)
    if s.packing:
        n = len(train)
        train = pack_sft(train, max(len(e["input_ids"]) for e in train) if train else 1)
        ctx.reporter.print(f"sft: packed {n} samples into {len(train)} rows")
    rng = random.Random(cfg.seed)
    steps_per_epoch = _steps_per_epoch(ctx, len(train), s.batch_size, "sft.batch_size",
                                       "SFT rows" if s.packing else "SFT samples")
    total = steps_per_epoch * s.epochs
    decay = total // s.grad_accum if s.lr_schedule == "cosine" else 0
    engine = HybridEngine(_lora(ctx, model, "sft"), _engine_cfg(cfg, lr=s.lr, batch=s.batch_size, grad_accum=s.grad_accum,
                                                                warmup=s.warmup_steps, decay=decay,
                                                                weight_decay=s.weight_decay))
    pad = tokenizer.pad_token_id
    loss_before = _sft_eval_loss(engine, evals, pad, s.mask_prompt)
    t0 = time.perf_counter()
    jsonl = ctx.out / ".sft.metrics.jsonl"
    step = 0
    with ctx.reporter.stage("sft", total, jsonl) as rep:
        rep.log({"stage": "sft", "step": 0, "eval_loss": loss_before})
        for epoch in range(s.epochs):
            for chunk in _epoch_batches(ctx, train, s.batch_size, steps_per_epoch, rng):
                if s.packing:  # no attention mask: the position ids keep attention inside each sample
                    b = collate_packed(chunk, pad, mask_prompt=s.mask_prompt)
                    lp = engine.token_logprobs(b["input_ids"], None, 1, position_ids=b["position_ids"])
                else:
                    b = collate_sft(chunk, pad, mask_prompt=s.mask_prompt)
                    lp = engine.token_logprobs(b["input_ids"], b["attention_mask"], 1)
                mask = (b["labels"][:, 1:] != IGNORE_INDEX).float().to(lp.device)
                loss = sft_loss(lp, mask).loss
                engine.backward(loss)
                engine.step()
                step += 1
                row = {"stage": "sft", "step": step, "epoch": epoch, "loss": loss.item()}
                rep.update(show={"epoch": epoch + 1, "loss": loss.item()}, log=row)
            eval_loss = _sft_eval_loss(engine, evals, pad, s.mask_prompt)
            rep.update(advance=0, show={"epoch": epoch + 1, "eval_loss": eval_loss},
                       log={"stage": "sft", "step": step, "epoch": epoch, "eval_loss": eval_loss})
    loss_after = _sft_eval_loss(engine, evals, pad, s.mask_prompt)
    wall = time.perf_counter() - t0
    metrics = {"eval_loss_before": loss_before, "eval_loss_after": loss_after, "train_steps": step,
               "data": data_stats}
    _save(ctx, engine, "sft", tokenizer, metrics)
    del engine
    return metrics | {"wall_seconds": wall}


# ----------------------------------------------------------------------------------------------
# stage 2: reward model
# ----------------------------------------------------------------------------------------------
def _rm_scores(engine, pairs: list[dict], pad_id: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    from rlhf_data import collate_pairs

    chosen, rejected = [], []
    engine.eval()
    with torch.no_grad():
        for chunk in _batches(pairs, batch):
            b = collate_pairs(chunk, pad_id)
            s = engine.score(b["input_ids"], b["attention_mask"]).cpu()
            chosen.append(s[: len(chunk)])
            rejected.append(s[len(chunk) :])
    engine.train()
    return torch.cat(chosen), torch.cat(rejected)


def _rm_accuracy(engine, pairs: list[dict], pad_id: int) -> dict:
    """Held-out accuracy; against the verifier's true labels where the data knows them (the demo
    marks its label-noise flips in ``meta["flipped"]``), else against the labels as given."""
    from rlhf_algos import pair_accuracy

    c, r = _rm_scores(engine, pairs, pad_id)
    flipped = torch.tensor([bool(p["meta"].get("flipped", False)) for p in pairs])
    # against the true labels a flipped pair's "rejected" answer is the right one
    true_c, true_r = torch.where(flipped, r, c), torch.where(flipped, c, r)
    # a tie counts half (pair_accuracy's default): an untrained (constant) reward model scores 0.5, not 0
    return {"accuracy": pair_accuracy(true_c, true_r).item(), "accuracy_noisy_labels": pair_accuracy(c, r).item(),
            "score_mean": torch.cat([c, r]).mean().item()}


def run_rm(ctx: Context) -> dict:
    from rlhf_algos.functional import pairwise_reward_loss
    from rlhf_data import collate_pairs
    from rlhf_hybrid import HybridEngine, ValueModel, load_tokenizer

    cfg, s = ctx.cfg, ctx.cfg.rm
    _seed(cfg.seed + 1)
    data = _data(ctx)
    sft_dir = _require_stage_output(ctx, "sft", "rm")
    tokenizer = load_tokenizer(str(sft_dir))
    base = cfg.model.reward_model or str(sft_dir)
    model = ValueModel.from_pretrained(base)
    if len(tokenizer) > model.config.vocab_size:
        raise PipelineError(f"model.reward_model: {base!r} has vocab_size {model.config.vocab_size} but the actor's "
                            f"tokenizer has {len(tokenizer)} tokens; the reward model must share the actor's tokenizer")
    data_stats: dict = {}
    train = _tokenized(ctx, tokenizer, data.rm, "rm", "rm", data_stats)
    heldout = _tokenized(ctx, tokenizer, data.rm_eval, "rm", "rm held-out", data_stats)
    steps_per_epoch = _steps_per_epoch(ctx, len(train), s.batch_size, "rm.batch_size", "preference pairs")
    total = steps_per_epoch * s.epochs
    engine = HybridEngine(model, _engine_cfg(cfg, lr=s.lr, batch=s.batch_size, grad_accum=s.grad_accum,
                                             warmup=s.warmup_steps, decay=total // s.grad_accum))
    pad = tokenizer.pad_token_id
    before = _rm_accuracy(engine, heldout, pad)
    rng = random.Random(cfg.seed + 1)
    t0 = time.perf_counter()
    step = 0
    with ctx.reporter.stage("rm", total, ctx.out / ".rm.metrics.jsonl") as rep:
        rep.log({"stage": "rm", "step": 0, **{f"heldout_{k}": v for k, v in before.items()}})
        for epoch in range(s.epochs):
            for chunk in _epoch_batches(ctx, train, s.batch_size, steps_per_epoch, rng):
                b = collate_pairs(chunk, pad)
                scores = engine.score(b["input_ids"], b["attention_mask"])
                out = pairwise_reward_loss(scores[: len(chunk)], scores[len(chunk) :], center_coef=s.center_coef)
                engine.backward(out.loss)
                engine.step()
                step += 1
                rep.update(show={"epoch": epoch + 1, "loss": out.loss.item(), "acc": float(out.accuracy)},
                           log={"stage": "rm", "step": step, "loss": out.loss.item(), "train_accuracy": float(out.accuracy),
                                "margin": float(out.margin)})
            acc = _rm_accuracy(engine, heldout, pad)
            rep.update(advance=0, show={"epoch": epoch + 1, "heldout_acc": acc["accuracy"]},
                       log={"stage": "rm", "step": step, **{f"heldout_{k}": v for k, v in acc.items()}})
    after = _rm_accuracy(engine, heldout, pad)
    wall = time.perf_counter() - t0
    metrics = {"heldout_accuracy": after["accuracy"], "heldout_accuracy_before": before["accuracy"],
               "heldout_accuracy_noisy_labels": after["accuracy_noisy_labels"], "train_steps": step,
               "data": data_stats}
    _save(ctx, engine, "rm", tokenizer, metrics)
    del engine
    return metrics | {"wall_seconds": wall}


# ----------------------------------------------------------------------------------------------
# stage 3: the algorithm (online RL or preference optimisation)
# ----------------------------------------------------------------------------------------------
class ModelReward:
    """Reward = the frozen reward model's score at the last real token."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @torch.no_grad()
    def __call__(self, sequences, attention_mask, prompt_len, meta):
        return self.engine.score(sequences, attention_mask)


def _per_item(verify):
    """A ``verify(response, meta) -> float`` as a batch reward function."""
    return lambda responses, meta: [verify(r, m) for r, m in zip(responses, meta, strict=True)]


def evaluate_policy(actor, tokenizer, scorer, prompts: list[dict], *, do_sample: bool, temperature: float,
                    max_new_tokens: int, batch: int = 256, reference=None) -> dict:
    """Mean ``scorer`` score (and KL to ``reference`` when given) of the policy's answers to ``prompts``.

    ``scorer(sequences, attention_mask, prompt_len, meta) -> (B,)`` is the verifier where the data has
    one, else the reward model (or the reward function). Every rank evaluates the same prompts
    (generation gathers ZeRO-3 weights collectively).
    """
    from rlhf_algos import response_mask_from
    from rlhf_algos.functional import kl_penalty
    from rlhf_data import collate_prompts

    scores, kls = [], []
    for chunk in _batches(prompts, batch):
        b = collate_prompts(chunk, tokenizer.pad_token_id)
        seqs = actor.generate(b["input_ids"], b["attention_mask"], max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id).cpu()
        P = b["input_ids"].shape[1]
        rmask = response_mask_from(seqs, P, tokenizer.eos_token_id)
        attn = torch.cat([b["attention_mask"], rmask.long()], dim=1)
        if scorer is not None:
            scores += scorer(seqs, attn, P, b["meta"]).float().cpu().tolist()
        if reference is not None:
            with torch.no_grad():
                lp = actor.token_logprobs(seqs, attn, P, temperature=temperature).float().cpu()
                ref = reference.token_logprobs(seqs, attn, P, temperature=temperature).float().cpu()
            # k3 (Schulman 2020): unbiased like k1 and never negative, so the reported KL never prints
            # below 0 (a k1 sample mean does when the policy is close to the reference); padding zeroed first
            kls.append((kl_penalty(lp * rmask, ref * rmask, "k3") * rmask).sum(dim=1))
    out = {"score": sum(scores) / len(scores) if scores else None}
    if kls:
        out["kl_to_ref"] = torch.cat(kls).mean().item()
    return out


def _reward_function(ctx: Context, data, tokenizer, rm_dir: Path | None, batch: int):
    """The stage-3 reward: the frozen reward model, the data's verifier, or a registered function."""
    from rlhf_hybrid import HybridEngine, ValueModel

    r = ctx.cfg.rl.reward
    if r == "model":
        return ModelReward(HybridEngine(ValueModel.from_pretrained(str(rm_dir)),
                                        _engine_cfg(ctx.cfg, lr=ctx.cfg.rl.critic_lr, batch=batch), trainable=False))
    if r == "verifier":
        return TextReward(_per_item(data.verifier), tokenizer)
    from rlhf_algos import get_reward

    return TextReward(get_reward(r), tokenizer)


class _Evaluator:
    """Held-out and validation scores of the policy being trained, the same for every algorithm."""

    def __init__(self, ctx: Context, tokenizer, data, actor, reference, scorer, metric: str) -> None:
        from rlhf_hybrid import all_reduce_mean

        stats: dict = {}
        self.valid_prompts = _tokenized(ctx, tokenizer, data.rl_valid, "rl", "rl validation", stats)
        self.eval_prompts = _tokenized(ctx, tokenizer, data.rl_eval, "rl", "rl held-out", stats)
        self.stats, self.metric = stats, metric
        self.actor, self.reference = actor, reference
        self.ev = dict(tokenizer=tokenizer, scorer=scorer, max_new_tokens=ctx.cfg.rl.max_new_tokens,
                       temperature=ctx.cfg.rl.temperature)
        self.all_reduce_mean = all_reduce_mean

    def held_out(self, tag: str) -> dict:
        greedy = evaluate_policy(self.actor, prompts=self.eval_prompts, do_sample=False, **self.ev)
        sampled = evaluate_policy(self.actor, prompts=self.eval_prompts, do_sample=True, reference=self.reference,
                                  **self.ev)
        return {f"{self.metric}_{tag}": greedy["score"], f"{self.metric}_sampled_{tag}": sampled["score"],
                f"kl_to_ref_{tag}": sampled.get("kl_to_ref")}

    def validate(self) -> float:
        # Averaged over ranks so that every rank takes the same keep-this-checkpoint decision
        # (full_state_dict is collective under ZeRO-3; diverging decisions would deadlock).
        score = evaluate_policy(self.actor, prompts=self.valid_prompts, do_sample=False, **self.ev)["score"]
        return self.all_reduce_mean({"valid": score if score is not None else 0.0})["valid"]


def _kept_message(name: str, unit: str, best: int, metric: str, score: float) -> str:
    """What ``select=best`` kept: the best ``unit`` (iteration / epoch), or the starting model when none beat it."""
    what = metric.replace("_", " ")
    if best == 0:
        return (f"{name}: no {unit} beat the starting model on validation (greedy {what} {score:.3f}); "
                f"keeping the starting model")
    return f"{name}: keeping the checkpoint of {unit} {best} (validation greedy {what} {score:.3f})"


def _eval_metric(data, reward_fn, rl_reward: str):
    """What held-out answers are scored with: the data's verifier if it has one, else the stage's reward."""
    if data.verifier is not None:
        return "verifier_score", None
    return ("reward_model_score" if rl_reward == "model" else "reward_score"), reward_fn


def _monitor_fn(ctx: Context, data, tokenizer):
    """What the rollouts are also scored with, only logged: the data's verifier when the stage trains on the
    reward model (``rm_verifier_agreement``: is the policy hacking the reward model?), else None."""
    if ctx.cfg.rl.reward != "model" or data.verifier is None:
        return None
    return TextReward(_per_item(data.verifier), tokenizer)


def _online_progress(row: dict, valid: float) -> dict:
    """The progress line of an online iteration: reward, KL, validation score, the reward model's agreement
    with the verifier on the rollout (when measured) and the sampling/training mismatch."""
    show = {"reward": row["reward_mean"], "kl": row["kl_to_ref"], "valid": valid}
    if row.get("rm_verifier_agreement") is not None:
        show["agree"] = row["rm_verifier_agreement"]
    if row.get("gen_kl_error") is not None:
        show["gen_kl"] = row["gen_kl_error"]
    return show


def _build_online(ctx: Context, algo_cls, data, tokenizer, sft_dir: Path, rm_dir: Path | None):
    """The online algorithm and its engines: the actor, the frozen reference, the reward, the critic when
    the algorithm has one (from the reward model, DeepSpeed-Chat's choice, else the SFT model), the monitor."""
    from rlhf_hybrid import HybridEngine, ValueModel, all_reduce_mean, load_causal_lm

    cfg, p = ctx.cfg, ctx.cfg.rl
    engine = _engine_cfg(cfg, lr=p.actor_lr, batch=p.micro_batch_size)
    actor = HybridEngine(_lora(ctx, load_causal_lm(str(sft_dir)), "rl"), engine)
    reference = HybridEngine(load_causal_lm(str(sft_dir)), engine, trainable=False)
    reward_fn = _reward_function(ctx, data, tokenizer, rm_dir, p.micro_batch_size)
    critic = None
    if "critic" in algo_cls.required_models:
        critic = HybridEngine(ValueModel.from_pretrained(str(rm_dir or sft_dir)),
                              _engine_cfg(cfg, lr=p.critic_lr, batch=p.micro_batch_size))
    monitor_fn = _monitor_fn(ctx, data, tokenizer)
    algo = algo_cls(cfg.algorithm_config(), actor=actor, reference=reference, critic=critic, reward_fn=reward_fn,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    reduce_metrics=all_reduce_mean, seed=cfg.seed + ctx.rank,
                    **({"monitor_fn": monitor_fn} if monitor_fn is not None else {}))
    return algo, actor, reference, reward_fn


def _prompt_batches(ctx: Context, prompts: list[dict], per_rank: int, seed: int):
    """Endless batches of this rank's prompts: a seeded shuffle shared by all ranks (reshuffled when used
    up), every rank taking its slice of each ``per_rank * world_size`` prompts."""
    rng = random.Random(seed)
    order: list[int] = []
    need = per_rank * ctx.world_size
    while True:
        while len(order) < need:
            perm = list(range(len(prompts)))
            rng.shuffle(perm)
            order += perm
        take, order = order[:need], order[need:]
        yield [prompts[j] for j in take[ctx.rank :: ctx.world_size]]


def run_online(ctx: Context) -> dict:
    """Stage 3 with an online algorithm: rollouts from the RL prompts, ``algo.learn`` on each."""
    from rich.markup import escape
    from rlhf_algos import HealthMonitor
    from rlhf_data import collate_prompts
    from rlhf_hybrid import load_tokenizer

    cfg, p = ctx.cfg, ctx.cfg.rl
    algo_cls = cfg.algorithm()
    name = algo_cls.name
    _seed(cfg.seed + 2 + 1000 * ctx.rank)  # ranks sample different responses
    data = _data(ctx)
    sft_dir = _require_stage_output(ctx, "sft", name)
    rm_dir = _require_stage_output(ctx, "rm", name) if p.reward == "model" else None  # fail before any work
    tokenizer = load_tokenizer(str(sft_dir))
    algo, actor, reference, reward_fn = _build_online(ctx, algo_cls, data, tokenizer, sft_dir, rm_dir)

    data_stats: dict = {}
    batches = _prompt_batches(ctx, _tokenized(ctx, tokenizer, data.rl, "rl", "rl", data_stats), p.rollout_batch_size,
                              cfg.seed + 7)
    metric, scorer = _eval_metric(data, reward_fn, p.reward)
    ev = _Evaluator(ctx, tokenizer, data, actor, reference, scorer or TextReward(_per_item(data.verifier), tokenizer),
                    metric)
    data_stats |= ev.stats
    before = ev.held_out("before")
    best_score = ev.validate()
    # select=best starts from the starting model itself: when no iteration beats it, it is what is kept
    best_iter, best_state = 0, actor.full_state_dict() if p.select == "best" else None
    health = HealthMonitor(p.health_thresholds())
    t0 = time.perf_counter()
    with ctx.reporter.stage(name, p.iterations, ctx.out / f".{name}.metrics.jsonl") as rep:
        rep.log({"stage": name, "iteration": 0, f"valid_{metric}": best_score, **before})
        for it in range(1, p.iterations + 1):
            b = collate_prompts(next(batches), tokenizer.pad_token_id)
            exp = algo.generate_experience(b["input_ids"], b["attention_mask"], b["meta"])
            row = {"stage": name, "iteration": it, **algo.learn(exp), **actor.timings}
            if it % p.eval_every == 0 or it == p.iterations:
                valid = ev.validate()
                row[f"valid_{metric}"] = valid
                if p.select == "best" and valid > best_score:
                    best_score, best_iter, best_state = valid, it, actor.full_state_dict()
            row["warnings"] = health.update(row)  # the same on every rank: the metrics are averaged
            for w in row["warnings"]:
                ctx.reporter.print(f"[yellow]{name}: warning:[/] {escape(w)}", highlight=False)
            rep.update(show=_online_progress(row, row.get(f"valid_{metric}", best_score)), log=row)
    wall = time.perf_counter() - t0
    if p.select == "best":
        actor.load_full_state_dict(best_state)
        ctx.reporter.print(_kept_message(name, "iteration", best_iter, metric, best_score))
    after = ev.held_out("after")
    metrics = {**before, **after, "kl_to_ref": after["kl_to_ref_after"], "selected_iteration": best_iter
               if p.select == "best" else p.iterations, "reward": p.reward, "eval_metric": metric, "algo": name,
               "data": data_stats}
    _save(ctx, actor, name, tokenizer, metrics)
    return metrics | {"wall_seconds": wall}


def run_offline(ctx: Context) -> dict:
    """Stage 3 with preference optimisation (DPO, ...): ``algo.learn`` on batches of the RM pairs."""
    from rlhf_data import collate_pairs
    from rlhf_hybrid import HybridEngine, all_reduce_mean, load_causal_lm, load_tokenizer

    cfg, s = ctx.cfg, ctx.cfg.pref
    algo_cls, acfg = cfg.algorithm(), cfg.algorithm_config()
    name = algo_cls.name
    _seed(cfg.seed + 3)
    data = _data(ctx)
    sft_dir = _require_stage_output(ctx, "sft", name)
    tokenizer = load_tokenizer(str(sft_dir))
    data_stats: dict = {}
    train = _tokenized(ctx, tokenizer, data.rm, "rm", "pairs", data_stats)
    steps_per_epoch = _steps_per_epoch(ctx, len(train), s.batch_size, "pref.batch_size", "preference pairs")
    total = steps_per_epoch * s.epochs
    policy = HybridEngine(_lora(ctx, load_causal_lm(str(sft_dir)), "pref"),
                          _engine_cfg(cfg, lr=s.lr, batch=s.batch_size, grad_accum=s.grad_accum,
                                      warmup=s.warmup_steps, decay=total // s.grad_accum))
    frozen = _engine_cfg(cfg, lr=s.lr, batch=s.batch_size)
    reference = HybridEngine(load_causal_lm(str(sft_dir)), frozen, trainable=False) if (
        "reference" in algo_cls.required_models or data.verifier is not None) else None
    algo = algo_cls(acfg, policy=policy, reference=reference if "reference" in algo_cls.required_models else None,
                    reduce_metrics=all_reduce_mean)
    # held-out answers: the verifier if the data has one, else the reward model if stage 2 ran
    rm_dir = ctx.stage_dir("rm")
    if data.verifier is not None:
        metric, scorer = "verifier_score", TextReward(_per_item(data.verifier), tokenizer)
    elif (rm_dir / "config.json").is_file():
        from rlhf_hybrid import ValueModel

        metric, scorer = "reward_model_score", ModelReward(
            HybridEngine(ValueModel.from_pretrained(str(rm_dir)), frozen, trainable=False))
    else:
        metric, scorer = "none", None
    ev = _Evaluator(ctx, tokenizer, data, policy, reference, scorer, metric)
    data_stats |= ev.stats
    before = ev.held_out("before")
    selecting = scorer is not None and s.select == "best"
    best_score, best_epoch, best_state = ev.validate(), 0, policy.full_state_dict() if selecting else None
    rng = random.Random(cfg.seed + 3)
    pad = tokenizer.pad_token_id
    t0 = time.perf_counter()
    step = 0
    with ctx.reporter.stage(name, total, ctx.out / f".{name}.metrics.jsonl") as rep:
        rep.log({"stage": name, "step": 0, f"valid_{metric}": best_score, **before})
        for epoch in range(s.epochs):
            for chunk in _epoch_batches(ctx, train, s.batch_size, steps_per_epoch, rng):
                m = algo.learn(collate_pairs(chunk, pad))
                step += 1
                rep.update(show={"epoch": epoch + 1, "loss": m["loss"], **({"acc": m["accuracy"]} if "accuracy" in m
                                                                           else {})},
                           log={"stage": name, "step": step, "epoch": epoch, **m})
            valid = ev.validate()
            rep.update(advance=0, show={"epoch": epoch + 1, "valid": valid},
                       log={"stage": name, "step": step, "epoch": epoch, f"valid_{metric}": valid})
            if selecting and valid > best_score:
                best_score, best_epoch, best_state = valid, epoch + 1, policy.full_state_dict()
    wall = time.perf_counter() - t0
    if selecting:
        policy.load_full_state_dict(best_state)
        ctx.reporter.print(_kept_message(name, "epoch", best_epoch, metric, best_score))
    after = ev.held_out("after")
    metrics = {**before, **after, "kl_to_ref": after["kl_to_ref_after"], "train_steps": step, "eval_metric": metric,
               "selected_epoch": best_epoch if selecting else s.epochs,
               "algo": name, "data": data_stats}
    _save(ctx, policy, name, tokenizer, metrics)
    return metrics | {"wall_seconds": wall}


def stages_for(cfg: RunConfig, stage: str) -> list[str]:
    """The stages ``--stage`` runs: ``all`` = sft, rm (when the algorithm trains on a reward model's
    scores), then the algorithm; ``sft``, ``rm`` or the algorithm's name alone."""
    cls = cfg.algorithm()
    if stage != "all":
        return [stage]
    needs_rm = cls.kind == "online" and cfg.rl.reward == "model"
    return ["sft", *(["rm"] if needs_rm else []), cls.name]


# ----------------------------------------------------------------------------------------------
def run_pipeline(cfg: RunConfig, stages: list[str], reporter: Reporter, rank: int = 0, world_size: int = 1) -> dict:
    """Run ``stages`` in order and write ``<out>/summary.json`` (merged with an earlier one)."""
    import json

    from rlhf_hybrid import barrier, write_json_atomic

    ctx = Context(cfg, reporter, rank, world_size)
    summary_path = ctx.out / "summary.json"
    summary: dict = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = {}
    summary.setdefault("wall_seconds", {})
    data = _data(ctx)  # load (and check) the data before any stage starts
    algo_cls = cfg.algorithm()
    if algo_cls.name in stages and algo_cls.kind == "online" and cfg.rl.reward == "verifier" and data.verifier is None:
        raise PipelineError(f"rl.reward: 'verifier' needs data with a ground-truth verifier (the demo task); "
                            f"data.sources={cfg.data.sources!r} has none; use rl.reward=model or a registered "
                            f"reward function")
    runners = {"sft": run_sft, "rm": run_rm, algo_cls.name: run_online if algo_cls.kind == "online" else run_offline}
    t_all = time.perf_counter()
    for stage in stages:
        t0 = time.perf_counter()
        result = runners[stage](ctx)
        result.pop("wall_seconds", None)
        summary[stage] = result
        summary["wall_seconds"][stage] = round(time.perf_counter() - t0, 2)
        barrier()
    summary["wall_seconds"]["total"] = round(time.perf_counter() - t_all, 2)
    if ctx.is_main:
        write_json_atomic(summary_path, summary)
    return summary


def summary_rows(summary: dict) -> list[tuple[str, str, str, str, str]]:
    def f(x):
        return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) and not math.isnan(x) else str(x))

    w = summary.get("wall_seconds", {})
    rows = []
    if "sft" in summary:
        s = summary["sft"]
        rows.append(("sft", "eval loss", f(s.get("eval_loss_before")), f(s.get("eval_loss_after")), f"{w.get('sft', 0):.0f} s"))
    if "rm" in summary:
        s = summary["rm"]
        rows.append(("rm", "held-out pairwise accuracy", f(s.get("heldout_accuracy_before")),
                     f(s.get("heldout_accuracy")), f"{w.get('rm', 0):.0f} s"))
    for stage, s in summary.items():  # stage 3: every algorithm's section carries "algo"
        if not isinstance(s, dict) or "algo" not in s and stage != "ppo":
            continue
        m = s.get("eval_metric", "verifier_score")
        name = m.replace("_", " ")
        if m != "none":
            rows.append((stage, f"{name}, greedy", f(s.get(f"{m}_before")), f(s.get(f"{m}_after")),
                         f"{w.get(stage, 0):.0f} s"))
            rows.append((stage, f"{name}, sampled", f(s.get(f"{m}_sampled_before")), f(s.get(f"{m}_sampled_after")), ""))
        rows.append((stage, "KL to reference", f(s.get("kl_to_ref_before")), f(s.get("kl_to_ref_after")),
                     "" if m != "none" else f"{w.get(stage, 0):.0f} s"))
    return rows
