#!/usr/bin/env bash
# One full GPU session for the hybrid engine and the kernels: install, CUDA tests, benchmarks.
#
# On the development machine first: `bash ../shared/gpu/prepare-wheels.sh` (writes ./.whl: deepspeed,
# datasets and our own packages as wheels). Then on the GPU host, from the repository root, with
# .whl carried along (see ../shared/gpu/README.md):
#
#     OUT=/some/dir bash benchmarks/gpu_run.sh [quick]
#
# Writes under $OUT: tests.log (rlhf-kernels' tests and the fast path's, CUDA-only cases included),
# bench-generate.json / .log, bench-ppo.json / .log, bench-kernels.json / .log, env.log. `quick`
# runs one batch size (64) instead of 8/32/64/128. Each step's failure is logged and the next
# step still runs; the exit status is that of the first failed step.
set -uo pipefail
OUT=${OUT:?set OUT to a directory for logs and reports}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .whl/*.whl
export PYTHONPATH="$HOME/site" CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 RANK=0 LOCAL_RANK=0 WORLD_SIZE=1
export PATH="$HOME/site/bin:$PATH"
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, remember the first failure
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s"
  if [ $rc -ne 0 ]; then
    tail -n 30 "$OUT/$name.log"
    [ $status -eq 0 ] && status=$rc
  fi
}
batches=(--batch 8 --batch 32 --batch 64 --batch 128)
[ "${1:-}" = quick ] && batches=(--batch 64)

step env python3 -m rlhf_cli env
# the kernels' tests and the inference tests (their CUDA-only cases run here); the DeepSpeed engine
# tests are CPU tests (DS_ACCELERATOR=cpu) and are run by CI
step tests python3 -m pytest -q -p no:cacheprovider packages/rlhf-kernels/tests \
  packages/rlhf-hybrid/tests/test_inference_generate.py packages/rlhf-hybrid/tests/test_inference_graphs.py
step bench-generate python3 -m rlhf_cli bench generate "${batches[@]}" --out "$OUT/bench-generate.json"
step bench-ppo python3 -m rlhf_cli bench ppo --out "$OUT/bench-ppo.json"
step bench-kernels python3 -m rlhf_kernels.bench --size full --out "$OUT/bench-kernels.json"
for f in bench-generate bench-ppo; do
  echo "== $f (last lines)"
  tail -n 40 "$OUT/$f.log"
done
exit $status
