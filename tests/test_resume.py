"""Resume equals uninterrupted (rlhf_cli.resume): a run killed at a random point after a stage's first saved
state and continued with ``--resume`` ends with bitwise the same weights, metrics rows and summary.

One tiny pipeline covers SFT, the reward model, PPO (online, with a critic) and DPO (offline): it runs
once uninterrupted, and once interrupted in every stage (each kill at a random delay after that stage's
first saved state, the delays printed), then both are compared stage by stage:

* 1 process, ZeRO-0: SIGKILL in sft, SIGTERM in rm (must save, exit 0 and say how to resume),
  SIGKILL in ppo and in dpo;
* 2 processes, ZeRO-3 (fp32, gloo): SIGKILL of the whole process tree in every stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TINY = ["data.num_eval=40", "data.num_valid=20", "model.hidden_size=64", "model.intermediate_size=128",
        "sft.epochs=2", "data.sft_samples=512", "rm.epochs=1", "data.rm_samples=256", "rl.iterations=6",
        "rl.rollout_batch_size=16", "rl.micro_batch_size=16", "rl.eval_every=2", "pref.epochs=1",
        "pref.batch_size=32", "checkpoint.every=2", "checkpoint.every_iterations=2",
        "rl.ptx_coef=0.5"]  # the ptx batches' position is replayed on resume too (rlhf_cli.sampling.PtxBatches)
STAGES = [(["--stage", "all"], ["sft", "rm", "ppo"]), (["--stage", "dpo"], ["dpo"])]


def _cmd(out, args: list[str], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "rlhf_cli", "run", "--out", str(out), *args, *TINY, *extra]


def _kill(proc: subprocess.Popen, sig: int, descendants) -> None:
    """SIGKILL: the whole tree at once (a crash); SIGTERM: the command only (it forwards to torchrun)."""
    pids = [proc.pid] + (descendants(proc.pid) if sig == signal.SIGKILL else [])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _interrupted(out, args: list[str], stages: list[str], extra: list[str], signals: dict[str, int],
                 rng: random.Random, tools) -> list[str]:
    """Run until it finishes, interrupting each of ``stages`` once after its first saved state and resuming."""
    log, resume = [], []
    for target in [*stages, None]:
        proc = subprocess.Popen(_cmd(out, args, extra + resume), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=tools[0](), start_new_session=True)
        sent = None
        deadline = time.time() + 900
        while proc.poll() is None and time.time() < deadline:
            if target and sent is None and any((out / ".resume" / target).glob("step-*/meta.json")):
                delay = rng.uniform(0.0, 1.5)
                time.sleep(delay)
                sent = signals[target]
                _kill(proc, sent, tools[1])
                log.append(f"{target}: {signal.Signals(sent).name} {delay:.2f} s after its first saved state")
            time.sleep(0.05)
        text = proc.communicate(timeout=120)[0]
        if sent == signal.SIGTERM:
            assert proc.returncode == 0, text[-3000:]
            assert "stopped after step" in text and "--resume" in text, text[-3000:]
        elif sent is None or proc.returncode == 0:
            assert proc.returncode == 0, text[-3000:]
        assert "Traceback" not in text or sent == signal.SIGKILL, text[-3000:]
        resume = ["--resume"]
        if sent is None:
            break
    return log


def _rows(d) -> list[dict]:
    skip = {"time", "gather_s", "generate_s", "train_s", "samples_per_s", "tokens_per_s"}
    return [{k: v for k, v in json.loads(line).items() if k not in skip and not k.endswith("_mib")}
            for line in (d / "metrics.jsonl").read_text().splitlines()]


def _no_cache_hits(x):
    """The summary without the tokenization cache's hit flags (the resumed run finds the first one's cache)."""
    if isinstance(x, dict):
        return {k: _no_cache_hits(v) for k, v in x.items() if k != "cache_hit"}
    return x


def _same(a, b, stage: str) -> None:
    wa, wb = load_file(str(a / stage / "model.safetensors")), load_file(str(b / stage / "model.safetensors"))
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{stage}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    assert _rows(a / stage) == _rows(b / stage), stage
    sa, sb = (_no_cache_hits(json.loads((d / "summary.json").read_text())[stage]) for d in (a, b))
    assert sa == sb, stage
    assert not (b / ".resume" / stage).exists()  # a finished stage leaves no saved state behind


@pytest.mark.parametrize(("nproc", "zero"), [(1, 0), (2, 3)])
def test_resume_after_kills_equals_the_uninterrupted_run(tmp_path, cli_tools, nproc: int, zero: int) -> None:
    extra = ["--zero-stage", str(zero), *(["--nproc", "2"] if nproc > 1 else [])]
    rng = random.Random(nproc)
    signals = {s: signal.SIGKILL for _, stages in STAGES for s in stages}
    if nproc == 1:
        signals["rm"] = signal.SIGTERM
    ref, cut = tmp_path / "uninterrupted", tmp_path / "interrupted"
    log = []
    for args, stages in STAGES:
        proc = subprocess.run(_cmd(ref, args, extra), capture_output=True, text=True, env=cli_tools[0](), timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log += _interrupted(cut, args, stages, extra, signals, rng, cli_tools)
    print("\n".join(log))
    assert len(log) == 4, log  # every stage was interrupted once
    for _, stages in STAGES:
        for stage in stages:
            _same(ref, cut, stage)
