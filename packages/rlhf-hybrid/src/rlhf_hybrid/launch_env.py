"""Where this process sits in the world, read from its launcher's environment variables.

``init_distributed`` joins the default process group through ``env://``: the five variables
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. What sets them:

* ``torchrun`` (single- or multi-node, ``--nnodes N --node-rank i --rdzv-endpoint HOST:PORT``) and
  the DeepSpeed launcher (``deepspeed``, with or without a hostfile) set all five for every process;
  with ``RANK`` set, every one of them must be there and be well formed (:class:`LaunchEnvError`
  names the missing or bad ones otherwise).
* ``srun`` (SLURM) sets its own. When ``RANK`` is absent and the process is a task of an srun step
  (``SLURM_STEP_NUM_TASKS`` is set: srun sets it, a batch script's own shell has only the
  allocation's ``SLURM_NTASKS``), they are derived (:func:`slurm_variables`):

  ============  ===================================================================================
  RANK          ``SLURM_PROCID``
  WORLD_SIZE    ``SLURM_STEP_NUM_TASKS`` (the step's tasks; ``SLURM_NTASKS`` where a step lacks it)
  LOCAL_RANK    ``SLURM_LOCALID``
  MASTER_ADDR   ``MASTER_ADDR`` when set, else the first host of ``SLURM_STEP_NODELIST`` (else
                ``SLURM_JOB_NODELIST``, ``SLURM_NODELIST``), expanded from SLURM's hostlist syntax
                (``gpu[07-09,12]`` -> ``gpu07``)
  MASTER_PORT   ``MASTER_PORT`` when set, else ``20000 + SLURM_JOB_ID % 20000`` (the same in every
                task of the job; set MASTER_PORT when two steps of one job run at the same time)
  ============  ===================================================================================

* Neither: a plain process, a world of one (``init_distributed`` fills the variables in).

Nothing here imports torch: the CLI asks :func:`launched` before deciding to relaunch itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["TORCH_VARIABLES", "LaunchEnvError", "first_host", "launched", "launcher_variables", "slurm_variables"]

TORCH_VARIABLES: tuple[str, ...] = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_INTS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


class LaunchEnvError(ValueError):
    """The launcher's environment is incomplete or malformed; the message names the variables."""


def launched(environ: Mapping[str, str]) -> bool:
    """Whether a launcher started this process as one rank of a world (torchrun, deepspeed or srun)."""
    return "RANK" in environ or _in_srun_step(environ)


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in environ and "SLURM_STEP_NUM_TASKS" in environ


def launcher_variables(environ: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """``(source, variables)``: where this process's place in the world comes from and the five ``env://``
    variables to use.

    ``source`` is ``"torch"`` (RANK set: the variables as they are, checked), ``"slurm"`` (derived from an
    srun step's variables, :func:`slurm_variables`) or ``"none"`` (a plain process; no variables).

    Raises:
        LaunchEnvError: naming every missing or malformed variable.
    """
    if "RANK" in environ:
        variables = {k: environ[k] for k in TORCH_VARIABLES if k in environ}
        missing = [k for k in TORCH_VARIABLES if k not in environ]
        if missing:
            raise LaunchEnvError(f"RANK={environ['RANK']!r} is set (this process is one rank of a launched world) "
                                 f"but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; a launcher "
                                 f"sets all of {', '.join(TORCH_VARIABLES)} (torchrun and the deepspeed launcher do)")
        _check_torch_values(variables, "")
        return "torch", variables
    if _in_srun_step(environ):
        return "slurm", slurm_variables(environ)
    return "none", {}


def _check_torch_values(variables: dict[str, str], origin: str) -> None:
    """The integers are integers, 0 <= RANK < WORLD_SIZE, a port in 1..65535; ``origin`` names their sources."""
    bad = [f"{k}={variables[k]!r}{origin and ' (from ' + _ORIGIN[k] + ')'}" for k in _INTS
           if not re.fullmatch(r"\d+", variables[k].strip())]
    if bad:
        raise LaunchEnvError(f"{', '.join(bad)}: not allowed; allowed: a non-negative integer")
    rank, world, port = int(variables["RANK"]), int(variables["WORLD_SIZE"]), int(variables["MASTER_PORT"])
    if not 0 <= rank < world:
        src = origin and f" (from {_ORIGIN['RANK']}, {_ORIGIN['WORLD_SIZE']})"
        raise LaunchEnvError(f"RANK={rank}, WORLD_SIZE={world}{src}: not allowed; allowed: 0 <= RANK < WORLD_SIZE")
    if not 1 <= port <= 65535:
        raise LaunchEnvError(f"MASTER_PORT={port}: not allowed; allowed: 1..65535")


_ORIGIN = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_STEP_NUM_TASKS", "LOCAL_RANK": "SLURM_LOCALID",
           "MASTER_PORT": "MASTER_PORT or SLURM_JOB_ID"}


def slurm_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The five ``env://`` variables of a task of an srun step (table in the module docstring).

    Raises:
        LaunchEnvError: naming the SLURM (or torch) variable that is missing or malformed.
    """
    need = {"SLURM_PROCID": "RANK", "SLURM_LOCALID": "LOCAL_RANK"}
    missing = [k for k in need if k not in environ]
    world = environ.get("SLURM_STEP_NUM_TASKS", environ.get("SLURM_NTASKS"))
    if world is None:
        missing.append("SLURM_STEP_NUM_TASKS")
    addr = environ.get("MASTER_ADDR")
    if addr is None:
        nodes = next((environ[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                      if environ.get(k)), None)
        if nodes is None:
            missing.append("SLURM_STEP_NODELIST (or MASTER_ADDR)")
        else:
            addr = first_host(nodes)
    port = environ.get("MASTER_PORT")
    if port is None:
        job = environ.get("SLURM_JOB_ID", environ.get("SLURM_JOBID"))
        if job is None:
            missing.append("SLURM_JOB_ID (or MASTER_PORT)")
        elif not job.strip().isdigit():
            raise LaunchEnvError(f"SLURM_JOB_ID={job!r}: not allowed; allowed: a non-negative integer (or set "
                                 f"MASTER_PORT)")
        else:
            port = str(SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN)
    if missing:
        raise LaunchEnvError(f"srun step (SLURM_PROCID and SLURM_STEP_NUM_TASKS are set, RANK is not): "
                             f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; the ranks are "
                             f"derived from SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID, SLURM_STEP_NODELIST "
                             f"and SLURM_JOB_ID, or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT yourself")
    variables = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": environ["SLURM_LOCALID"],
                 "MASTER_ADDR": addr, "MASTER_PORT": port}
    _check_torch_values(variables, "slurm")
    return variables


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist: ``"gpu[07-09,12],cpu3"`` -> ``"gpu07"``; ``"a[1-2]b[3-4]"`` -> ``"a1b3"``.

    Each bracket group contributes its first item (the start of a range keeps its zero padding).

    Raises:
        LaunchEnvError: on an empty list or an unclosed bracket.
    """
    text, host = nodelist.strip(), []
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            break
        if c == "[":
            close = text.find("]", i)
            if close < 0:
                raise LaunchEnvError(f"SLURM node list {nodelist!r}: unclosed '['")
            first = text[i + 1 : close].split(",")[0].split("-")[0]
            host.append(first.strip())
            i = close + 1
            continue
        host.append(c)
        i += 1
    if not "".join(host).strip():
        raise LaunchEnvError(f"SLURM node list {nodelist!r}: no host in it")
    return "".join(host).strip()
