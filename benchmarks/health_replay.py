"""Replay RL runs' metrics.jsonl through rlhf_algos.HealthMonitor: which runs would warn, and when.

    python benchmarks/health_replay.py RUN_DIR_OR_METRICS [...] [--window 15] [--flat-reward-tol 0.1]
    python benchmarks/health_replay.py /work/runs/learning/seed-*/*/{ppo,grpo,rloo}/metrics.jsonl --simulate 20

Prints, per file, the iterations at which the "reward flat while the KL rises" warning sets in (and
the other warnings' counts). ``--simulate K`` adds K synthetic runs of the failure issue 11 measured
(reward_mean 0.42 -> 0.44 over 60 iterations plus rollout noise N(0, 0.07), reward_std 0.8, KL
rising linearly to 0.73 plus N(0, 0.1)), to check that the rule still catches it. A tuning aid for
the rl.* health thresholds (docs/pipeline.md records what it measured); not a test.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rlhf_algos import HealthMonitor, HealthThresholds


def _rows(path: Path) -> list[dict]:
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _flat_run(seed: int, iterations: int = 60) -> list[dict]:
    rnd = random.Random(seed)
    return [{"iteration": i, "reward_mean": 0.42 + 0.02 * i / iterations + rnd.gauss(0, 0.07), "reward_std": 0.8,
             "kl_to_ref": 0.73 * i / iterations + rnd.gauss(0, 0.1)} for i in range(1, iterations + 1)]


def replay(rows: list[dict], thresholds: HealthThresholds) -> dict[str, list[int]]:
    """Iterations at which each kind of warning set in."""
    monitor, out = HealthMonitor(thresholds), {"flat": [], "entropy": [], "gen_kl": []}
    for row in rows:
        if "reward_mean" not in row and "entropy" not in row:
            continue  # an evaluation-only row
        for message in monitor.update(row):
            kind = "flat" if "reward flat" in message else "entropy" if "entropy" in message else "gen_kl"
            out[kind].append(int(row.get("iteration", 0)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", type=Path, help="metrics.jsonl files or the stage directories holding them")
    ap.add_argument("--window", type=int, default=HealthThresholds.window)
    ap.add_argument("--flat-reward-tol", type=float, default=HealthThresholds.flat_reward_tol)
    ap.add_argument("--simulate", type=int, default=0, help="synthetic flat-reward runs to add")
    args = ap.parse_args()
    t = HealthThresholds(window=args.window, flat_reward_tol=args.flat_reward_tol)
    runs = [(str(p), _rows(p)) for p in args.runs] + [(f"simulated flat run {s}", _flat_run(s))
                                                       for s in range(args.simulate)]
    warned = 0
    for name, rows in runs:
        got = replay(rows, t)
        warned += bool(got["flat"])
        print(f"{name}: flat-reward warnings at {got['flat'] or 'none'}; entropy {len(got['entropy'])}, "
              f"gen_kl {len(got['gen_kl'])}")
    real = len(args.runs)
    flagged_real = sum(bool(replay(r, t)["flat"]) for _, r in runs[:real])
    print(f"\nflat-reward warning in {flagged_real}/{real} given runs and {warned - flagged_real}/{args.simulate} "
          f"simulated flat runs (window {t.window}, flat_reward_tol {t.flat_reward_tol})")


if __name__ == "__main__":
    main()
