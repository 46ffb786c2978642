"""The pipeline: SFT -> reward model -> stage 3 (PPO, GRPO, DPO, ...), composed from the other packages.

This module only orders the stages and writes the summary; each stage is a module of
:mod:`rlhf_cli.stages` driving an rlhf-algos algorithm (``SFT``, ``RM``, then the chosen one). Each
stage reads the previous stage's output directory, so stages can be run one at a time
(``rlhf run --stage rm`` after ``--stage sft``) or together (``--stage all``).
"""

from __future__ import annotations

import json
import math
import shutil
import time

from rlhf_algos import ModelReward, TextReward

from .config import RunConfig, resolved_settings, to_dict, to_yaml
from .context import Context, PipelineError, load_data, trained_reward_model
from .data_report import check_stage_data
from .env_stage import check_env_run
from .evaluation import evaluate_policy
from .ledger import checkpoint_id, clean_orphans, remove_stale, write_ledger
from .report import Reporter
from .run_report import write_report
from .sinks import make_sinks
from .stages import run_offline, run_online, run_rm, run_sft

__all__ = ["STAGES", "Context", "PipelineError", "run_pipeline", "stages_for", "summary_rows", "write_run_config",
           # importable from here as before the split (now in rlhf_algos.rewards and rlhf_cli.evaluation)
           "ModelReward", "TextReward", "evaluate_policy"]

STAGES = ("sft", "rm", "ppo")


def stages_for(cfg: RunConfig, stage: str) -> list[str]:
    """The stages ``--stage`` runs: ``all`` = sft, rm (when the algorithm trains on a reward model's
    scores and model.reward_model is no trained reward model), then the algorithm; ``sft``, ``rm`` or the
    algorithm's name alone."""
    cls = cfg.algorithm()
    if stage != "all":
        return [stage]
    needs_rm = cls.kind == "online" and cfg.rl.reward == "model" and trained_reward_model(cfg) is None
    return ["sft", *(["rm"] if needs_rm else []), cls.name]


def run_pipeline(cfg: RunConfig, stages: list[str], reporter: Reporter, rank: int = 0, world_size: int = 1,
                 overwrite: bool = False, resume: bool = False) -> dict:
    """Run ``stages`` in order; write ``<out>/config.yaml`` first, then after each stage ``<out>/summary.json``
    (merged with an earlier one), ``<out>/ledger.json`` and, with report.plots, the plots and ``<out>/report.md``.

    Before anything trains, :func:`_plan`: with ``resume``, finished stages are skipped and the
    unfinished one continues from its saved state (:mod:`rlhf_cli.resume`); the ledger's re-running
    rule (:mod:`rlhf_cli.ledger`): finished later stages trained from an output about to be replaced
    are an error, or deleted with ``overwrite`` (which also discards saved states).
    """
    cfg.report.check_installed()  # every rank, before any work: a missing sink package stops them all
    ctx = Context(cfg, reporter, rank, world_size, resume=resume)
    if ctx.is_main:
        write_run_config(cfg, ctx.out)
        reporter.sinks = make_sinks(cfg.report.sinks(), ctx.out, cfg.report.project, resolved_settings(cfg))
    try:
        return _run_stages(ctx, stages, overwrite)
    finally:
        reporter.sinks = []


