#!/usr/bin/env python3
r"""Learning benchmark: does the whole pipeline learn on the built-in demo, seed after seed?

Not part of the test suite (nothing imports it, pytest does not collect it): it trains for real.

For each seed S (the seed changes the data split, the model init and the sampling) it runs
``rlhf run --stage all --seed S`` (SFT -> reward model -> PPO on the reward model) into
``<root>/seed-S/base``, then every other variant of VARIANTS below from that run's SFT model (and
reward model) into ``<root>/seed-S/<name>``, whose ``sft/`` and ``rm/`` are symlinks to the base's.
The ``tool_demo`` variant is its own pipeline (``rlhf run --stage all --data tool-demo``: SFT -> GRPO
against the calculator, issue 16); its report adds the tool-call and copy-error rates before/after.
Each run's output goes to ``run.log`` in its directory. From the runs' summary.json files it
collects the SFT eval loss before/after, the SFT model's held-out greedy verifier score (a stage-3
``verifier_score_before``), the reward model's held-out accuracy, and per variant the held-out
verifier score greedy and sampled, before -> after (lift), the KL to the SFT model, the checkpoint
kept and the wall time per stage. It writes everything to ``<root>/learning.json`` (with the
environment) and a markdown report to ``<root>/learning.md`` (also printed), which ends with
PASS/MISS checks against the thresholds below.

    python benchmarks/learning.py --seeds 1 2 3 4 5 --root runs/learning
    python benchmarks/learning.py --seeds 1 2 3 4 5 --root runs/learning --resume   # continue
    python benchmarks/learning.py --seeds 1 2 3 --root runs/learning-tool --variants tool_demo   # the tool demo only
    python benchmarks/learning.py --root runs/learning --report-only                # rebuild the report
    python benchmarks/learning.py --seeds 1 --root /tmp/lb --variants grpo --set rl.iterations=2
    # plumbing smoke test (scores stay near 0 at this size; 10 runs, 10-20 min on 2 cores)
    python benchmarks/learning.py --seeds 1 2 --root /tmp/lb-smoke --set sft.epochs=1 --set rm.epochs=1 \
        --set rl.iterations=2 --set pref.epochs=1 --set data.num_eval=40 --set data.num_valid=20 \
        --set data.sft_samples=640 --set data.rm_samples=320 --set rl.rollout_batch_size=16 \
        --set rl.micro_batch_size=16 --set rl.eval_every=1

Options: --rlhf PATH (the rlhf executable; default: `rlhf` on PATH, else next to this Python),
--jobs N (seeds run concurrently, each process with OMP_NUM_THREADS=1), --variants NAME... (a
subset; the base run always runs, the others start from it), --set KEY=VALUE (added to every run,
after the variant's own overrides), --json PATH (default <root>/learning.json).

Time with the default recipe on the 2-core CPU machine, idle (docs/algorithms.md, README.md):
about 6.5 min for the base run, 1-1.5 min for each online variant and 3 min for DPO, so about 13
min a seed and 65 min for 5 seeds; --jobs 2 gains little on 2 cores, and a busy machine is slower
(the smoke test above took 21 min with other training jobs on both cores, 3 of them starting processes).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

# The variants: name (its directory under seed-S/), `rlhf run --stage`, extra overrides for this
# variant only (edit freely: the recipe defaults are being re-tuned), title in the report. The
# first, BASE, is `--stage all` = sft -> rm -> ppo with the reward model; the others reuse its
# sft/ (and rm/).
VARIANTS = [
    ("base", "all", [], "PPO on the reward model (base run: sft -> rm -> ppo)"),
    ("ppo_verifier", "ppo", ["rl.reward=verifier"], "PPO on the verifier"),
    ("grpo", "grpo", ["rl.reward=verifier", "rl.rollout_batch_size=32"], "GRPO on the verifier (32 prompts x 4)"),
    ("rloo", "rloo", ["rl.reward=verifier", "rl.rollout_batch_size=32"], "RLOO on the verifier (32 prompts x 4)"),
    ("dpo", "dpo", [], "DPO on the reward-model pairs"),
    ("tool_demo", "all", ["--data", "tool-demo"],
     "Tool demo: SFT -> GRPO against the calculator (its own data and model, docs/environments.md)"),
]
BASE = "base"
# Variants with their own data: no link to the base run's sft/ and rm/; their stages (summary sections).
INDEPENDENT = {"tool_demo": ["sft", "grpo"]}
SFT = "sft"  # pseudo-variant in TARGETS: the per-seed SFT / reward-model numbers

# Targets. "lift" = held-out verifier score after - before (greedy unless "sampled").
PPO_RM_GREEDY_LIFT_MEAN = 0.25  # mean over seeds >= this
PPO_RM_GREEDY_LIFT_MIN = 0.15  # every seed >= this
PPO_RM_SAMPLED_LIFT_MIN = 0.05  # every seed >= this
SFT_GREEDY_MIN = 0.50  # SFT model's held-out greedy score, every seed
RM_ACCURACY_MIN = 0.80  # reward model's held-out accuracy (true labels), every seed
RM_VS_VERIFIER_GAP = 0.05  # |mean lift PPO-RM - mean lift PPO-verifier| <= this
OTHER_LIFT_ABOVE = 0.0  # GRPO, RLOO, DPO greedy lift > this on every seed
TOOL_DEMO_LIFT_MIN = 0.25  # issue 16: the tool demo's held-out greedy lift, every seed
TARGETS = [  # label, variant, metric, aggregate over seeds ("gap": |mean BASE - mean variant|), op, threshold
    ("PPO-RM greedy lift, mean", BASE, "greedy_lift", "mean", ">=", PPO_RM_GREEDY_LIFT_MEAN),
    ("PPO-RM greedy lift, every seed", BASE, "greedy_lift", "min", ">=", PPO_RM_GREEDY_LIFT_MIN),
    ("PPO-RM sampled lift, every seed", BASE, "sampled_lift", "min", ">=", PPO_RM_SAMPLED_LIFT_MIN),
    ("SFT held-out greedy, every seed", SFT, "greedy", "min", ">=", SFT_GREEDY_MIN),
    ("RM held-out accuracy, every seed", SFT, "rm_accuracy", "min", ">=", RM_ACCURACY_MIN),
    ("abs(mean lift PPO-RM - mean lift PPO-verifier)", "ppo_verifier", "greedy_lift", "gap", "<=",
     RM_VS_VERIFIER_GAP),
    ("GRPO greedy lift, every seed", "grpo", "greedy_lift", "min", ">", OTHER_LIFT_ABOVE),
    ("RLOO greedy lift, every seed", "rloo", "greedy_lift", "min", ">", OTHER_LIFT_ABOVE),
    ("DPO greedy lift, every seed", "dpo", "greedy_lift", "min", ">", OTHER_LIFT_ABOVE),
    ("Tool demo greedy lift, every seed", "tool_demo", "greedy_lift", "min", ">=", TOOL_DEMO_LIFT_MIN),
]
RUN_RECORD = "benchmark_run.json"  # per run dir: command, exit code, wall time (read by --report-only)
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- runs
def section(stage: str, name: str = BASE) -> str:
    """The summary.json section of a run's last stage (``--stage all`` ends with ppo; see INDEPENDENT)."""
    return required_sections(stage, name)[-1]


