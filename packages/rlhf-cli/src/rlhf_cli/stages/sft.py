"""Stage 1: supervised fine-tuning (``rlhf_algos.SFT``, or a plugin registered as ``sft``) -> ``<out>/sft``."""

from __future__ import annotations

import random
import time

from ..context import (
    Context,
    PipelineError,
    engine_config,
    load_data,
    load_model,
    load_run_tokenizer,
    save_stage,
    seed_everything,
    with_lora,
)
from ..multiturn_sft import sft_examples
from ..resume import StageState
from ..sampling import steps_per_epoch
from .epochs import train_epochs


def _starting_model(ctx: Context, data):
    """The tokenizer and causal LM SFT starts from: model.actor_model, else the demo's tiny Llama with a
    tokenizer trained on the data (its weights are drawn from the seeded global RNG by transformers' own
    init; under deepspeed.zero_stage=3 built partitioned, the same weights: ``rlhf_hybrid.zero_init``)."""
    from rlhf_data import train_demo_tokenizer
    from rlhf_hybrid import build_causal_lm, tiny_llama_config

    cfg, m, s = ctx.cfg, ctx.cfg.model, ctx.cfg.sft
    engine = engine_config(cfg, lr=s.lr, batch=s.batch_size, grad_accum=s.grad_accum)
    if m.actor_model:
        tokenizer = load_run_tokenizer(ctx, m.actor_model)
        model = load_model(ctx, m.actor_model, engine=engine, lora_stage="sft")
    else:
        from ..data_report import tiny_vocab_size

        tokenizer = train_demo_tokenizer(data.corpus, vocab_size=tiny_vocab_size(cfg))
        config = tiny_llama_config(len(tokenizer), hidden_size=m.hidden_size, num_layers=m.num_layers,
                                   num_heads=m.num_heads, intermediate_size=m.intermediate_size,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        # in the engine's dtype (model.dtype agrees with deepspeed.dtype); whole when LoRA adapters go on first
        partition = engine.zero_stage == 3 and not cfg.lora.applies_to("sft")
        model = build_causal_lm(config, engine, seed=None, partition=partition,
                                attn_implementation=m.load_kwargs(cfg.deepspeed.dtype)["attn_implementation"])
    if len(tokenizer) > model.config.vocab_size:
        raise PipelineError(f"model.actor_model: tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                            f"{model.config.vocab_size}")
    return tokenizer, model


def run_sft(ctx: Context) -> dict:
    """SFT epochs over the SFT split, the held-out loss before, after every epoch and at the end."""
    from rlhf_algos import get_algorithm
    from rlhf_data import pack_sft
    from rlhf_hybrid import HybridEngine, padding_free_layout

    cfg, s = ctx.cfg, ctx.cfg.sft
    seed_everything(cfg.seed)
    data = load_data(ctx)
    tokenizer, model = _starting_model(ctx, data)
    data_stats: dict = {}
    # multi-turn demonstrations (--data tool-demo): labels on the model's turns only (rlhf_cli.multiturn_sft)
    train = sft_examples(ctx, tokenizer, data.sft, "sft", data_stats)
    evals = sft_examples(ctx, tokenizer, data.sft_eval, "sft held-out", data_stats)
    if s.packing:
        n = len(train)
        train = pack_sft(train, max(len(e["input_ids"]) for e in train) if train else 1)
        ctx.reporter.print(f"sft: packed {n} samples into {len(train)} rows")
    rng = random.Random(cfg.seed)
    steps = steps_per_epoch(ctx, len(train), s.batch_size, "sft.batch_size", "SFT rows" if s.packing else "SFT samples")
    total = steps * s.epochs
    decay = total // s.grad_accum if s.lr_schedule == "cosine" else 0
    engine = HybridEngine(with_lora(ctx, model, "sft"),
                          engine_config(cfg, lr=s.lr, batch=s.batch_size, grad_accum=s.grad_accum,
                                        warmup=s.warmup_steps, decay=decay, weight_decay=s.weight_decay))
    sft_cls = get_algorithm("sft")
    layout = padding_free_layout(model) if s.padding_free else "padded"
    sft = sft_cls(sft_cls.config_class(mask_prompt=s.mask_prompt, packing=s.packing, batch_layout=layout), policy=engine)
    pad = tokenizer.pad_token_id
    jsonl = ctx.metrics_file("sft")
    state = StageState(ctx, "sft", {"policy": engine}, cfg.checkpoint.every, jsonl)
    t0 = time.perf_counter()
    with ctx.reporter.stage("sft", total, jsonl) as rep:
        start = state.begin(rep, lambda: {"loss_before": sft.evaluate(evals, pad)},
                            lambda v: {"stage": "sft", "step": 0, "eval_loss": v["loss_before"]})
        loss_before, done = start["loss_before"], start["step"]

        def learn(chunk):
            loss = sft.learn(sft.collate(chunk, pad))["loss"]
            return {"loss": loss}, {"loss": loss}

        def end_of_epoch(epoch, step):
            eval_loss = sft.evaluate(evals, pad)
            rep.update(advance=0, show={"epoch": epoch + 1, "eval_loss": eval_loss},
                       log={"stage": "sft", "step": step, "epoch": epoch, "eval_loss": eval_loss})

        step = train_epochs(ctx, "sft", engine, state, rep, train, batch=s.batch_size, steps=steps, epochs=s.epochs,
                            rng=rng, done=done, grad_accum=s.grad_accum, learn=learn, end_of_epoch=end_of_epoch,
                            extras={"loss_before": loss_before})
    loss_after = sft.evaluate(evals, pad)
    wall = time.perf_counter() - t0
    metrics = {"eval_loss_before": loss_before, "eval_loss_after": loss_after, "train_steps": step,
               "data": data_stats}
    save_stage(ctx, engine, "sft", tokenizer, metrics)
    state.finish()
    return metrics | {"wall_seconds": wall}