def _run_stages(ctx: Context, stages: list[str], overwrite: bool) -> dict:
    from rlhf_hybrid import NonFiniteError, barrier, write_json_atomic

    from .errors import nonfinite_message

    cfg, reporter = ctx.cfg, ctx.reporter
    summary_path = ctx.out / "summary.json"
    stages, summary = _plan(ctx, stages, overwrite)
    barrier()
    data = load_data(ctx)  # load (and check) the data before any stage starts
    algo_cls = cfg.algorithm()
    check_env_run(ctx, data, stages, algo_cls)  # env.* against the data and the stages (the tool demo has no rm)
    check_stage_data(cfg, data, stages, algo_cls.kind)  # a stage without samples fails now, not after the others
    if algo_cls.name in stages and algo_cls.kind == "online" and cfg.rl.reward == "verifier" and data.verifier is None:
        raise PipelineError(f"rl.reward: 'verifier' needs data with a ground-truth verifier (the demo task); "
                            f"data.sources={cfg.data.sources!r} has none; use rl.reward=model or a registered "
                            f"reward function")
    runners = {"sft": run_sft, "rm": run_rm, algo_cls.name: run_online if algo_cls.kind == "online" else run_offline}
    t_all = time.perf_counter()
    for stage in stages:
        t0 = time.perf_counter()
        ctx.inputs = {}  # filled as the stage reads earlier outputs (the ledger's inputs)
        try:
            result = runners[stage](ctx)
        except NonFiniteError as e:  # the engines' guard (rlhf_hybrid.guards): name the stage and the setting
            raise PipelineError(nonfinite_message(cfg, stage, e)) from None
        result.pop("wall_seconds", None)
        summary[stage] = result
        summary["wall_seconds"][stage] = round(time.perf_counter() - t0, 2)
        if ctx.is_main:  # after each stage: a crash in a later one keeps it; `rlhf report` shows it meanwhile
            write_json_atomic(summary_path, summary)
            write_ledger(ctx.out, to_dict(cfg))
            if cfg.report.plots:
                write_report(ctx.out, summary, reporter.print)
        barrier()
    summary["wall_seconds"]["total"] = round(time.perf_counter() - t_all, 2)
    if ctx.is_main:
        write_json_atomic(summary_path, summary)
        if cfg.report.plots:
            path = write_report(ctx.out, summary, reporter.print)
            reporter.print(f"report: {path}")
    return summary


def _plan(ctx: Context, stages: list[str], overwrite: bool) -> tuple[list[str], dict]:
    """The stages to run and the summary so far (see :func:`run_pipeline`)."""
    summary: dict = {}
    if (ctx.out / "summary.json").is_file():
        try:
            summary = json.loads((ctx.out / "summary.json").read_text())
        except json.JSONDecodeError:
            summary = {}
    summary.setdefault("wall_seconds", {})
    if ctx.is_main:
        for line in clean_orphans(ctx.out):
            ctx.reporter.print(line)
    if ctx.resume:  # a stage is finished when its output and summary are there and no saved state is left
        done = [s for s in stages if s in summary and checkpoint_id(ctx.stage_dir(s)) is not None
                and not (ctx.out / ".resume" / s).is_dir()]
        if done:
            ctx.reporter.print(f"--resume: {', '.join(done)} finished already (see summary.json); not run again")
        stages = [s for s in stages if s not in done]
    # The error is the same on every rank (the same files); with --overwrite only rank 0 deletes.
    if ctx.is_main or not overwrite:
        removed = remove_stale(ctx.out, stages, summary, overwrite)
        if removed:
            ctx.reporter.print(f"--overwrite: deleted {', '.join(f'{ctx.out / s}/' for s in removed)} (trained from "
                               f"the {', '.join(stages)} output this run replaces)")
    if overwrite and ctx.is_main:
        for s in stages:
            shutil.rmtree(ctx.out / ".resume" / s, ignore_errors=True)
    return stages, summary
def write_run_config(cfg: RunConfig, out) -> None:
    """``<out>/config.yaml``: every resolved setting; ``rlhf run --config <out>/config.yaml`` runs the same."""
    import os
    import sys

    header = (f"Every resolved setting of the run written by:\n  {' '.join(sys.argv)}\n"
              f"Reproduce it with: rlhf run --stage <stage> --config {out}/config.yaml [--out OTHER_DIR]")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"config.yaml.tmp-{os.getpid()}"
    tmp.write_text(to_yaml(cfg, header))
    os.replace(tmp, out / "config.yaml")


def summary_rows(summary: dict) -> list[tuple[str, str, str, str, str]]:
    """The rows of the summary table: (stage, metric, before, after, wall time)."""
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
            if f"{m}_sampled_before" in s:  # (an env stage scores greedy episodes only)
                rows.append((stage, f"{name}, sampled", f(s.get(f"{m}_sampled_before")),
                             f(s.get(f"{m}_sampled_after")), ""))
        for rate in ("tool_call_rate", "copy_error_rate"):  # the tool demo's (rlhf_cli.env_stage)
            if f"{rate}_before" in s:
                rows.append((stage, f"{rate.replace('_', ' ')}, greedy", f(s.get(f"{rate}_before")),
                             f(s.get(f"{rate}_after")), ""))
        rows.append((stage, "KL to reference", f(s.get("kl_to_ref_before")), f(s.get("kl_to_ref_after")),
                     "" if m != "none" else f"{w.get(stage, 0):.0f} s"))
    return rows
