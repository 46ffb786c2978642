"""Stage 3 with an online algorithm (ppo, grpo, rloo, ...): rollouts from the RL prompts, ``algo.learn``
on each -> ``<out>/<algo>``."""

from __future__ import annotations

import time
from pathlib import Path

from ..context import (
    Context,
    PipelineError,
    check_reward_vocab,
    engine_config,
    frozen_config,
    load_data,
    load_model,
    load_run_tokenizer,
    require_stage_output,
    reward_model_dir,
    save_stage,
    seed_everything,
    tokenized,
    with_lora,
)
from ..evaluation import Evaluator, KeepBest, eval_metric, kept_message, verifier_reward
from ..resume import StageState
from ..sampling import PtxBatches, resumed_prompt_batches
from ..train_stats import StepTimer

__all__ = ["build_online", "progress_line", "ptx_batches", "reward_function", "run_online"]


def reward_function(ctx: Context, data, tokenizer, rm_dir: Path | str | None, batch: int):
    """The stage-3 reward: the frozen reward model, the data's verifier, or a registered function."""
    from rlhf_algos import ModelReward, TextReward, get_reward
    from rlhf_hybrid import HybridEngine

    r = ctx.cfg.rl.reward
    if r == "model":
        frozen = frozen_config(ctx.cfg, engine_config(ctx.cfg, lr=ctx.cfg.rl.critic_lr, batch=batch), "reward")
        model = load_model(ctx, rm_dir, "value", frozen, trainable=False)
        check_reward_vocab(rm_dir, model, tokenizer)
        return ModelReward(HybridEngine(model, frozen, trainable=False))
    if r == "verifier":
        return verifier_reward(data, tokenizer)
    return TextReward(get_reward(r), tokenizer)


def _monitor_fn(ctx: Context, data, tokenizer):
    """What the rollouts are also scored with, only logged: the data's verifier when the stage trains on the
    reward model (``rm_verifier_agreement``: is the policy hacking the reward model?), else None."""
    if ctx.cfg.rl.reward != "model" or data.verifier is None:
        return None
    return verifier_reward(data, tokenizer)


def build_online(ctx: Context, algo_cls, data, tokenizer, sft_dir: Path, rm_dir: Path | str | None, ptx=None):
    """The online algorithm and its engines: the actor, the frozen reference, the reward, the critic when
    the algorithm has one (from the reward model, DeepSpeed-Chat's choice, else the SFT model), the monitor.

    ``ptx``: the SFT batches of the ptx term (:func:`ptx_batches`), with rl.ptx_coef > 0.

    Returns:
        ``(algo, actor, reference, reward_fn)``.
    """
    from rlhf_hybrid import HybridEngine, all_reduce_mean, padding_free_layout

    cfg, p = ctx.cfg, ctx.cfg.rl
    engine = engine_config(cfg, lr=p.actor_lr, batch=p.micro_batch_size)
    actor = HybridEngine(with_lora(ctx, load_model(ctx, sft_dir, engine=engine, lora_stage="rl"), "rl"), engine,
                         name="actor")
    frozen = frozen_config(cfg, engine, "reference")
    reference = HybridEngine(load_model(ctx, sft_dir, engine=frozen, trainable=False), frozen, trainable=False)
    reward_fn = reward_function(ctx, data, tokenizer, rm_dir, p.micro_batch_size)
    critic = None
    if "critic" in algo_cls.required_models:
        critic_cfg = engine_config(cfg, lr=p.critic_lr, batch=p.micro_batch_size)
        critic = HybridEngine(load_model(ctx, rm_dir or sft_dir, "value", critic_cfg), critic_cfg, name="critic")
    monitor_fn = _monitor_fn(ctx, data, tokenizer)
    # rl.padding_free: the packed layout the actor's attention keeps apart (one row under flash attention)
    algo = algo_cls(cfg.algorithm_config(padding_free_layout(actor.module)), actor=actor, reference=reference, critic=critic, reward_fn=reward_fn,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    reduce_metrics=all_reduce_mean, seed=cfg.seed + ctx.rank,
                    **({"monitor_fn": monitor_fn} if monitor_fn is not None else {}),
                    **({"ptx_batches": ptx} if ptx is not None else {}))
    return algo, actor, reference, reward_fn


