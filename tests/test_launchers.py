"""`rlhf run` under every launcher gives the run `--nproc 2` gives (CPU, gloo, ZeRO-3, the same seed).

One reference run, ``rlhf run --stage all --nproc 2`` (which relaunches itself under
``torchrun --standalone``), is compared with the same command started by:

* two ``torchrun`` invocations, ``--nnodes 2 --node-rank 0|1 --nproc-per-node 1`` with the rendezvous on
  127.0.0.1 (a 2-node run on one machine);
* the DeepSpeed launcher with a hostfile ``localhost slots=2`` (``--no_ssh_check --master_addr 127.0.0.1``:
  with those two flags a one-host hostfile needs neither ssh nor pdsh);
* two plain processes with the variables ``srun`` gives its tasks (SLURM_PROCID, SLURM_LOCALID,
  SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST, SLURM_JOB_ID) and none of torch's: the ranks and the
  rendezvous come from rlhf_hybrid.launch_env.

"The same" is exact: every stage's saved weights are bitwise equal, and so are the metrics rows and the
summary (timings and tokenization-cache hits left out). The pipeline is the smallest that still runs all
three stages (sft, rm, ppo with rl.ptx_coef > 0, so the ptx term runs in every comparison too); each run
takes about two minutes on the 2-core CI machine.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TINY = ["--seed", "5", "--zero-stage", "3", "data.num_eval=16", "data.num_valid=8", "data.max_eval=32",
        "data.sft_samples=128", "data.rm_samples=64", "data.rl_samples=64", "model.hidden_size=32",
        "model.intermediate_size=64", "model.num_layers=1", "model.num_heads=4", "sft.epochs=1", "sft.batch_size=16",
        "sft.warmup_steps=2", "rm.epochs=1", "rm.batch_size=16", "rm.warmup_steps=2", "rl.iterations=2",
        "rl.rollout_batch_size=8", "rl.micro_batch_size=8", "rl.eval_every=2", "rl.max_new_tokens=4",
        "rl.select=last", "rl.ptx_coef=0.5", "report.plots=false"]
STAGES = ("sft", "rm", "ppo")
TIMEOUT = 600
_TIMINGS = {"time", "gather_s", "generate_s", "train_s", "samples_per_s", "tokens_per_s", "wall_seconds", "cache_hit"}


def _run_args(out: Path) -> list[str]:
    return ["run", "--stage", "all", "--out", str(out), *TINY]


def _free_port(low: int = 0, high: int = 0) -> int:
    """A free TCP port on 127.0.0.1 (in ``[low, high)`` when given)."""
    for port in range(low, high) if high else [0]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in [{low}, {high})")


def _processes(commands: list[tuple[list[str], dict[str, str]]], cli_tools, timeout: float = TIMEOUT) -> list[str]:
    """Start every ``(argv, extra env)`` at once, wait for all; their outputs (a failure or a hang fails the test,
    the process trees killed)."""
    cli_env, descendants = cli_tools
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=cli_env() | extra, start_new_session=True) for argv, extra in commands]
    deadline = time.time() + timeout
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    hung = any(p.poll() is None for p in procs)
    if hung:
        for p in procs:
            for pid in [p.pid, *descendants(p.pid)]:
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
    outs = [p.communicate()[0] for p in procs]
    tail = "\n".join(f"--- process {i} (exit {p.returncode}) ---\n{o[-4000:]}"
                     for i, (p, o) in enumerate(zip(procs, outs, strict=True)))
    assert not hung, f"did not finish within {timeout} s (killed)\n{tail}"
    assert all(p.returncode == 0 for p in procs), tail
    return outs


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in _TIMINGS and not k.endswith("_mib")}
    return x


def _rows(d: Path) -> list[dict]:
    return [_strip(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(ref: Path, out: Path) -> None:
    """Bitwise the same weights, metrics rows and summary in every stage; world size 2."""
    for stage in STAGES:
        wa, wb = load_file(str(ref / stage / "model.safetensors")), load_file(str(out / stage / "model.safetensors"))
        assert wa.keys() == wb.keys(), stage
        differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not differ, f"{stage}: {len(differ)} of {len(wa)} tensors differ, e.g. {differ[:3]}"
        assert _rows(ref / stage) == _rows(out / stage), stage
        assert json.loads((out / stage / "run_card.json").read_text())["world_size"] == 2
    sa, sb = (_strip(json.loads((d / "summary.json").read_text())) for d in (ref, out))
    assert sa == sb


@pytest.fixture(scope="module")
def reference(tmp_path_factory, rlhf, explain) -> Path:
    """``rlhf run --nproc 2``: the run every launcher must reproduce; it also shows the ptx term at work."""
    out = tmp_path_factory.mktemp("nproc2") / "out"
    proc = rlhf([*_run_args(out), "--nproc", "2"], timeout=TIMEOUT)
    assert proc.returncode == 0, explain(proc)
    return out


def test_reference_run_trains_every_stage_and_logs_the_ptx_loss(reference: Path) -> None:
    rows = [r for r in _rows(reference / "ppo") if r.get("iteration", 0) > 0 and "policy_loss" in r]
    assert [r["iteration"] for r in rows] == [1, 2]
    # the SFT loss of demonstrations under the barely trained tiny model: about ln(vocab) nats, finite
    assert all(0.5 < r["ptx_loss"] < 10 for r in rows), rows
    summary = json.loads((reference / "summary.json").read_text())
    assert set(STAGES) <= set(summary)
    assert summary["ppo"]["data"]["ptx"]["kept"] == 128  # the ptx batches come from the SFT split


def test_two_torchrun_nodes_give_the_same_run(reference: Path, tmp_path: Path, cli_tools) -> None:
    out, port = tmp_path / "out", _free_port()
    commands = [([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                  "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "rlhf_cli",
                  *_run_args(out)], {}) for node in (0, 1)]
    _processes(commands, cli_tools)
    _assert_same_run(reference, out)


def test_deepspeed_launcher_with_a_localhost_hostfile_gives_the_same_run(reference: Path, tmp_path: Path,
                                                                        cli_tools) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh_check",
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "--no_local_rank", "--module",
            "rlhf_cli", *_run_args(out)]
    _processes([(argv, {})], cli_tools)
    _assert_same_run(reference, out)


def test_srun_tasks_give_the_same_run(reference: Path, tmp_path: Path, cli_tools) -> None:
    """Two tasks of an emulated srun step on one node; the rendezvous port is derived from SLURM_JOB_ID
    (20000 + id % 20000), so the job id is chosen to land on a free port."""
    out, port = tmp_path / "out", _free_port(20000, 40000)
    slurm = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "localhost",
             "SLURM_JOB_ID": str(4_000_000 + port - 20000), "SLURM_NODEID": "0"}
    commands = [([sys.executable, "-m", "rlhf_cli", *_run_args(out)],
                 slurm | {"SLURM_PROCID": str(task), "SLURM_LOCALID": str(task)}) for task in (0, 1)]
    outs = _processes(commands, cli_tools)
    assert "world_size=2" in outs[0], outs[0][-3000:]
    _assert_same_run(reference, out)