def required_sections(stage: str, name: str = BASE) -> list[str]:
    if name in INDEPENDENT:
        return INDEPENDENT[name]
    return ["sft", "rm", "ppo"] if stage == "all" else [stage]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def link_base(out: Path, base: Path) -> None:
    """``out/sft`` and ``out/rm`` as relative symlinks to the base run's (a real directory is kept)."""
    out.mkdir(parents=True, exist_ok=True)
    for stage in ("sft", "rm"):
        link, target = out / stage, base / stage
        if not target.is_dir() or (link.exists() and not link.is_symlink()):
            continue
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(target, out), target_is_directory=True)


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_one(args, seed: int, variant: tuple, env: dict) -> None:
    """One ``rlhf run`` into ``<root>/seed-S/<name>``; its outcome goes to RUN_RECORD there."""
    name, stage, extra, _ = variant
    seed_dir = Path(args.root) / f"seed-{seed}"
    out, tag = seed_dir / name, f"[seed {seed}] {name}"
    summary = read_json(out / "summary.json")
    if args.resume and all(s in summary for s in required_sections(stage, name)):
        print(f"{tag}: already done (--resume), skipped", flush=True)
        return
    if name != BASE and name not in INDEPENDENT:
        if not (seed_dir / BASE / "sft" / "config.json").is_file():
            print(f"{tag}: FAILED: the base run has no sft/ model; not started", flush=True)
            write_record(out, {"status": "failed", "rc": None, "wall_seconds": 0, "command": None,
                               "error": "no base sft/ model"})
            return
        link_base(out, seed_dir / BASE)
    cmd = [args.rlhf, "run", "--stage", stage, "--seed", str(seed), "--out", str(out), *extra, *args.set]
    write_record(out, {"status": "interrupted", "rc": None, "command": shlex.join(cmd)})  # until it ends
    print(f"{tag}: start: {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(out / "run.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    wall = round(time.perf_counter() - t0, 1)
    summary = read_json(out / "summary.json")
    ok = rc == 0 and all(s in summary for s in required_sections(stage, name))
    write_record(out, {"status": "ok" if ok else "failed", "rc": rc, "wall_seconds": wall,
                       "command": shlex.join(cmd), "log": str(out / "run.log")})
    if ok:
        print(f"{tag}: done in {wall:.0f} s", flush=True)
    else:
        print(f"{tag}: FAILED (exit code {rc}) after {wall:.0f} s; {out / 'run.log'} ends:\n"
              f"{log_tail(out / 'run.log')}", flush=True)


def write_record(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def run_all(args, variants: list[tuple]) -> None:
    env = dict(os.environ, TOKENIZERS_PARALLELISM=os.environ.get("TOKENIZERS_PARALLELISM", "false"))
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"  # two processes on two cores; with --jobs 1 torch takes both

    def one_seed(seed: int) -> None:
        for v in variants:
            run_one(args, seed, v, env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for f in [pool.submit(one_seed, s) for s in args.seeds]:
            f.result()


# ---------------------------------------------------------------------------------------------- collect
def diff(after, before):
    """after - before, rounded to 1e-9 (scores are fractions of episode counts: 0.58 - 0.33 is 0.25, not
    0.2499999...)."""
    return None if after is None or before is None else round(after - before, 9)


def run_metrics(summary: dict, stage: str, name: str = BASE) -> dict:
    s = summary.get(section(stage, name)) or {}
    g0, g1 = s.get("verifier_score_before"), s.get("verifier_score_after")
    p0, p1 = s.get("verifier_score_sampled_before"), s.get("verifier_score_sampled_after")
    kept = (f"it. {s['selected_iteration']}" if "selected_iteration" in s
            else f"epoch {s['selected_epoch']}" if "selected_epoch" in s else None)
    return {"greedy_before": g0, "greedy_after": g1, "greedy_lift": diff(g1, g0), "sampled_before": p0,
            "sampled_after": p1, "sampled_lift": diff(p1, p0), "kl_after": s.get("kl_to_ref_after"), "kept": kept,
            "stage_seconds": summary.get("wall_seconds", {}).get(section(stage, name)),
            **{f"{rate}_{when}": s.get(f"{rate}_{when}") for rate in ("tool_call_rate", "copy_error_rate")
               for when in ("before", "after") if f"{rate}_before" in s}}


def collect_run(out: Path, stage: str, name: str = BASE) -> dict:
    summary = read_json(out / "summary.json")
    record = read_json(out / RUN_RECORD)
    done = all(s in summary for s in required_sections(stage, name))
    status = record.get("status") or ("ok" if done else "missing" if not out.exists() else "failed")
    if status == "ok" and not done:
        status = "failed"
    return record | {"status": status, "metrics": run_metrics(summary, stage, name) if status == "ok" else {},
                     "summary": summary}


def collect_seed(root: Path, seed: int, variants: list[tuple]) -> dict:
    runs = {name: collect_run(root / f"seed-{seed}" / name, stage, name) for name, stage, _, _ in variants}
    base = runs.get(BASE, {}).get("summary", {})
    sft, rm = base.get("sft", {}), base.get("rm", {})
    # the SFT model's held-out greedy score: every stage 3 of this seed measures it before training
    greedy = next((r["metrics"]["greedy_before"] for n, r in runs.items()
                   if n not in INDEPENDENT and r["metrics"].get("greedy_before") is not None), None)
    return {"sft": {"loss_before": sft.get("eval_loss_before"), "loss_after": sft.get("eval_loss_after"),
                    "greedy": greedy, "rm_accuracy": rm.get("heldout_accuracy"),
                    "sft_seconds": base.get("wall_seconds", {}).get("sft"),
                    "rm_seconds": base.get("wall_seconds", {}).get("rm")},
            "runs": runs}


def values(data: dict, variant: str, metric: str) -> dict:
    """{seed: value or None} of one metric of one variant (SFT: the per-seed SFT / RM numbers)."""
    if variant == SFT:
        return {s: d["sft"].get(metric) for s, d in data.items()}
    return {s: d["runs"].get(variant, {}).get("metrics", {}).get(metric) for s, d in data.items()}


def stats(vals) -> dict:
    vals = [v for v in vals if v is not None]
    return {"mean": mean(vals) if vals else None, "min": min(vals, default=None), "max": max(vals, default=None),
            "n": len(vals)}


def check_targets(data: dict, names: list[str]) -> list[dict]:
    out = []
    for label, variant, metric, agg, op, threshold in TARGETS:
        row = {"target": label, "variant": variant, "metric": metric, "aggregate": agg, "op": op,
               "threshold": threshold, "value": None, "missing_seeds": []}
        if variant not in (SFT, *names) or (variant == SFT or agg == "gap") and BASE not in names:
            out.append(row | {"result": "SKIP"})
            continue
        vals = values(data, variant, metric)
        other = values(data, BASE, metric) if agg == "gap" else {}
        row["missing_seeds"] = sorted({s for s, v in (*vals.items(), *other.items()) if v is None})
        if agg == "gap":
            a, b = stats(other.values())["mean"], stats(vals.values())["mean"]
            row["value"] = None if a is None or b is None else abs(a - b)
        else:
            row["value"] = stats(vals.values())[agg]
        v = row["value"]
        ok = v is not None and not row["missing_seeds"] and {">=": v >= threshold, ">": v > threshold,
                                                             "<=": v <= threshold}[op]
        out.append(row | {"result": "PASS" if ok else "MISS"})
    return out


def environment(rlhf: str) -> dict:
    """Versions from the Python that runs ``rlhf`` (its shebang), git SHA, machine, date."""
    py = sys.executable
    try:
        words = Path(rlhf).read_text(errors="replace").splitlines()[0][2:].split()
        words = words[1:] if words and words[0].endswith("/env") else words  # #!/usr/bin/env python3
        if words and "python" in Path(words[0]).name:
            py = shutil.which(words[0]) or words[0]
    except (OSError, IndexError):
        pass
    code = ("import importlib.metadata as m, json, platform\nv = {'python': platform.python_version()}\n"
            "for p in ('torch', 'transformers', 'tokenizers', 'datasets', 'deepspeed', 'rlhf-cli'):\n"
            "    try: v[p] = m.version(p)\n    except m.PackageNotFoundError: v[p] = None\nprint(json.dumps(v))")
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, check=False)
    versions = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr[-500:]}

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), None)
    return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain")),
            "command": shlex.join([sys.executable, *sys.argv]), "rlhf": rlhf, "rlhf_python": py,
            "versions": versions, "cpu_model": cpu, "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# ---------------------------------------------------------------------------------------------- report
