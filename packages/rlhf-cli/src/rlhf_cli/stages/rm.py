"""Stage 2: the reward model (``rlhf_algos.RM``, or a plugin registered as ``rm``) -> ``<out>/rm``."""

from __future__ import annotations

import random
import time

from ..context import (
    Context,
    PipelineError,
    check_reward_vocab,
    engine_config,
    load_data,
    load_model,
    load_run_tokenizer,
    require_stage_output,
    save_stage,
    seed_everything,
    tokenized,
    trained_reward_model,
)
from ..resume import StageState
from ..sampling import steps_per_epoch
from .epochs import train_epochs


def run_rm(ctx: Context) -> dict:
    """Reward-model epochs over the RM pairs, held-out pairwise accuracy before, after every epoch and at the end.

    The model is the SFT model's backbone (or model.reward_model's, a plain causal LM) with a fresh value head.
    """
    from rlhf_algos import get_algorithm
    from rlhf_hybrid import HybridEngine, padding_free_layout

    cfg, s = ctx.cfg, ctx.cfg.rm
    seed_everything(cfg.seed + 1)
    head = trained_reward_model(cfg)
    if head:  # stage 3 would score with it, not with <out>/rm: training another one here is a mistake
        raise PipelineError(f"model.reward_model: {cfg.model.reward_model!r} is a trained reward model ({head.replace('_', ' ')} "
                            f"head), which stage 3 uses as is; --stage rm trains one from a causal LM: give a plain "
                            f"causal LM, or leave model.reward_model empty to start from the SFT model")
    data = load_data(ctx)
    sft_dir = require_stage_output(ctx, "sft", "rm")
    tokenizer = load_run_tokenizer(ctx, sft_dir)
    base = cfg.model.reward_model or str(sft_dir)
    model = load_model(ctx, base, "value", engine_config(cfg, lr=s.lr, batch=s.batch_size, grad_accum=s.grad_accum))
    check_reward_vocab(base, model, tokenizer)
    data_stats: dict = {}
    train = tokenized(ctx, tokenizer, data.rm, "rm", "rm", data_stats)
    heldout = tokenized(ctx, tokenizer, data.rm_eval, "rm", "rm held-out", data_stats)
    steps = steps_per_epoch(ctx, len(train), s.batch_size, "rm.batch_size", "preference pairs")
    total = steps * s.epochs
    engine = HybridEngine(model, engine_config(cfg, lr=s.lr, batch=s.batch_size, grad_accum=s.grad_accum,
                                               warmup=s.warmup_steps, decay=total // s.grad_accum))
    rm_cls = get_algorithm("rm")
    layout = padding_free_layout(model) if s.padding_free else "padded"
    rm = rm_cls(rm_cls.config_class(center_coef=s.center_coef, batch_layout=layout), model=engine)
    pad = tokenizer.pad_token_id
    rng = random.Random(cfg.seed + 1)
    jsonl = ctx.metrics_file("rm")
    state = StageState(ctx, "rm", {"model": engine}, cfg.checkpoint.every, jsonl)
    t0 = time.perf_counter()
    with ctx.reporter.stage("rm", total, jsonl) as rep:
        start = state.begin(rep, lambda: {"before": rm.evaluate(heldout, pad)},
                            lambda v: {"stage": "rm", "step": 0, **{f"heldout_{k}": x for k, x in v["before"].items()}})
        before, done = start["before"], start["step"]

        def learn(chunk):
            m = rm.learn(rm.collate(chunk, pad))  # loss, train_accuracy, margin
            return {"loss": m["loss"], "acc": m["train_accuracy"]}, m

        def end_of_epoch(epoch, step):
            acc = rm.evaluate(heldout, pad)
            rep.update(advance=0, show={"epoch": epoch + 1, "heldout_acc": acc["accuracy"]},
                       log={"stage": "rm", "step": step, **{f"heldout_{k}": v for k, v in acc.items()}})

        step = train_epochs(ctx, "rm", engine, state, rep, train, batch=s.batch_size, steps=steps, epochs=s.epochs,
                            rng=rng, done=done, grad_accum=s.grad_accum, learn=learn, end_of_epoch=end_of_epoch,
                            extras={"before": before})
    after = rm.evaluate(heldout, pad)
    wall = time.perf_counter() - t0
    metrics = {"heldout_accuracy": after["accuracy"], "heldout_accuracy_before": before["accuracy"],
               "heldout_accuracy_noisy_labels": after["accuracy_noisy_labels"], "train_steps": step,
               "data": data_stats}
    save_stage(ctx, engine, "rm", tokenizer, metrics)
    state.finish()
    return metrics | {"wall_seconds": wall}