def ptx_batches(ctx: Context, data, tokenizer, stats: dict):
    """With rl.ptx_coef > 0, the ptx term's SFT batches (rl.micro_batch_size demonstrations of the SFT split
    per actor step, seeded, the same order on every run: :class:`rlhf_cli.sampling.PtxBatches`); else None."""
    cfg = ctx.cfg
    if cfg.rl.ptx_coef == 0:
        return None
    if not data.sft:
        raise PipelineError(f"rl.ptx_coef={cfg.rl.ptx_coef}: the ptx term draws SFT demonstrations, but the data has "
                            f"none: {data.why_empty('sft')}; set rl.ptx_coef=0 or give the SFT split data (data.split)")
    examples = tokenized(ctx, tokenizer, data.sft, "sft", "ptx", stats)
    return PtxBatches(ctx, examples, cfg.rl.micro_batch_size, cfg.seed + 11, tokenizer.pad_token_id,
                      cfg.sft.mask_prompt)


def progress_line(row: dict, valid: float) -> dict:
    """The progress line of an online iteration: reward, KL, validation score, the reward model's agreement
    with the verifier on the rollout (when measured) and the sampling/training mismatch."""
    show = {"reward": row["reward_mean"], "kl": row["kl_to_ref"], "valid": valid}
    if row.get("rm_verifier_agreement") is not None:
        show["agree"] = row["rm_verifier_agreement"]
    if row.get("gen_kl_error") is not None:
        show["gen_kl"] = row["gen_kl_error"]
    return show


def _iteration(ctx: Context, it: int, algo, actor, prompts: list[dict], pad_id: int, ev: Evaluator,
               keep: KeepBest, health) -> dict:
    """One iteration's metrics row: a rollout, ``algo.learn`` on it, validation when due, health warnings."""
    from rich.markup import escape
    from rlhf_data import collate_prompts

    p, name = ctx.cfg.rl, algo.name
    timer = StepTimer(actor, ctx.world_size)  # the whole iteration: rollout and learning
    b = collate_prompts(prompts, pad_id)
    exp = algo.generate_experience(b["input_ids"], b["attention_mask"], b["meta"])
    row = {"stage": name, "iteration": it, **algo.learn(exp), **actor.timings}
    row |= timer.stats(exp.sequences.shape[0], int(exp.attention_mask.sum()))
    if it % p.eval_every == 0 or it == p.iterations:
        valid = ev.validate()
        row[f"valid_{ev.metric}"] = valid
        keep.offer(valid, it)
    row["warnings"] = health.update(row)  # the same on every rank: the metrics are averaged
    for w in row["warnings"]:
        ctx.reporter.print(f"[yellow]{name}: warning:[/] {escape(w)}", highlight=False)
    return row


