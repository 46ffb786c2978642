#!/usr/bin/env bash
# Every built-in stage-3 algorithm on the demo task from one SFT model, same sample budget
# (docs/algorithms.md, "Results on the demo task"). About 20 minutes on a 2-core CPU.
#
#   bash benchmarks/algorithms_demo.sh [OUT_DIR]      # default runs/algorithms
#
# Prints one row per algorithm: held-out greedy / sampled verifier score before -> after, KL, wall time.
set -euo pipefail
OUT=${1:-runs/algorithms}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
mkdir -p "$OUT"
[ -f "$OUT/base/sft/config.json" ] || rlhf run --stage sft --out "$OUT/base" > "$OUT/sft.log" 2>&1
for a in ppo grpo rloo reinforce_pp remax dr_grpo dpo ipo cdpo simpo orpo kto; do
  case $a in
    grpo|rloo|dr_grpo) extra=(rl.rollout_batch_size=32 rl.reward=verifier) ;;  # 32 prompts x 4 answers
    ppo|reinforce_pp|remax) extra=(rl.reward=verifier) ;;                      # 128 prompts x 1 answer
    *) extra=() ;;                                                             # offline: the RM pairs
  esac
  rm -rf "${OUT:?}/$a" && mkdir -p "$OUT/$a" && cp -r "$OUT/base/sft" "$OUT/$a/sft"
  start=$(date +%s)
  rlhf run --stage "$a" --out "$OUT/$a" "${extra[@]}" > "$OUT/$a.log" 2>&1
  echo "$a $(( $(date +%s) - start ))" >> "$OUT/wall.txt"
done
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
wall = dict(line.split() for line in (out / "wall.txt").read_text().splitlines())
print("| algorithm | greedy before -> after | sampled before -> after | KL after | kept | wall s |")
print("|---|---|---|---|---|---|")
for name, w in wall.items():
    s = json.loads((out / name / "summary.json").read_text())[name]
    kept = s.get("selected_iteration", s.get("selected_epoch"))
    kl = s.get("kl_to_ref_after")
    print(f"| {name} | {s['verifier_score_before']:.3f} -> {s['verifier_score_after']:.3f} | "
          f"{s['verifier_score_sampled_before']:.3f} -> {s['verifier_score_sampled_after']:.3f} | "
          f"{'-' if kl is None else f'{kl:.3f}'} | {kept} | {w} |")
PY
