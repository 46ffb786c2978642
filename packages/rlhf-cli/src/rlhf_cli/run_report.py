"""A run's plots and ``<out>/report.md``, built from the stages' metrics.jsonl files; ``rlhf report OUT``.

``rlhf run`` writes them after each stage and at the end (``report.plots``, on by default); ``rlhf report``
rebuilds them at any time, also while a run is in progress (each metrics.jsonl grows row by row). The
curves need matplotlib (``pip install 'rlhf-cli[plots]'``); without it report.md has the tables only.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import typer

__all__ = ["PLOTTED", "plot_stage", "read_metrics", "report_command", "write_report"]

# What a stage's figure shows, in this order, where the stage logs it: losses, reward, KL, entropy,
# validation and held-out scores, reward-model accuracy, then the optimizer's lr and gradient norm.
# A name ending in "*" matches every metric with that prefix.
PLOTTED = ("loss", "eval_loss", "policy_loss", "value_loss", "reward_mean", "kl_to_ref", "entropy",
           "valid_*", "heldout_accuracy", "train_accuracy", "accuracy", "rm_verifier_agreement", "lr", "grad_norm")
_FIRST_STAGES = ("sft", "rm")  # then stage 3 (the algorithm's directory)


def _step(row: dict) -> float | None:
    s = row.get("step", row.get("iteration"))
    return s if isinstance(s, (int, float)) else None


def read_metrics(out: Path) -> dict[str, list[dict]]:
    """``{stage: rows}`` of every ``<out>/<stage>/metrics.jsonl``, sft and rm first; a last line still being
    written (a stage in progress) is left out."""
    found: dict[str, list[dict]] = {}
    for path in sorted(Path(out).glob("*/metrics.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the row being written right now
        found[path.parent.name] = rows
    order = [s for s in _FIRST_STAGES if s in found] + sorted(s for s in found if s not in _FIRST_STAGES)
    return {s: found[s] for s in order}


def _series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """``{metric: (steps, values)}`` of the plotted metrics the rows have (finite numbers only)."""
    names: list[str] = []
    for pattern in PLOTTED:
        keys = sorted({k for r in rows for k in r if k.startswith(pattern[:-1])}) if pattern.endswith("*") else [pattern]
        names += [k for k in keys if k not in names]
    out = {}
    for name in names:
        pts = [(_step(r), r[name]) for r in rows if isinstance(r.get(name), (int, float)) and not isinstance(
            r.get(name), bool) and math.isfinite(r[name]) and _step(r) is not None]
        if pts:
            out[name] = ([p[0] for p in pts], [p[1] for p in pts])
    return out


def plot_stage(stage: str, rows: list[dict], path: Path) -> bool:
    """One PNG of the stage's curves (a panel per metric of :data:`PLOTTED` it logs); False if none."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    series = _series(rows)
    if not series:
        return False
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    x_name = "iteration" if any("iteration" in r for r in rows) else "step"
    for ax, (name, (xs, ys)) in zip(axes, series.items(), strict=False):
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(x_name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    fig.suptitle(f"{stage}: {len(rows)} rows", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")  # `rlhf report` may run beside `rlhf run`
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return True


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _stage_section(out: Path, stage: str, rows: list[dict], png: Path | None) -> list[str]:
    done = (out / stage / "config.json").is_file()
    steps = [s for s in map(_step, rows) if s is not None]
    lines = [f"## {stage}", "", f"{'finished (checkpoint saved)' if done else 'in progress or stopped (no checkpoint)'}"
             f"; {len(rows)} metrics rows, last step {max(steps) if steps else '-'}.", ""]
    if png is not None:
        lines += [f"![{stage} curves]({png.relative_to(out).as_posix()})", ""]
    series = _series(rows)
    if series:
        lines += ["| metric | first | last | min | max |", "|---|---|---|---|---|"]
        lines += [f"| {k} | {_fmt(v[0])} | {_fmt(v[-1])} | {_fmt(min(v))} | {_fmt(max(v))} |"
                  for k, (_, v) in series.items()]
        lines.append("")
    return lines


def write_report(out: Path, summary: dict | None = None, say: Callable[[str], None] = print) -> Path:
    """Write ``<out>/plots/<stage>.png`` and ``<out>/report.md`` from the metrics.jsonl files and the summary
    (``summary.json`` when not given); without matplotlib, report.md without plots (``say`` says so once)."""
    from .pipeline import summary_rows

    out = Path(out)
    if summary is None:
        path = out / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
    metrics = read_metrics(out)
    try:
        import matplotlib  # noqa: F401
        can_plot = True
    except ImportError:
        can_plot = False
        say("report: matplotlib is not installed, so no plots (pip install 'rlhf-cli[plots]'); report.md has the "
            "tables only")
    lines = [f"# rlhf run report: {out.name}", "",
             f"Built from `<stage>/metrics.jsonl` at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; rebuild it with "
             f"`rlhf report {out}`.", "", "## Summary", ""]
    rows = summary_rows(summary) if summary else []
    if rows:
        lines += ["| stage | metric | before | after | wall time |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    else:
        lines += ["No summary.json yet (`rlhf run` writes it after each stage).", ""]
    for stage, stage_rows in metrics.items():
        png = out / "plots" / f"{stage}.png"
        drawn = can_plot and plot_stage(stage, stage_rows, png)
        lines += _stage_section(out, stage, stage_rows, png if drawn else None)
    report = out / "report.md"
    tmp = out / f"report.md.tmp-{os.getpid()}"
    tmp.write_text("\n".join(lines))
    os.replace(tmp, report)
    return report


def report_command(out: Path = typer.Argument(..., metavar="OUT", help="A run's output directory (the --out of `rlhf run`).")) -> None:
    """Rebuild OUT/report.md and OUT/plots/<stage>.png from the stages' metrics.jsonl files, also while the run
    is in progress. The plots need matplotlib: pip install 'rlhf-cli[plots]'."""
    if not out.is_dir():
        typer.echo(f"error: OUT: {str(out)!r} is not a directory", err=True)
        raise typer.Exit(2)
    if not any(out.glob("*/metrics.jsonl")):
        typer.echo(f"error: OUT: {str(out)!r} has no <stage>/metrics.jsonl; allowed: the --out directory of an "
                   f"`rlhf run` that has started a stage", err=True)
        raise typer.Exit(2)
    typer.echo(f"wrote {write_report(out, say=lambda m: typer.echo(m, err=True))}")
