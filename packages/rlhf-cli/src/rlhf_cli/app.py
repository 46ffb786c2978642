"""The ``rlhf`` command line. Thin: parse, load the config, call one library function."""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path

import typer

from .config import ConfigError, all_keys, load_config
from .envs import envs_app
from .errors import fail as _fail
from .errors import user_errors
from .launch import launched, relaunch
from .run_report import report_command

app = typer.Typer(
    name="rlhf",
    help="RLHF for chat language models: SFT -> reward model -> PPO (or GRPO, RLOO, DPO, ...) in one command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
algos_app = typer.Typer(help="Registered algorithms.", no_args_is_help=True)
app.add_typer(algos_app, name="algos")
data_app = typer.Typer(help="Data sources, splits and blends (docs/data.md).", no_args_is_help=True)
app.add_typer(data_app, name="data")
bench_app = typer.Typer(help="Benchmarks (docs/performance.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
app.add_typer(envs_app, name="envs")
app.command("report")(report_command)

STAGE_CHOICES = ("sft", "rm", "all")  # or the name of a registered algorithm


def _quiet_libraries() -> None:
    # Library chatter that buries the progress bars; our own errors still surface.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="deepspeed")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def _keys_help() -> str:
    return "\n".join(f"{key} ({t.__name__}, default {default!r}): {doc}" for key, (t, default, doc) in all_keys().items())


@app.command(
    help="Run pipeline stages: sft, rm, an algorithm (ppo, grpo, rloo, dpo, ... : `rlhf algos list`), or all "
    "(sft -> rm -> the algorithm; without rm for preference optimisation or a reward function). Settings come "
    "from --config (YAML), then KEY=VALUE overrides, then the explicit options. See `rlhf config-keys` for "
    "every key and `rlhf algos show NAME` for an algorithm's algo.* settings."
)
@user_errors
def run(
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...",
                                          help="Config overrides with dotted keys, e.g. algo.kl_coef=0.05 sft.epochs=3."),
    stage: str = typer.Option("all", "--stage", "-s",
                              help="Which stage(s): sft, rm, all, or an algorithm's name (runs that stage 3)."),
    algo: str = typer.Option(None, "--algo", "-a",
                             help="Stage-3 algorithm for --stage all (default ppo); same as algo.name=NAME."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file (see configs/)."),
    out: str = typer.Option(None, "--out", "-o", help="Output directory (default: rlhf-out)."),
    actor_model: str = typer.Option(None, "--actor-model",
                                    help="HF hub name or local directory of the causal LM to start SFT from "
                                         "(default: the demo's tiny Llama)."),
    reward_model: str = typer.Option(None, "--reward-model",
                                     help="HF hub name or local directory of the reward model: a trained one "
                                          "(sequence classification, num_labels=1) is used as is by stage 3 (no rm "
                                          "stage); a causal LM is the rm stage's backbone (default: the SFT model)."),
    data: str = typer.Option(None, "--data", "-d",
                             help="Data spec (data.sources): 'demo', a source name, a local file, or weighted sources, "
                                  "e.g. 'hh:./hh.jsonl:0.7,shp:0.3' (docs/data.md)."),
    zero_stage: int = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage 0-3."),
    nproc: int = typer.Option(None, "--nproc", help="Processes on this machine (>1 relaunches under torchrun)."),
    seed: int = typer.Option(None, "--seed", help="Global seed."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete finished later stages trained from an output "
                                   "this run replaces, and saved states (docs/pipeline.md, 'Run ledger')."),
    resume: bool = typer.Option(False, "--resume", help="Skip finished stages; continue an unfinished one from its "
                                "last saved state (docs/pipeline.md, 'Checkpoints and resume')."),
) -> None:
    algo = _stage_algorithm(stage, algo)
    try:
        cfg = load_config(str(config) if config else None, overrides or [], out=out, seed=seed,
                          **{"model.actor_model": actor_model, "model.reward_model": reward_model,
                             "data.sources": data, "deepspeed.zero_stage": zero_stage, "deepspeed.nproc": nproc,
                             "algo.name": algo})
    except ConfigError as e:
        _fail(str(e))
    from .pipeline import stages_for
    from .preflight import preflight_run

    preflight_run(cfg, stages_for(cfg, stage))  # before any model is built: out dir, free space, model dirs
    if cfg.deepspeed.nproc > 1 and not launched():  # under torchrun, deepspeed or srun: this is one rank
        relaunch(cfg.deepspeed.nproc)
        return
    _run_stages(cfg, stage, overwrite, resume)


def _stage_algorithm(stage: str, algo: str | None) -> str | None:
    """The algorithm ``--stage``/``--algo`` name (``--stage ppo`` = ``--algo ppo``); None: the config's."""
    if stage in STAGE_CHOICES:
        return algo
    from rlhf_algos import available_algorithms

    algos = available_algorithms()
    if stage not in algos:
        _fail(f"--stage: {stage!r} is not a stage; allowed: {', '.join(STAGE_CHOICES)} or an algorithm: "
              f"{', '.join(sorted(algos))}")
    if algo is not None and algo != stage:
        _fail(f"--algo: {algo!r} contradicts --stage {stage}; give one of them")
    return stage


def _run_stages(cfg, stage: str, overwrite: bool = False, resume: bool = False) -> None:
    """Run ``stage`` ("all", "sft", ...) of ``cfg`` in this process (one rank under torchrun)."""
    _quiet_libraries()
    from rlhf_hybrid import init_distributed

    from .pipeline import PipelineError, run_pipeline, stages_for, summary_rows

    stages = stages_for(cfg, stage)
    from .report import Reporter

    if not os.environ.get("DS_ACCELERATOR"):
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"
    info = init_distributed(timeout_s=cfg.distributed.timeout_s)
    reporter = Reporter(enabled=info.is_main)
    reporter.print(f"[bold]rlhf run[/] stages={','.join(stages)} out={cfg.out} world_size={info.world_size} "
                   f"zero_stage={cfg.deepspeed.zero_stage} device={info.device}")
    from .resume import Stopped, install_stop_handlers

    install_stop_handlers()  # SIGTERM/SIGINT: save the state at the next step, then stop (rlhf_cli.resume)
    try:
        summary = run_pipeline(cfg, stages, reporter, info.rank, info.world_size, overwrite=overwrite, resume=resume)
    except Stopped as e:
        reporter.print(str(e))
        raise typer.Exit(0) from None
    except (PipelineError, FileNotFoundError, ValueError) as e:
        _fail(str(e))
    reporter.summary_table(summary_rows(summary))
    reporter.print(f"outputs in {cfg.out}/ (summary.json, " + ", ".join(f"{s}/" for s in stages) + ")")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@app.command(help="Talk to a trained model: one answer with --prompt, or a multi-turn session without it "
                  "(each answer sees the conversation so far; /reset forgets it, /exit or Ctrl-D ends it). "
                  "Answers stream as they are generated. With --env NAME the model plays episodes against that "
                  "environment instead (docs/cli.md).")
@user_errors
def chat(
    model: Path = typer.Option(..., "--model", "-m", help="A model directory written by `rlhf run` (e.g. rlhf-out/ppo)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Answer this one message and exit."),
    system: str = typer.Option(None, "--system", "-s", help="A system prompt, first in every conversation."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Answer length limit in tokens (>= 1)."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy decoding; > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (with --temperature > 0): sample from the "
                                "most likely tokens holding this much probability; in (0, 1], 1 = all."),
    show_prompt: bool = typer.Option(False, "--show-prompt", help="Print each prompt as the model sees it "
                                     "(chat template applied, history included) on stderr."),
    env: str = typer.Option(None, "--env", help="Play episodes against this registered environment (`rlhf envs "
                            "list`): each message is a task; the model's turns, the environment's replies, then "
                            "the end reason and rewards are shown. --max-new-tokens is then per model turn."),
    env_arg: list[str] = typer.Option(None, "--env-arg", metavar="KEY=VALUE", help="An argument of the "
                                      "environment's constructor (VALUE read as YAML); repeatable; with --env."),
    meta: list[str] = typer.Option(None, "--meta", metavar="KEY=VALUE", help="A field of the prompt record the "
                                   "environment's reset reads (VALUE read as YAML); repeatable; with --env."),
    max_turns: int = typer.Option(None, "--max-turns", help="Model turns per episode at most (>= 1, default 4); "
                                  "with --env."),
    max_total_tokens: int = typer.Option(None, "--max-total-tokens", help="Tokens after the prompt per episode, "
                                         "model and environment together (>= 1; default: what the model's context "
                                         "leaves); with --env."),
) -> None:
    _quiet_libraries()
    from .chat import chat as run_chat

    run_chat(str(model), prompt, {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p},
             system=system, show_prompt=show_prompt, env={"name": env, "env_args": env_arg, "meta": meta,
                                                          "max_turns": max_turns, "max_total_tokens": max_total_tokens})


@app.command("config-keys", help="List every config key with its type, default and meaning.")
def config_keys() -> None:
    typer.echo(_keys_help())


@algos_app.command("list", help="Every algorithm registered under the entry-point group rlhf.algorithms.")
def algos_list() -> None:
    from rlhf_algos import available_algorithms

    algos = available_algorithms()
    if not algos:
        typer.echo("no algorithms registered under the entry-point group 'rlhf.algorithms'")
        return
    for name, cls in sorted(algos.items()):
        typer.echo(f"{name}\t{cls.kind}\tdata={cls.data_kind}\tmodels={','.join(cls.required_models)}\t"
                   f"{cls.description}")


@algos_app.command("show", help="An algorithm's config fields (set as algo.FIELD=VALUE) with defaults and help.")
def algos_show(name: str = typer.Argument(..., help="A name from `rlhf algos list`.")) -> None:
    import dataclasses
    import typing

    from rlhf_algos import get_algorithm

    from .config import RLSection, RunConfig, field_help

    try:
        cls = get_algorithm(name)
    except ValueError as e:
        _fail(str(e))
    typer.echo(f"{name}: {cls.description}")
    typer.echo(f"kind={cls.kind}  data={cls.data_kind}  models={','.join(cls.required_models)}  "
               f"({cls.__module__}:{cls.__qualname__})")
    hints, docs = typing.get_type_hints(cls.config_class), field_help(cls.config_class)
    default, rl, shared = cls.config_class(), RLSection(), RLSection.shared_with(cls)
    # stages 1 and 2 (sft, rm) take their settings from their own config sections, sft.* and rm.*
    prefix = "algo" if cls.kind in ("online", "offline") else cls.config_class.section
    section = {f.name: f for f in dataclasses.fields(RunConfig)}.get(prefix) if prefix != "algo" else None
    run_default = section.default_factory() if section is not None else None  # sft.* / rm.*: the run's defaults
    for f in dataclasses.fields(cls.config_class):
        t = getattr(hints[f.name], "__name__", str(hints[f.name]))
        if f.name in shared:  # set by the run's rl.* keys, whatever the class default
            key, value = f"rl.{shared[f.name]}", getattr(rl, shared[f.name])
            t = type(value).__name__  # rl.padding_free (bool) sets batch_layout (str)
        else:
            key, value = f"{prefix}.{f.name}", getattr(run_default, f.name, getattr(default, f.name))
        typer.echo(f"{key} ({t}, default {value!r}): {docs.get(f.name, '')}")


@data_app.command("sources", help="Every data source registered under the entry-point group rlhf.data.sources.")
@user_errors
def data_sources() -> None:
    from rlhf_data import available_sources

    for name, cls in sorted(available_sources().items()):
        where = cls.hub_id or "(no default dataset)"
        typer.echo(f"{name}\t{cls.record_kind}\t{where}\t{cls.description}")


@data_app.command(
    "inspect",
    help="Show what a data spec gives each stage: samples per source and stage, prompt/response length "
    "histograms in tokens, truncated/dropped counts, and three rendered examples. Data settings (split, "
    "length limits, truncation, ...) come from --config and KEY=VALUE overrides exactly as in `rlhf run`.",
)
@user_errors
def data_inspect(
    spec: str = typer.Argument(None, metavar="[SPEC]",
                               help="Data spec, e.g. 'hh:./hh.jsonl:0.7,shp:0.3' (default: data.sources)."),
    overrides: list[str] = typer.Argument(None, metavar="[KEY=VALUE]...", help="Config overrides, e.g. data.split=2,4,4."),
    config: Path = typer.Option(None, "--config", "-c", help="YAML config file."),
    tokenizer: str = typer.Option(None, "--tokenizer", "-t",
                                  help="HF hub name or local directory of the tokenizer (default: model.actor_model's, "
                                       "else a byte-level BPE trained on the data, as `rlhf run` does for the tiny model)."),
    examples: int = typer.Option(3, "--examples", "-n", help="Rendered examples per source."),
) -> None:
    if spec is not None and re.match(r"^[a-z_]+(\.[a-z_]+)+=", spec):
        overrides, spec = [spec, *(overrides or [])], None  # no spec: the first positional is an override
    if examples < 0:
        _fail(f"--examples: must be >= 0, got {examples}")
    try:
        cfg = load_config(str(config) if config else None, overrides or [], **{"data.sources": spec})
    except ConfigError as e:
        _fail(str(e))
    _quiet_libraries()
    from rlhf_data import DataError

    from .data_report import inspect_data

    try:
        inspect_data(cfg, tokenizer, examples)
    except (DataError, OSError, ValueError) as e:
        _fail(str(e))


@bench_app.command(
    "generate",
    help="Generation throughput in one run on the same random weights: transformers generate, transformers with "
    "a static cache + torch.compile (CUDA only), rlhf-hybrid's fast path over the plain model, and through "
    "HybridEngine under ZeRO-2 (layout = views of the training weights) and ZeRO-3 (gather included, exact or int8). "
    "Then train mode: one optimizer step under ZeRO-2/ZeRO-3 against a plain PyTorch bf16-autocast step of the same "
    "model and batch. Defaults: on a GPU the OPT-1.3B and Llama-3.2-1B shapes in bf16, batch 8/32/64/128, prompt "
    "256, 256 new tokens, train batch 8 x 512; on a CPU the tiny shape.",
)
def bench_generate(
    shape: list[str] = typer.Option(None, "--shape", help="opt-1.3b, llama-3.2-1b or tiny (repeatable)."),
    batch: list[int] = typer.Option(None, "--batch", help="Batch sizes (repeatable)."),
    prompt_len: int = typer.Option(None, "--prompt-len", help="Prompt tokens (default 256 on GPU, 16 on CPU)."),
    new_tokens: int = typer.Option(None, "--new-tokens", help="Generated tokens (default 256 on GPU, 16 on CPU)."),
    method: list[str] = typer.Option(None, "--method", help="hf, hf-static-compile, fast, fast-zero2, fast-zero3, "
                                     "fast-zero3-int8 (repeatable; default all)."),
    dtype: str = typer.Option(None, "--dtype", help="bf16 or fp32 (default bf16 on GPU, fp32 on CPU)."),
    train_method: list[str] = typer.Option(None, "--train-method", help="plain-amp, zero2, zero3 (repeatable; default "
                                           "all; 'none' skips the train-mode table). plain-amp is the baseline."),
    train_batch: int = typer.Option(None, "--train-batch", help="Train-mode batch (default 8 on GPU, 2 on CPU)."),
    train_seq_len: int = typer.Option(None, "--train-seq-len", help="Train-mode tokens per row (default 512 on GPU, "
                                      "32 on CPU)."),
    out: Path = typer.Option(None, "--out", help="Also write the report as JSON here."),
) -> None:
    _quiet_libraries()
    import torch
    from rlhf_hybrid import bench

    gpu = torch.cuda.is_available()
    shapes = shape or (["opt-1.3b", "llama-3.2-1b"] if gpu else ["tiny"])
    batches = batch or ([8, 32, 64, 128] if gpu else [4])
    methods = method or list(bench.METHODS)
    dtype = dtype or ("bf16" if gpu else "fp32")
    for s in shapes:
        if s not in bench.SHAPES:
            _fail(f"--shape: {s!r} is not allowed; allowed: {', '.join(bench.SHAPES)}")
    for m in methods:
        if m not in bench.METHODS:
            _fail(f"--method: {m!r} is not allowed; allowed: {', '.join(bench.METHODS)}")
    if dtype not in ("bf16", "fp32"):
        _fail(f"--dtype: {dtype!r} is not allowed; allowed: bf16, fp32")
    train_methods = [] if train_method == ["none"] else (train_method or list(bench.TRAIN_METHODS))
    for m in train_methods:
        if m not in bench.TRAIN_METHODS:
            _fail(f"--train-method: {m!r} is not allowed; allowed: {', '.join(bench.TRAIN_METHODS)}, none")
    train_batch, train_seq_len = train_batch or (8 if gpu else 2), train_seq_len or (512 if gpu else 32)
    for name, v in (("--batch", min(batches)), ("--prompt-len", prompt_len or 1), ("--new-tokens", new_tokens or 1),
                    ("--train-batch", train_batch), ("--train-seq-len", train_seq_len)):
        if v < 1:
            _fail(f"{name}: must be >= 1, got {v}")
    if not os.environ.get("DS_ACCELERATOR") and not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    device = torch.device("cuda" if gpu else "cpu")
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    report = bench.run(shapes, batches, prompt_len or (256 if gpu else 16), new_tokens or (256 if gpu else 16), methods,
                       device, torch_dtype, " ".join(sys.argv))
    if train_methods:
        bench.run_train(report, shapes, train_batch, train_seq_len, train_methods, device, torch_dtype)
    _print_generate_tables(report, train_batch, train_seq_len)
    if out:
        out.write_text(bench.to_json(report))


def _print_generate_tables(report, train_batch: int, train_seq_len: int) -> None:
    """The `rlhf bench generate` report as rich tables: generation, then train mode (when measured)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"generation on {report.device}, {report.dtype}, prompt {report.prompt_len} + "
                    f"{report.new_tokens} new tokens, copy bandwidth {report.copy_bandwidth_gbs:.1f} GB/s")
    for col in ("shape", "method", "batch", "tokens/s", "ms/step", "floor ms/step", "peak GiB", "vs hf", "note"):
        t.add_column(col, justify="left" if col in ("shape", "method", "note") else "right")

    def f(v, spec):
        return "-" if v is None else format(v, spec)

    for r in report.rows:
        t.add_row(r.shape, r.method, str(r.batch), f(r.tokens_per_s, ",.0f"), f(r.ms_per_step, ".2f"),
                  f(r.floor_ms_per_step, ".3f"), f(r.peak_mem_gib, ".2f"), f(r.speedup_vs_hf, ".2f"), r.note)
    Console().print(t)
    if report.train_rows:
        t = Table(title=f"train mode: one optimizer step, batch {train_batch} x {train_seq_len} tokens, {report.dtype}")
        for col in ("shape", "method", "ms/step", "peak GiB", "vs plain-amp"):
            t.add_column(col, justify="left" if col in ("shape", "method") else "right")
        for r in report.train_rows:
            t.add_row(r.shape, r.method, f(r.ms_per_step, ".1f"), f(r.peak_mem_gib, ".2f"), f(r.ratio_vs_plain, ".2f"))
        Console().print(t)


@bench_app.command(
    "ppo",
    help="Full PPO iterations (generate, score, learn) with our generate mode against the baseline built in the "
    "same run from transformers generate + DeepSpeed ZeRO training (what DeepSpeed-Chat does without its hybrid "
    "engine): samples/s and the phase breakdown. Defaults: on a GPU an OPT-1.3B-shape actor with OPT-350m-shape "
    "critic and reward model, batch 64, 256 + 256 tokens, bf16, ZeRO-2; on a CPU tiny shapes.",
)
def bench_ppo(
    actor_shape: str = typer.Option(None, "--actor-shape", help="opt-1.3b, llama-3.2-1b or tiny."),
    critic_shape: str = typer.Option(None, "--critic-shape", help="opt-350m or tiny-critic (critic and reward model)."),
    batch: int = typer.Option(None, "--batch", help="Prompts per iteration (default 64 on GPU, 4 on CPU)."),
    prompt_len: int = typer.Option(None, "--prompt-len", help="Prompt tokens (default 256 on GPU, 8 on CPU)."),
    new_tokens: int = typer.Option(None, "--new-tokens", help="Answer tokens (default 256 on GPU, 8 on CPU)."),
    iterations: int = typer.Option(3, "--iterations", help="Timed iterations after one warm-up."),
    zero_stage: int = typer.Option(None, "--zero-stage", help="DeepSpeed ZeRO stage (default 2 on GPU, 0 on CPU)."),
    dtype: str = typer.Option(None, "--dtype", help="bf16 or fp32 (default bf16 on GPU, fp32 on CPU)."),
    out: Path = typer.Option(None, "--out", help="Also write the report as JSON here."),
) -> None:
    _quiet_libraries()
    import torch
    from rlhf_hybrid import bench

    gpu = torch.cuda.is_available()
    actor_shape = actor_shape or ("opt-1.3b" if gpu else "tiny")
    critic_shape = critic_shape or ("opt-350m" if gpu else "tiny-critic")
    for opt, v in (("--actor-shape", actor_shape), ("--critic-shape", critic_shape)):
        if v not in bench.SHAPES:
            _fail(f"{opt}: {v!r} is not allowed; allowed: {', '.join(bench.SHAPES)}")
    dtype = dtype or ("bf16" if gpu else "fp32")
    if dtype not in ("bf16", "fp32"):
        _fail(f"--dtype: {dtype!r} is not allowed; allowed: bf16, fp32")
    zero_stage = (2 if gpu else 0) if zero_stage is None else zero_stage
    if zero_stage not in (0, 1, 2, 3):
        _fail(f"--zero-stage: {zero_stage} is not allowed; allowed: 0, 1, 2, 3")
    batch, prompt_len, new_tokens = batch or (64 if gpu else 4), prompt_len or (256 if gpu else 8), new_tokens or (
        256 if gpu else 8)
    for opt, v in (("--batch", batch), ("--prompt-len", prompt_len), ("--new-tokens", new_tokens),
                   ("--iterations", iterations)):
        if v < 1:
            _fail(f"{opt}: must be >= 1, got {v}")
    if not os.environ.get("DS_ACCELERATOR") and not gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    from . import bench_ppo as bp

    report = bp.run(actor_shape, critic_shape, batch, prompt_len, new_tokens, iterations, zero_stage,
                     {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                     torch.device("cuda" if gpu else "cpu"), " ".join(sys.argv))
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"PPO on {report.device}: actor {actor_shape}, critic/reward {critic_shape}, batch {batch}, "
                    f"{prompt_len}+{new_tokens} tokens, ZeRO-{zero_stage}, {dtype}")
    for col in ("mode", "samples/s", "s/iteration", "gather s", "generate s", "score s", "train s", "peak GiB",
                "vs baseline"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for r in report.rows:
        t.add_row(r.mode, f"{r.samples_per_s:.2f}", f"{r.iteration_s:.3f}", f"{r.gather_s:.3f}", f"{r.generate_s:.3f}",
                  f"{r.score_s:.3f}", f"{r.train_s:.3f}", "-" if r.peak_mem_gib is None else f"{r.peak_mem_gib:.2f}",
                  f"{r.speedup_vs_baseline:.2f}")
    Console().print(t)
    if out:
        out.write_text(bp.to_json(report))


@app.command(help="Print the versions and devices this installation sees.")
def env() -> None:
    import platform

    import torch

    typer.echo(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.cuda.is_available()}")
    for mod in ("transformers", "deepspeed", "datasets", "rlhf_data", "rlhf_kernels", "rlhf_hybrid", "rlhf_algos",
                "rlhf_cli"):
        try:
            m = __import__(mod)
            typer.echo(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # pragma: no cover
            typer.echo(f"{mod} not importable: {e}")


def main() -> None:
    app()
