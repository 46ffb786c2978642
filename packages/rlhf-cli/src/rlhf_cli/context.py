"""What every stage of ``rlhf run`` shares: the run's context, its data, engines and stage outputs.

The stages themselves are in :mod:`rlhf_cli.stages`; the training they run is rlhf-algos'.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .config import RunConfig
from .ledger import check_inputs, checkpoint_id, config_fingerprint, new_checkpoint_id
from .report import Reporter

__all__ = ["Context", "PipelineError", "engine_config", "frozen_config", "load_data", "note_input", "require_stage_output",
           "check_reward_vocab", "load_model", "load_run_tokenizer", "reward_model_dir", "save_stage", "seed_everything", "tokenized", "trained_reward_model", "with_lora"]


class PipelineError(RuntimeError):
    """A problem with the run's inputs or outputs (missing previous stage, bad model, ...)."""


@dataclass
class Context:
    """One process's view of a run: its config, reporter, rank, and the data once loaded."""

    cfg: RunConfig
    reporter: Reporter
    rank: int = 0
    world_size: int = 1
    summary: dict = field(default_factory=dict)
    data: object = None  # rlhf_data.StageData, loaded once per process by load_data()
    # The checkpoint ids of the earlier stage outputs the running stage read (the ledger's "inputs").
    inputs: dict = field(default_factory=dict)
    resume: bool = False  # --resume: continue an unfinished stage from its saved state (rlhf_cli.resume)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def stage_dir(self, stage: str) -> Path:
        return self.out / stage

    def metrics_file(self, stage: str) -> Path:
        """``<out>/<stage>/metrics.jsonl``, written row by row while the stage runs (see :func:`save_stage`)."""
        return self.stage_dir(stage) / "metrics.jsonl"


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's global RNGs (each stage does, with its own offset of ``seed``)."""
    random.seed(seed)
    torch.manual_seed(seed)


def load_data(ctx: Context):
    """The run's per-stage datasets (``rlhf_data.StageData``), loaded once; every rank loads the
    same (the spec, split and blend are seeded)."""
    if ctx.data is None:
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
            from .data_report import unusable_lines

            for line in unusable_lines(ctx.data):  # records a stage could not use (an SFT-only source's RM part)
                ctx.reporter.print(f"data: {line}")
    return ctx.data


