"""Process-group set-up and small collective helpers.

We initialise ``torch.distributed`` ourselves (gloo on CPU, NCCL on CUDA) before DeepSpeed sees it:
launched by ``torchrun``/``deepspeed`` the rendezvous variables are already set; under ``srun`` they are
derived from SLURM's (:mod:`rlhf_hybrid.launch_env` lists what is read); run as a plain process we fill
in a single-process world so ``deepspeed.initialize`` works without a launcher.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .launch_env import launcher_variables


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for MASTER_PORT of a local world; the tests and benchmarks use it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEFAULT_TIMEOUT_S = 1800.0  # torch's default for gloo process groups (NCCL's is 600 s)


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Initialise the default process group once (idempotent) and return this rank's place.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: How long the ranks wait for each other: at the rendezvous and in every collective
            on the default process group (its timeout). Ignored when the group already exists.

    Raises:
        ValueError: A bad ``backend`` or ``timeout_s``; an incomplete or malformed launcher environment
            (:class:`rlhf_hybrid.launch_env.LaunchEnvError`, naming the variables).
        TimeoutError: Not every rank joined within ``timeout_s``.
    """
    if not dist.is_initialized():
        if not 0 < timeout_s < float("inf"):  # nan fails this comparison too
            raise ValueError(f"timeout_s: must be finite and > 0, got {timeout_s!r}")
        source, variables = launcher_variables(os.environ)
        if source == "none":  # a plain single process: make a world of one
            variables = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                             MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                             MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
        # env:// reads them, and so does DeepSpeed (LOCAL_RANK) at every deepspeed.initialize
        os.environ.update(variables)
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend: {backend!r} is not supported; allowed: 'gloo', 'nccl'")
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        except dist.DistStoreError as e:  # the rendezvous timed out: some rank never came
            raise TimeoutError(f"process group: not every rank joined within timeout_s={timeout_s:g} s (rlhf run: distributed.timeout_s) "
                               f"at {variables['MASTER_ADDR']}:{variables['MASTER_PORT']} (RANK={variables['RANK']}, "
                               f"WORLD_SIZE={variables['WORLD_SIZE']}, from {source} variables): {e}") from None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of scalars over all ranks (identity in a world of one)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist(), strict=True)}


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
