"""rlhf_hybrid.launch_env: where a process sits in the world, from torchrun's / deepspeed's variables or from
an srun step's (the table in the module docstring), and errors naming the variables that are missing."""

from __future__ import annotations

import pytest
from rlhf_hybrid.launch_env import LaunchEnvError, first_host, launched, launcher_variables, slurm_variables

TORCH = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
# what srun gives task 5 of a 2-node x 4-task step (the second node's second task)
SRUN = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_JOB_ID": "1234567", "SLURM_STEP_ID": "0"}


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node1", "node1"),
    ("node1,node2", "node1"),
    ("gpu[07-09,12],cpu3", "gpu07"),  # zero padding kept
    ("gpu[12,07-09]", "gpu12"),  # the list's order, not sorted
    ("rack[2-3]-n[01-04]", "rack2-n01"),
    ("a[1-2]b[3-4],c", "a1b3"),
    ("  host.example.org  ", "host.example.org"),
])
def test_first_host_of_a_slurm_hostlist(nodelist: str, first: str) -> None:
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "gpu[07-09", ","])
def test_malformed_hostlists_are_errors(nodelist: str) -> None:
    with pytest.raises(LaunchEnvError, match="SLURM node list"):
        first_host(nodelist)


def test_torch_variables_are_used_as_they_are() -> None:
    assert launcher_variables(TORCH) == ("torch", TORCH)
    assert launcher_variables(TORCH | SRUN) == ("torch", TORCH)  # torchrun inside an srun step: torchrun's world
    assert launched(TORCH)


def test_srun_task_variables_are_derived() -> None:
    # 20000 + 1234567 % 20000 = 20000 + 14567
    assert launcher_variables(SRUN) == ("slurm", {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                                  "MASTER_ADDR": "gpu007", "MASTER_PORT": "34567"})
    assert launched(SRUN)
    mine = slurm_variables(SRUN | {"MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "29400"})  # set ones win
    assert (mine["MASTER_ADDR"], mine["MASTER_PORT"]) == ("10.1.1.1", "29400")
    old = {k: v for k, v in SRUN.items() if k not in ("SLURM_STEP_NODELIST",)}
    assert slurm_variables(old | {"SLURM_JOB_NODELIST": "n[3-4]"})["MASTER_ADDR"] == "n3"


def test_a_plain_process_and_a_batch_script_are_not_launched() -> None:
    assert launcher_variables({}) == ("none", {})
    # a batch script's own shell: the allocation's SLURM_NTASKS and SLURM_PROCID=0, but no srun step
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1", "SLURM_NODELIST": "gpu[1-2]"}
    assert launcher_variables(batch) == ("none", {}) and not launched(batch)


@pytest.mark.parametrize(("drop", "named"), [
    (("WORLD_SIZE",), "but WORLD_SIZE is not"),
    (("MASTER_ADDR", "MASTER_PORT"), "but MASTER_ADDR, MASTER_PORT are not"),
    (("LOCAL_RANK",), "but LOCAL_RANK is not"),
])
def test_incomplete_torch_variables_name_the_missing_ones(drop: tuple[str, ...], named: str) -> None:
    with pytest.raises(LaunchEnvError, match=named):
        launcher_variables({k: v for k, v in TORCH.items() if k not in drop})


@pytest.mark.parametrize(("env", "named"), [
    (TORCH | {"RANK": "x"}, "RANK='x': not allowed; allowed: a non-negative integer"),
    (TORCH | {"RANK": "4"}, "RANK=4, WORLD_SIZE=4: not allowed; allowed: 0 <= RANK < WORLD_SIZE"),
    (TORCH | {"MASTER_PORT": "70000"}, "MASTER_PORT=70000: not allowed; allowed: 1..65535"),
    (SRUN | {"SLURM_PROCID": "8"}, "RANK=8, WORLD_SIZE=8 (from SLURM_PROCID, SLURM_STEP_NUM_TASKS)"),
    (SRUN | {"SLURM_LOCALID": "one"}, "LOCAL_RANK='one' (from SLURM_LOCALID): not allowed"),
    (SRUN | {"SLURM_JOB_ID": "12_3"}, "SLURM_JOB_ID='12_3': not allowed"),
])
def test_malformed_values_are_named(env: dict, named: str) -> None:
    with pytest.raises(LaunchEnvError) as e:
        launcher_variables(env)
    assert named in str(e.value)


@pytest.mark.parametrize(("drop", "named"), [
    (("SLURM_LOCALID",), "SLURM_LOCALID is not set"),
    (("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"), "SLURM_STEP_NODELIST (or MASTER_ADDR) is not set"),
    (("SLURM_JOB_ID",), "SLURM_JOB_ID (or MASTER_PORT) is not set"),
])
def test_incomplete_srun_variables_name_the_missing_ones(drop: tuple[str, ...], named: str) -> None:
    with pytest.raises(LaunchEnvError) as e:
        launcher_variables({k: v for k, v in SRUN.items() if k not in drop})
    assert named in str(e.value) and "SLURM_PROCID" in str(e.value)