def run_online(ctx: Context) -> dict:
    """The online recipe, top to bottom; the rollout and learning math are the algorithm's."""
    from rlhf_algos import HealthMonitor

    cfg, p = ctx.cfg, ctx.cfg.rl
    algo_cls = cfg.algorithm()
    name = algo_cls.name
    # 1. Seed the global RNG (generation samples from it), differently per rank: ranks sample different responses.
    seed_everything(cfg.seed + 2 + 1000 * ctx.rank)
    # 2. Inputs: the data, the SFT model and (rl.reward=model) the reward model, checked before any work.
    data = load_data(ctx)
    sft_dir = require_stage_output(ctx, "sft", name)
    rm_dir = reward_model_dir(ctx, name) if p.reward == "model" else None
    tokenizer = load_run_tokenizer(ctx, sft_dir)
    # 3. The algorithm and its engines: actor, frozen reference, reward, critic (when it has one), monitor;
    #    with rl.ptx_coef > 0, the SFT batches of its ptx term.
    data_stats: dict = {}
    ptx = ptx_batches(ctx, data, tokenizer, data_stats)
    algo, actor, reference, reward_fn = build_online(ctx, algo_cls, data, tokenizer, sft_dir, rm_dir, ptx)
    if p.ema_beta > 0:  # DeepSpeed-Chat's EMA actor: updated after every optimizer step, scored and saved in 7.
        actor.enable_ema(p.ema_beta)
    # 4. Prompts: an endless, seeded stream of this rank's share of the RL prompts (see step 6).
    rl_prompts = tokenized(ctx, tokenizer, data.rl, "rl", "rl", data_stats)
    # 5. Evaluation, and the saved state when resuming (checkpoint.every_iterations, SIGTERM; rlhf_cli.resume).
    metric, scorer = eval_metric(data, reward_fn, p.reward)
    ev = Evaluator(ctx, tokenizer, data, actor, reference, scorer or verifier_reward(data, tokenizer), metric)
    data_stats |= ev.stats
    jsonl = ctx.metrics_file(name)
    engines = {"actor": actor, **({"critic": algo.critic} if algo.critic is not None else {})}
    state = StageState(ctx, name, engines, cfg.checkpoint.every_iterations, jsonl)
    t0 = time.perf_counter()
    with ctx.reporter.stage(name, p.iterations, jsonl) as rep:
        saved = state.start(ctx.resume)  # restores the RNGs, the engines and the metrics rows
        if saved:
            before, done = saved["before"], saved["step"]
            keep, health = KeepBest.resumed(actor, p.select == "best", saved["keep"]), saved["health"]
            algo.load_state_dict(saved["algo"])
            if actor.ema is not None:
                actor.ema.load_state_dict(saved["ema"])
            rep.update(advance=done)
        else:  # the starting model's held-out scores; its validation score is the one to beat
            before, done = ev.held_out("before"), 0
            keep, health = KeepBest(actor, p.select == "best", ev.validate()), HealthMonitor(p.health_thresholds())
            rep.log({"stage": name, "iteration": 0, f"valid_{metric}": keep.score, **before})
        # 6. Iterations: rollout -> learn -> validate every rl.eval_every (keep the best) -> health warnings.
        batches = resumed_prompt_batches(ctx, rl_prompts, p.rollout_batch_size, cfg.seed + 7, done)
        if ptx is not None:  # the ptx batches the finished iterations drew, replayed
            ptx.skip(done * algo.actor_steps(p.rollout_batch_size * algo.config.samples_per_prompt))
        for it in range(done + 1, p.iterations + 1):
            row = _iteration(ctx, it, algo, actor, next(batches), tokenizer.pad_token_id, ev, keep, health)
            rep.update(show=progress_line(row, row.get(f"valid_{metric}", keep.score)), log=row)
            state.after_step(it, lambda: {"before": before, "keep": keep.state_dict(), "health": health,
                                          "algo": algo.state_dict(),
                                          "ema": actor.ema.state_dict() if actor.ema is not None else None})
    wall = time.perf_counter() - t0
    # 7. The kept weights (select=best) or the last ones, scored on the held-out prompts, then saved.
    metrics = _finish(ctx, name, actor, keep, ev, before, tokenizer, data_stats)
    state.finish()
    return metrics | {"wall_seconds": wall}


def _finish(ctx: Context, name: str, actor, keep: KeepBest, ev: Evaluator, before: dict, tokenizer,
            data_stats: dict) -> dict:
    """Step 7 of :func:`run_online`: restore the kept weights, score them on the held-out prompts and save
    them (and the EMA actor, when there is one, beside them); returns the stage's metrics."""
    p = ctx.cfg.rl
    if keep.enabled:
        keep.restore()
        ctx.reporter.print(kept_message(name, "iteration", keep.at, ev.metric, keep.score))
    after = ev.held_out("after")
    metrics = {**before, **after, "kl_to_ref": after["kl_to_ref_after"],
               "selected_iteration": keep.at if keep.enabled else p.iterations, "reward": p.reward,
               "eval_metric": ev.metric, "algo": name, "data": data_stats}
    save_stage(ctx, actor, name, tokenizer, metrics)
    if actor.ema is not None:  # the EMA actor: scored on the same held-out prompts, saved beside the actor
        with actor.ema.swapped():
            ema = ev.held_out("after")
            metrics["ema"] = {"beta": p.ema_beta, **ema}
            save_stage(ctx, actor, f"{name}_ema", tokenizer, {**before, **ema, "ema_beta": p.ema_beta})
    return metrics