def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def arrow(before, after, lift) -> str:
    return f"{fmt(before)} -> {fmt(after)} ({fmt(lift, '+.3f')})"


def agg_rows(data: dict, variant: str, cols: list[tuple[str, ...]]) -> list[str]:
    """mean / min / max rows, each metric aggregated over the seeds separately; a column of three
    metrics is shown as "before -> after (lift)", of two as "before -> after", of none empty."""
    rows, n = [], stats(values(data, variant, cols[0][0]).values())["n"]
    for agg in ("mean", "min", "max"):
        cells = []
        for col in cols:
            v = [stats(values(data, variant, m).values())[agg] for m in col]
            spec = ".0f" if col and col[0].endswith("seconds") else ".3f"
            cells.append(arrow(*v) if len(v) == 3 else " -> ".join(fmt(x, spec) for x in v))
        label = f"**{agg}**" + (f" ({n} of {len(data)} seeds)" if n < len(data) else "")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def md_sft(data: dict) -> list[str]:
    lines = ["## SFT and reward model", "",
             "| seed | SFT eval loss before -> after | SFT held-out greedy | RM held-out accuracy |",
             "|---|---|---|---|"]
    for s, d in data.items():
        x = d["sft"]
        lines.append(f"| {s} | {fmt(x['loss_before'])} -> {fmt(x['loss_after'])} | {fmt(x['greedy'])} | "
                     f"{fmt(x['rm_accuracy'])} |")
    lines += agg_rows(data, SFT, [("loss_before", "loss_after"), ("greedy",), ("rm_accuracy",)])
    return lines + [""]