def tokenized(ctx: Context, tokenizer, records: list, stage: str, what: str, stats: dict) -> list[dict]:
    """Tokenize ``records`` for ``stage`` (cached by content), record the length-limit counts in
    ``stats[what]`` and say when samples were truncated or dropped."""
    from rlhf_data import default_cache_dir, tokenize_records

    from .data_report import tokenize_config

    d = ctx.cfg.data
    if not records:
        sets = ("sft", "rm", "rl", "sft_eval", "rm_eval", "rl_valid", "rl_eval")
        name = next((k for k in sets if getattr(ctx.data, k, None) is records), None)
        why = f": {ctx.data.why_empty(name)}" if name else ""
        raise PipelineError(f"data: no {what} samples (data.sources={d.sources!r}, data.split={d.split!r}){why}; "
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


def engine_config(cfg: RunConfig, *, lr: float, batch: int, grad_accum: int = 1, warmup: int = 0, decay: int = 0,
                  weight_decay: float = 0.0):
    """The ``rlhf_hybrid.EngineConfig`` of one model of the run (deepspeed.* and the rl.* generation keys)."""
    from rlhf_hybrid import EngineConfig

    ds = cfg.deepspeed
    return EngineConfig(zero_stage=ds.zero_stage, dtype=ds.dtype, lr=lr, weight_decay=weight_decay, micro_batch_size=batch,
                        grad_accum=grad_accum, offload_optimizer=ds.offload_optimizer, warmup_steps=warmup,
                        decay_steps=decay, generation=cfg.rl.generation,
                        inference_tp_size=cfg.rl.inference_tp_size,
                        cuda_graphs=cfg.rl.cuda_graphs, keep_decode_cache=cfg.rl.keep_decode_cache,
                        gather_quantization=cfg.rl.gather_quantization,
                        max_nonfinite_steps=cfg.train.max_nonfinite_steps,
                        gradient_checkpointing=cfg.model.gradient_checkpointing, offload_param=cfg.offload.params)


def frozen_config(cfg: RunConfig, engine, role: str):
    """The engine config of a frozen model (``role``: "reference" or "reward"): ``engine``'s, its parameter offload
    as ``offload.<role>`` says."""
    import dataclasses

    return dataclasses.replace(engine, offload_param=getattr(cfg.offload, role))


def trained_reward_model(cfg: RunConfig) -> str | None:
    """Where model.reward_model's trained head is ("sequence_classification" or the older "value_head"
    format), or None: no model.reward_model, or a plain causal LM (the rm stage trains its head)."""
    m = cfg.model
    if not m.reward_model:
        return None
    from rlhf_hybrid import trained_reward_head

    return trained_reward_head(m.reward_model, **m.tokenizer_kwargs(user_model=True))


def reward_model_dir(ctx: Context, needed_by: str) -> str:
    """The reward model stage 3 scores with (and starts the critic from): model.reward_model when it is a
    trained reward model (:func:`trained_reward_model`; said on the console), else ``<out>/rm`` (which must
    exist)."""
    if trained_reward_model(ctx.cfg):
        ctx.reporter.print(f"{needed_by}: scoring with the trained reward model {ctx.cfg.model.reward_model} "
                           f"(model.reward_model)")
        return ctx.cfg.model.reward_model
    return str(require_stage_output(ctx, "rm", needed_by))


def load_model(ctx: Context, name: str | Path, kind: str = "causal_lm", engine=None, *, trainable: bool = True,
               lora_stage: str = ""):
    """A causal LM (``kind="causal_lm"``) or a :class:`rlhf_hybrid.ValueModel` (``"value"``) with the run's
    model.* load settings (dtype, attn_implementation, trust_remote_code; revision for model.actor_model /
    model.reward_model themselves). Given the ``engine`` config it is for, under deepspeed.zero_stage=3 it
    is built partitioned from the first byte (``rlhf_hybrid.zero_init``; collective, in the engine's dtype);
    a policy that gets LoRA adapters in ``lora_stage`` is built whole (the adapters are added before the
    engine partitions it)."""
    from rlhf_hybrid import ValueModel, build_causal_lm, build_value_model, load_causal_lm

    m = ctx.cfg.model
    kw = m.load_kwargs(ctx.cfg.deepspeed.dtype, user_model=str(name) in (m.actor_model, m.reward_model))
    if engine is not None and engine.zero_stage == 3 and not (lora_stage and ctx.cfg.lora.applies_to(lora_stage)):
        build = build_value_model if kind == "value" else build_causal_lm
        return build(str(name), engine, trainable=trainable, **kw)
    return ValueModel.from_pretrained(str(name), **kw) if kind == "value" else load_causal_lm(str(name), **kw)


def check_reward_vocab(name: str | Path, model, tokenizer) -> None:
    """A reward model (or critic) must embed every token of the actor's tokenizer (PipelineError naming
    model.reward_model otherwise)."""
    if len(tokenizer) > model.config.vocab_size:
        raise PipelineError(f"model.reward_model: {str(name)!r} has vocab_size {model.config.vocab_size} but the "
                            f"actor's tokenizer has {len(tokenizer)} tokens; the reward model must share the actor's "
                            f"tokenizer")


def load_run_tokenizer(ctx: Context, name: str | Path):
    """``rlhf_hybrid.load_tokenizer`` with the run's trust_remote_code (and revision for model.actor_model)."""
    from rlhf_hybrid import load_tokenizer

    m = ctx.cfg.model
    return load_tokenizer(str(name), **m.tokenizer_kwargs(user_model=str(name) in (m.actor_model, m.reward_model)))


def with_lora(ctx: Context, model, stage: str):
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


def require_stage_output(ctx: Context, stage: str, needed_by: str) -> Path:
    """``<out>/<stage>``, or a PipelineError saying which stage to run first."""
    d = ctx.stage_dir(stage)
    if not (d / "config.json").is_file():
        raise PipelineError(
            f"--stage {needed_by} needs the {stage} stage's output at {d} (no config.json there); "
            f"run `rlhf run --stage {stage}` first or use --stage all"
        )
    return note_input(ctx, stage)


def note_input(ctx: Context, stage: str) -> Path:
    """``<out>/<stage>``, read by the running stage: checked against the ledger's reading rule
    (:func:`rlhf_cli.ledger.check_inputs`) and recorded as one of its inputs."""
    d = ctx.stage_dir(stage)
    check_inputs(ctx.out, stage)
    cid = checkpoint_id(d)
    if cid is not None:
        ctx.inputs[stage] = cid
    return d


def _run_card(ctx: Context, stage: str, metrics: dict) -> str:
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
    config = asdict(ctx.cfg)
    card = {
        "stage": stage,
        "checkpoint_id": new_checkpoint_id(),
        "inputs": dict(ctx.inputs),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config_fingerprint": config_fingerprint(config),
        "command": " ".join(sys.argv),
        "seed": ctx.cfg.seed,
        "world_size": ctx.world_size,
        "config": config,
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


def save_stage(ctx: Context, engine, stage: str, tokenizer, metrics: dict) -> None:
    """Write ``<out>/<stage>`` atomically: model, tokenizer, run card (collective under ZeRO-3).

    The stage's metrics.jsonl, written into ``<out>/<stage>`` as the stage ran (so that it can be read and
    plotted meanwhile), is carried into the new directory, which then replaces the old one in one rename:
    a stage stopped early never leaves a ``config.json`` that a later stage would take for a checkpoint.
    """
    from rlhf_hybrid import save_hf_checkpoint

    state = engine.export_state_dict()
    if getattr(engine, "nonfinite_skipped", 0):  # only when it happened: valid runs' summaries stay as they were
        metrics["nonfinite_skipped_steps"] = engine.nonfinite_skipped
    if ctx.is_main:
        jsonl = ctx.metrics_file(stage)
        extra = {"run_card.json": _run_card(ctx, stage, metrics)}
        if jsonl.exists():
            extra["metrics.jsonl"] = jsonl.read_text()
        for f in ctx.stage_dir(stage).glob("eval_episodes_*.jsonl"):  # an env stage's held-out episodes
            extra[f.name] = f.read_text()
        save_hf_checkpoint(engine.module, state, str(ctx.stage_dir(stage)), tokenizer, extra_files=extra)
