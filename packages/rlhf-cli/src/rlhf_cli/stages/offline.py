"""Stage 3 with preference optimisation (dpo, ipo, simpo, ...): ``algo.learn`` on batches of the RM pairs
-> ``<out>/<algo>``."""

from __future__ import annotations

import random
import time

from ..context import (
    Context,
    engine_config,
    frozen_config,
    load_data,
    load_model,
    load_run_tokenizer,
    note_input,
    require_stage_output,
    save_stage,
    seed_everything,
    tokenized,
    trained_reward_model,
    with_lora,
)
from ..evaluation import Evaluator, KeepBest, kept_message, verifier_reward
from ..resume import StageState
from ..sampling import steps_per_epoch
from .epochs import train_epochs

__all__ = ["run_offline"]


def _build_offline(ctx: Context, algo_cls, data, sft_dir, total: int):
    """The policy (from the SFT model), the frozen reference (when the algorithm or the evaluation's KL needs
    one) and the algorithm. Returns ``(algo, policy, reference, frozen engine config)``."""
    from rlhf_hybrid import HybridEngine, all_reduce_mean

    cfg, s = ctx.cfg, ctx.cfg.pref
    train = engine_config(cfg, lr=s.lr, batch=s.batch_size, grad_accum=s.grad_accum, warmup=s.warmup_steps,
                          decay=total // s.grad_accum)
    policy = HybridEngine(with_lora(ctx, load_model(ctx, sft_dir, engine=train, lora_stage="pref"), "pref"), train)
    frozen = engine_config(cfg, lr=s.lr, batch=s.batch_size)
    ref_cfg = frozen_config(cfg, frozen, "reference")
    reference = HybridEngine(load_model(ctx, sft_dir, engine=ref_cfg, trainable=False), ref_cfg, trainable=False) if (
        "reference" in algo_cls.required_models or data.verifier is not None) else None
    algo = algo_cls(cfg.algorithm_config(), policy=policy,
                    reference=reference if "reference" in algo_cls.required_models else None,
                    reduce_metrics=all_reduce_mean)
    return algo, policy, reference, frozen


def _scorer(ctx: Context, data, tokenizer, frozen):
    """What held-out answers are scored with: the verifier if the data has one, else the trained
    model.reward_model, else the reward model if stage 2 ran, else nothing. Returns ``(metric name, scorer or
    None)``."""
    rm_dir = ctx.stage_dir("rm")
    if data.verifier is not None:
        return "verifier_score", verifier_reward(data, tokenizer)
    if trained_reward_model(ctx.cfg) or (rm_dir / "config.json").is_file():
        from rlhf_algos import ModelReward
        from rlhf_hybrid import HybridEngine

        source = ctx.cfg.model.reward_model if trained_reward_model(ctx.cfg) else note_input(ctx, "rm")
        rm_cfg = frozen_config(ctx.cfg, frozen, "reward")
        return "reward_model_score", ModelReward(
            HybridEngine(load_model(ctx, source, "value", rm_cfg, trainable=False), rm_cfg, trainable=False))
    return "none", None


def run_offline(ctx: Context) -> dict:
    """Preference-optimisation epochs over the RM pairs, validated after every epoch (select=best keeps the best)."""
    from rlhf_data import collate_pairs

    cfg, s = ctx.cfg, ctx.cfg.pref
    algo_cls = cfg.algorithm()
    name = algo_cls.name
    seed_everything(cfg.seed + 3)
    data = load_data(ctx)
    sft_dir = require_stage_output(ctx, "sft", name)
    tokenizer = load_run_tokenizer(ctx, sft_dir)
    data_stats: dict = {}
    train = tokenized(ctx, tokenizer, data.rm, "rm", "pairs", data_stats)
    steps = steps_per_epoch(ctx, len(train), s.batch_size, "pref.batch_size", "preference pairs")
    total = steps * s.epochs
    algo, policy, reference, frozen = _build_offline(ctx, algo_cls, data, sft_dir, total)
    metric, scorer = _scorer(ctx, data, tokenizer, frozen)
    ev = Evaluator(ctx, tokenizer, data, policy, reference, scorer, metric)
    data_stats |= ev.stats
    rng, pad, jsonl = random.Random(cfg.seed + 3), tokenizer.pad_token_id, ctx.metrics_file(name)
    state = StageState(ctx, name, {"policy": policy}, cfg.checkpoint.every, jsonl)
    selecting = scorer is not None and s.select == "best"
    t0 = time.perf_counter()
    with ctx.reporter.stage(name, total, jsonl) as rep:
        saved = state.start(ctx.resume)  # restores the RNGs, the engine and the metrics rows
        if saved:
            before, keep, done = saved["before"], KeepBest.resumed(policy, selecting, saved["keep"]), saved["step"]
            algo.load_state_dict(saved["algo"])
            rep.update(advance=done)
        else:
            before, done = ev.held_out("before"), 0
            keep = KeepBest(policy, selecting, ev.validate())
            rep.log({"stage": name, "step": 0, f"valid_{metric}": keep.score, **before})

        def learn(chunk):
            m = algo.learn(collate_pairs(chunk, pad))
            return {"loss": m["loss"], **({"acc": m["accuracy"]} if "accuracy" in m else {})}, m

        def end_of_epoch(epoch, step):  # validate, keep the best
            valid = ev.validate()
            rep.update(advance=0, show={"epoch": epoch + 1, "valid": valid},
                       log={"stage": name, "step": step, "epoch": epoch, f"valid_{metric}": valid})
            keep.offer(valid, epoch + 1)

        step = train_epochs(ctx, name, policy, state, rep, train, batch=s.batch_size, steps=steps, epochs=s.epochs,
                            rng=rng, done=done, grad_accum=s.grad_accum, learn=learn, end_of_epoch=end_of_epoch,
                            extras=lambda: {"before": before, "keep": keep.state_dict(), "algo": algo.state_dict()})
    wall = time.perf_counter() - t0
    if keep.enabled:
        keep.restore()
        ctx.reporter.print(kept_message(name, "epoch", keep.at, metric, keep.score))
    after = ev.held_out("after")
    metrics = {**before, **after, "kl_to_ref": after["kl_to_ref_after"], "train_steps": step, "eval_metric": metric,
               "selected_epoch": keep.at if keep.enabled else s.epochs, "algo": name, "data": data_stats}
    save_stage(ctx, policy, name, tokenizer, metrics)
    state.finish()
    return metrics | {"wall_seconds": wall}
