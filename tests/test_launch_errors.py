"""`rlhf run` in a launcher's world that cannot come together stops with one error line naming why:
an incomplete launcher environment (the missing variables) or ranks that never join (distributed.timeout_s).

Each case is one CLI process that fails at the process-group set-up, before any model is built.
"""

from __future__ import annotations

import time

from rlhf_hybrid.distributed import free_port

SMALL = ["--stage", "sft", "data.num_eval=16", "data.num_valid=8", "data.sft_samples=64"]




def test_ranks_that_never_join_stop_after_distributed_timeout_s(rlhf, tmp_path) -> None:
    """Rank 0 of a world of 2 whose rank 1 never comes: the rendezvous gives up after timeout_s."""
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    t0 = time.perf_counter()
    proc = rlhf(["run", "--out", tmp_path / "out", *SMALL, "distributed.timeout_s=3"], env=env, timeout=120)
    waited = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: process group: not every rank joined within timeout_s=3 s (rlhf run: distributed.timeout_s)" \
        in proc.stderr, proc.stderr[-3000:]
    assert "RANK=0, WORLD_SIZE=2, from torch variables" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert waited < 100  # not torch's default of 30 minutes


def test_an_incomplete_launcher_environment_names_the_missing_variables(rlhf, tmp_path) -> None:
    proc = rlhf(["run", "--out", tmp_path / "a", *SMALL], env={"RANK": "0", "WORLD_SIZE": "2"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: RANK='0' is set (this process is one rank of a launched world) but LOCAL_RANK, MASTER_ADDR, " \
           "MASTER_PORT are not" in proc.stderr, proc.stderr[-3000:]


def test_an_incomplete_srun_environment_names_the_missing_variables(rlhf, tmp_path) -> None:
    env = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
           "SLURM_JOB_ID": "77"}
    proc = rlhf(["run", "--out", tmp_path / "b", *SMALL, "--nproc", "2"], env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]  # --nproc is not acted on: srun started the ranks
    assert "error: srun step (SLURM_PROCID and SLURM_STEP_NUM_TASKS are set, RANK is not): SLURM_LOCALID is not " \
           "set" in proc.stderr, proc.stderr[-3000:]
