"""``rlhf run --nproc N``: re-run the same command under torchrun with N local processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import typer

__all__ = ["child_args", "launched", "relaunch"]


def launched() -> bool:
    """Whether a launcher (torchrun, deepspeed, srun) started this process as one rank of its world: then
    ``--nproc`` is not acted on (``rlhf_hybrid.launch_env`` says which variables tell)."""
    if "RANK" in os.environ:  # torchrun, deepspeed: no need to import torch to know
        return True
    from rlhf_hybrid.launch_env import launched as in_world

    return in_world(os.environ)


def child_args(argv: list[str]) -> list[str]:
    """``argv`` with ``--nproc N`` rewritten as the equivalent last override ``deepspeed.nproc=N``.

    torchrun's argparse classifies every ``--x`` on its command line, even those after ``-m rlhf_cli``,
    and rejects ``--nproc`` as an ambiguous abbreviation of its ``--nproc-per-node``/``--nproc_per_node``.
    """
    out: list[str] = []
    nproc = None
    it = iter(argv)
    for a in it:
        if a == "--nproc":
            nproc = next(it, None)
        elif a.startswith("--nproc="):
            nproc = a.partition("=")[2]
        else:
            out.append(a)
    return out + ([f"deepspeed.nproc={nproc}"] if nproc is not None else [])


def relaunch(nproc: int) -> None:
    """Re-run this very command under torchrun with ``nproc`` local processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "rlhf_cli", *child_args(sys.argv[1:])]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    child = subprocess.Popen(cmd, env=env)
    # SIGTERM/SIGINT to this process reach the ranks through torchrun (which forwards them): each rank then
    # saves its state at the next step and stops (rlhf_cli.resume); this process waits for them.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: child.send_signal(signum))
    rc = child.wait()
    if rc:
        raise typer.Exit(rc)