def md_variant(data: dict, variant: tuple) -> list[str]:
    name, stage, extra, title = variant
    lines = [f"## {title}", "", f"`{name}`: `{shlex.join(['rlhf', 'run', '--stage', stage, '--seed', 'S', *extra])}`",
             "", "| seed | greedy before -> after (lift) | sampled before -> after (lift) | KL after | kept | "
             "stage wall s |", "|---|---|---|---|---|---|"]
    rates: list[str] = []
    for s, d in data.items():
        r = d["runs"][name]
        if r["status"] != "ok":
            rc = f" (exit code {r['rc']})" if r.get("rc") is not None else ""
            lines.append(f"| {s} | {r['status'].upper()}{rc} | | | | |")
            continue
        m = r["metrics"]
        if "tool_call_rate_before" in m:  # the tool demo's rates, greedy (before -> after)
            rates.append(f"| {s} | {fmt(m['tool_call_rate_before'])} -> {fmt(m['tool_call_rate_after'])} | "
                         f"{fmt(m['copy_error_rate_before'])} -> {fmt(m['copy_error_rate_after'])} |")
        lines.append(f"| {s} | {arrow(m['greedy_before'], m['greedy_after'], m['greedy_lift'])} | "
                     f"{arrow(m['sampled_before'], m['sampled_after'], m['sampled_lift'])} | {fmt(m['kl_after'])} | "
                     f"{m['kept'] or '-'} | {fmt(m['stage_seconds'], '.0f')} |")
    lines += agg_rows(data, name, [("greedy_before", "greedy_after", "greedy_lift"),
                                   ("sampled_before", "sampled_after", "sampled_lift"), ("kl_after",), (),
                                   ("stage_seconds",)])
    if rates:
        lines += ["", "| seed | tool-call rate, greedy | copy-error rate, greedy |", "|---|---|---|", *rates]
    return lines + [""]


