"""Shared fixtures of the cross-package tests: run the ``rlhf`` CLI in a fresh subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Variables a launcher (torchrun) or an in-process init_distributed() may have set; a child that
# inherits RANK would think it is already a torchrun worker and never relaunch itself.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# The tokenization cache of every CLI run in these tests (never the user's ~/.cache/rlhf).
_CACHE_DIR = tempfile.mkdtemp(prefix="rlhf-test-cache-")


def cli_env() -> dict[str, str]:
    # SLURM_*: a test suite run inside an srun step must not make every CLI child a task of that step
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV and not k.startswith("SLURM_")}
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",  # every model in these tests is local; never reach for the hub
        TRANSFORMERS_OFFLINE="1",
        COLUMNS="200",  # help text on one line per option
        PYTHONUNBUFFERED="1",
        RLHF_CACHE_DIR=_CACHE_DIR,
    )
    return env


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the command's session (torchrun then stops its workers), then SIGKILL what is left.

    torchrun starts each worker in a session of its own, so the workers are found through /proc
    before anything is signalled.
    """
    tree = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    for pid in [proc.pid, *tree]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _run(args: list[str], *, timeout: float = 300, cwd=None, env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess:
    """``python -m rlhf_cli ARGS`` in a fresh process; a hang fails the test after ``timeout`` s.

    The command runs in its own session so that on a timeout the whole tree (the CLI, torchrun and
    its workers) is killed, not just the first process.
    """
    cmd = [sys.executable, "-m", "rlhf_cli", *map(str, args)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env() | (env or {}), cwd=cwd,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            out, err = proc.communicate()
            pytest.fail(f"`rlhf {' '.join(map(str, args))}` did not finish within {timeout} s (killed)\n"
                        f"--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="session")
def rlhf() -> Callable[..., subprocess.CompletedProcess]:
    """The CLI runner: ``rlhf(["run", "--stage", "sft", ...], timeout=...)``."""
    return _run


def describe(proc: subprocess.CompletedProcess) -> str:
    """The tail of a finished CLI run, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="session")
def explain() -> Callable[[subprocess.CompletedProcess], str]:
    return describe


@pytest.fixture(scope="session")
def cli_tools():
    """``(cli_env, descendants)`` for tests that drive CLI processes themselves (signals, kills)."""
    return cli_env, _descendants


@pytest.fixture(scope="module")
def in_process_world(tmp_path_factory):
    """For tests that call ``rlhf`` in-process (typer's CliRunner): a world of one for init_distributed, a
    tokenization cache of the module's own, the hub offline, DeepSpeed on the CPU; the environment is put
    back afterwards."""
    from rlhf_hybrid.testing import world_of_one

    keys = ("RLHF_CACHE_DIR", "HF_HUB_OFFLINE", "DS_ACCELERATOR")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RLHF_CACHE_DIR=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    with world_of_one():
        yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def save_tiny_demo_model(d: Path, *, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int) -> Path:
    """A complete tiny Llama directory at ``d`` (config, safetensors weights, the demo's tokenizer); the
    weights are drawn from torch's global RNG."""
    from rlhf_data import AdditionTask, train_demo_tokenizer
    from rlhf_hybrid import tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = train_demo_tokenizer(AdditionTask().corpus())
    model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden_size=hidden_size, num_layers=num_layers,
                                               num_heads=num_heads, intermediate_size=intermediate_size,
                                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_demo_model():
    """:func:`save_tiny_demo_model`, for tests in other modules (conftest is not importable by name)."""
    return save_tiny_demo_model


@pytest.fixture(scope="module")
def demo_tok():
    """The demo's tokenizer (trained on the addition task's corpus; its chat template is the plain format)."""
    from rlhf_data import AdditionTask, train_demo_tokenizer

    return train_demo_tokenizer(AdditionTask().corpus())


@pytest.fixture(scope="module")
def letters_model(demo_tok, tmp_path_factory):
    """``(directory, tokenizer, model)``: a tiny random Llama whose output layer can only pick letter tokens
    (every other row of ``lm_head`` is zero, so a letter always has the highest logit): its greedy replies
    are printable, never end early (no EOS) and differ from prompt to prompt. Saved with the demo tokenizer
    (``rlhf chat`` tests)."""
    import re

    import torch
    from rlhf_hybrid import tiny_llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(len(demo_tok), hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                            pad_token_id=demo_tok.pad_token_id, eos_token_id=demo_tok.eos_token_id)
    cfg.tie_word_embeddings = False  # the input embeddings keep every token
    model = LlamaForCausalLM(cfg).eval()
    letters = torch.tensor([bool(re.fullmatch(r"[A-Za-z]+", demo_tok.decode([i]))) for i in range(len(demo_tok))])
    with torch.no_grad():
        model.lm_head.weight[~letters] = 0
        model.lm_head.weight[letters] *= 20
    d = tmp_path_factory.mktemp("letters")
    model.save_pretrained(d)
    demo_tok.save_pretrained(d)
    return d, AutoTokenizer.from_pretrained(d), model
