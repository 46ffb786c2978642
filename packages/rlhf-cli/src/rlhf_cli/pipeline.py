"""The pipeline: SFT -> reward model -> stage 3 (PPO, GRPO, DPO, ...), composed from the other packages.

This module only orders the stages and writes the summary; each stage is a module of
:mod:`rlhf_cli.stages` driving an rlhf-algos algorithm (``SFT``, ``RM``, then the chosen one). Each
stage reads the previous stage's output directory, so stages can be run one at a time
(``rlhf run --stage rm`` after ``--stage sft``) or together (``--stage all``).
"""

from __future__ import annotations

import json
import math
import time

from rlhf_algos import ModelReward, TextReward

from .config import RunConfig, resolved_settings, to_yaml
from .context import Context, PipelineError, load_data
from .evaluation import evaluate_policy
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
    scores), then the algorithm; ``sft``, ``rm`` or the algorithm's name alone."""
    cls = cfg.algorithm()
    if stage != "all":
        return [stage]
    needs_rm = cls.kind == "online" and cfg.rl.reward == "model"
    return ["sft", *(["rm"] if needs_rm else []), cls.name]


def run_pipeline(cfg: RunConfig, stages: list[str], reporter: Reporter, rank: int = 0, world_size: int = 1) -> dict:
    """Run ``stages`` in order; write ``<out>/config.yaml`` first, then after each stage ``<out>/summary.json``
    (merged with an earlier one) and, with report.plots, the plots and ``<out>/report.md``."""
    cfg.report.check_installed()  # every rank, before any work: a missing sink package stops them all
    ctx = Context(cfg, reporter, rank, world_size)
    if ctx.is_main:
        write_run_config(cfg, ctx.out)
        reporter.sinks = make_sinks(cfg.report.sinks(), ctx.out, cfg.report.project, resolved_settings(cfg))
    try:
        return _run_stages(ctx, stages)
    finally:
        reporter.sinks = []


def _run_stages(ctx: Context, stages: list[str]) -> dict:
    from rlhf_hybrid import barrier, write_json_atomic

    cfg, reporter = ctx.cfg, ctx.reporter
    summary_path = ctx.out / "summary.json"
    summary: dict = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            summary = {}
    summary.setdefault("wall_seconds", {})
    data = load_data(ctx)  # load (and check) the data before any stage starts
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
        if ctx.is_main:  # after each stage, so that `rlhf report` shows the finished stages of a running run
            write_json_atomic(summary_path, summary)
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
            rows.append((stage, f"{name}, sampled", f(s.get(f"{m}_sampled_before")), f(s.get(f"{m}_sampled_after")), ""))
        rows.append((stage, "KL to reference", f(s.get("kl_to_ref_before")), f(s.get("kl_to_ref_after")),
                     "" if m != "none" else f"{w.get(stage, 0):.0f} s"))
    return rows