def md_wall(data: dict, variants: list[tuple]) -> list[str]:
    names = [n for n, *_ in variants]
    head = ["sft", "rm", *[f"{n} ({section(st, n)})" for n, st, *_ in variants], "all runs (commands)"]
    lines = ["## Wall time per stage (s)", "", "| seed | " + " | ".join(head) + " |",
             "|---|" + "---|" * len(head)]
    for s, d in data.items():
        runs = d["runs"]
        total = sum(r.get("wall_seconds") or 0 for r in runs.values())
        cells = [d["sft"]["sft_seconds"], d["sft"]["rm_seconds"],
                 *[runs[n]["metrics"].get("stage_seconds") for n in names]]
        lines.append(f"| {s} | " + " | ".join(fmt(c, ".0f") for c in cells) + f" | {total:.0f} |")
    return lines + ["", "A stage's time includes its held-out evaluations before and after training; the last "
                    "column is the `rlhf run` commands' wall time (loading included).", ""]


def md_targets(targets: list[dict]) -> list[str]:
    lines = ["## Targets", "", "| target | value | required | result |", "|---|---|---|---|"]
    for t in targets:
        note = f" (missing: seeds {', '.join(map(str, t['missing_seeds']))})" if t["missing_seeds"] else ""
        lines.append(f"| {t['target']} | {fmt(t['value'])} | {t['op']} {t['threshold']:g} | "
                     f"**{t['result']}**{note} |")
    return lines + [""]


def markdown(report: dict, variants: list[tuple]) -> str:
    env, data = report["environment"], report["seeds"]
    v = env.get("versions", {})
    lines = [f"# Learning benchmark: {len(data)} seed(s) on the demo task", "",
             f"git {env.get('git_sha', '?')[:12]}{' (dirty)' if env.get('git_dirty') else ''}, {env.get('date')}, "
             f"{env.get('cpu_model')} x {env.get('cpu_count')} cores"
             + "".join(f", {k} {val}" for k, val in v.items() if val and k != "error") + ".",
             f"Overrides for every run: `{' '.join(report['settings']['set']) or '(none)'}`.", ""]
    lines += md_sft(data) if any(n == BASE for n, *_ in variants) else []
    for variant in variants:
        lines += md_variant(data, variant)
    lines += md_wall(data, variants) + md_targets(report["targets"])
    failed = [f"- seed {s} {n}: {r['status']} ({r.get('error') or 'exit code ' + str(r.get('rc'))}), "
              f"log {r.get('log') or '-'}" for s, d in data.items() for n, r in d["runs"].items() if r["status"] != "ok"]
    lines += ["## Failed or missing runs", "", *failed, ""] if failed else []
    return "\n".join(lines)


def build_report(args, variants: list[tuple], env: dict) -> dict:
    root = Path(args.root)
    data = {s: collect_seed(root, s, variants) for s in args.seeds}
    names = [n for n, *_ in variants]
    metrics = ("greedy_before", "greedy_after", "greedy_lift", "sampled_before", "sampled_after", "sampled_lift",
               "kl_after", "stage_seconds")
    aggregates = {n: {m: stats(values(data, n, m).values()) for m in metrics} for n in names}
    aggregates[SFT] = {m: stats(values(data, SFT, m).values()) for m in ("loss_after", "greedy", "rm_accuracy")}
    return {"environment": env,
            "settings": {"root": str(root), "seeds": args.seeds, "set": args.set, "jobs": args.jobs,
                         "variants": [{"name": n, "stage": st, "overrides": ex, "title": t}
                                      for n, st, ex, t in variants]},
            "seeds": data, "aggregates": aggregates, "targets": check_targets(data, names)}


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to run (default with --report-only: every seed-S dir)")
    p.add_argument("--root", default="runs/learning", help="output root (default runs/learning)")
    p.add_argument("--rlhf", help="the rlhf executable (default: rlhf on PATH, else next to this Python)")
    p.add_argument("--jobs", type=int, default=1, help="seeds run concurrently (default 1)")
    p.add_argument("--variants", nargs="+", metavar="NAME", choices=[n for n, *_ in VARIANTS],
                   help=f"a subset of: {', '.join(n for n, *_ in VARIANTS)} (the base run always runs, "
                        f"unless every one chosen has its own data: {', '.join(INDEPENDENT)})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every run")
    p.add_argument("--resume", action="store_true", help="skip runs whose summary.json has their stage(s)")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from existing run dirs")
    p.add_argument("--json", help="JSON output (default <root>/learning.json)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs: must be >= 1")
    bad = [s for s in args.set if "=" not in s]
    if bad:
        p.error(f"--set: expected KEY=VALUE, got {bad[0]!r}")
    root = Path(args.root)
    if args.seeds is None:
        if not args.report_only:
            p.error("--seeds is required (except with --report-only)")
        args.seeds = sorted(int(d.name[5:]) for d in root.glob("seed-*") if d.name[5:].isdigit())
    args.rlhf = args.rlhf or shutil.which("rlhf") or str(Path(sys.executable).parent / "rlhf")
    if not args.report_only and not Path(args.rlhf).is_file():
        p.error(f"--rlhf: no rlhf executable at {args.rlhf!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(args.root)
    json_path = Path(args.json) if args.json else root / "learning.json"
    chosen = set(args.variants or [n for n, *_ in VARIANTS])
    if args.report_only and not args.variants:  # the variants that left a directory
        chosen = {n for n, *_ in VARIANTS if any((root / f"seed-{s}" / n).exists() for s in args.seeds)}
    if not chosen <= set(INDEPENDENT):
        chosen.add(BASE)
    variants = [v for v in VARIANTS if v[0] in chosen]
    if args.report_only:
        old = read_json(json_path)
        env = old.get("environment") or environment(args.rlhf)
        args.set = args.set or old.get("settings", {}).get("set", [])
        env["report_rebuilt"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    else:
        root.mkdir(parents=True, exist_ok=True)
        env = environment(args.rlhf)
        t0 = time.perf_counter()
        run_all(args, variants)
        env["benchmark_wall_seconds"] = round(time.perf_counter() - t0, 1)
    report = build_report(args, variants, env)
    text = markdown(report, variants)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    (root / "learning.md").write_text(text + "\n")
    print(text)
    print(f"written: {json_path}, {root / 'learning.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
