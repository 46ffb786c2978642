"""Developer and CI sessions for the rlhf monorepo.

    python3 -m pip install nox
    python3 -m nox -s tests                    # install everything, run every test (slow ones too)
    python3 -m nox -s tests -- -m "not slow"   # the quick run
    python3 -m nox -s tests -- packages/rlhf-algos/tests -q   # only these paths
    python3 -m nox -s lint
    python3 -m nox -s demo                     # rlhf run --stage all on the built-in demo
    python3 -m nox -s demo -- rl.iterations=10             # ... with config overrides
    python3 -m nox -s kernels_standalone       # rlhf-kernels alone, with nothing but torch (+ triton)
    python3 -m nox -s bench_kernels            # kernels vs their PyTorch references (CPU: small sizes)

Every session builds a fresh virtual environment under .nox/ (``-r`` reuses it) and installs with
``-c constraints/dev.txt``. That file pins the CPU build of torch that lies on the CI machine's
disk: torch is installed first, in its own pip call, so that nothing later in the install
(deepspeed's requirements, transformers) can resolve an unpinned torch to a multi-GB CUDA build.
The packages' own metadata stays unpinned: on a GPU machine, install them into an environment
that already has a CUDA torch instead of using these sessions (see README.md).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
CONSTRAINTS = str(ROOT / "constraints" / "dev.txt")

# Install order matters only for readability: pip resolves the five together.
PACKAGES = ["rlhf-kernels", "rlhf-data", "rlhf-algos", "rlhf-hybrid", "rlhf-cli"]
TEST_PATHS = [f"packages/{p}/tests" for p in PACKAGES] + ["tests"]
LINT_PATHS = ["packages", "tests", "benchmarks", "scripts", "noxfile.py"]
# Pinned here so a new ruff release cannot turn CI red on unchanged code.
RUFF = "ruff==0.17.6"
# rlhf-kernels' optional extra; the test sessions install it so that the Triton kernels are tested
# (on CPU through TRITON_INTERPRET=1, which the kernels' conftest.py sets when there is no GPU).
# Pinned for the same reason as ruff: the interpreter's behaviour changes between releases. The
# interpreter runs on numpy, which triton itself does not require.
TRITON = ("triton==3.9.0", "numpy")

# OMP_NUM_THREADS=1 for the tests (a value already in the environment wins). Measured on the
# 2-core CI-class machine with other work running on it (load average about 5): the kernels +
# algos unit tests took 12.5-16.3 s with it and 30.4-37.6 s without; a scaled-down `rlhf run
# --stage all` 162 s against 1033 s. The test suite's tuned multi-process recipes also assume it.
# The demo (one process, on an otherwise idle machine) keeps torch's default of one thread per
# core: there one demo training step took 0.104 s with 2 threads and 0.177 s with 1.
CPU_ENV = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

# Defaults for every test run (again, the environment wins): DeepSpeed would otherwise probe for
# accelerators (and warn) in each process; the hub is unreachable on CI, so an accidental
# download fails at once instead of waiting for timeouts.
TEST_ENV = CPU_ENV | {
    name: os.environ.get(name, default)
    for name, default in {
        "DS_ACCELERATOR": "cpu",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items()
}

nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "no"
nox.options.sessions = ["lint", "tests"]


def _install_torch(session: nox.Session) -> None:
    """The pinned torch first, alone: later installs then find it satisfied and leave it."""
    session.install("-q", "-c", CONSTRAINTS, "torch")


def _install_built(session: nox.Session, *packages: str, extra: tuple[str, ...] = ()) -> None:
    """Install ``packages`` non-editable, as users get them.

    setuptools builds in ``packages/<name>/build/`` and reuses what it finds there, so a module
    deleted from src/ could still ship; the folder is removed before and after.
    """
    build_dirs = [ROOT / "packages" / p / "build" for p in packages]
    for d in build_dirs:
        shutil.rmtree(d, ignore_errors=True)
    session.install("-q", "-c", CONSTRAINTS, *[f"packages/{p}" for p in packages], *extra)
    for d in build_dirs:
        shutil.rmtree(d, ignore_errors=True)


def _existing(paths: list[str]) -> list[str]:
    """``paths`` that exist (git keeps no empty test folder, so a fresh clone may lack one)."""
    return [p for p in paths if (ROOT / p).exists()]


# pytest options whose value is the next argument (so `-k tests` does not read as the path "tests").
_VALUE_OPTIONS = {"-k", "-m", "-p", "-o", "-c", "-W", "--rootdir", "--ignore", "--deselect", "--tb"}


def _names_paths(posargs: list[str]) -> bool:
    """True when the user named test paths or node ids (``path/to/test.py::test_x``)."""
    return any(
        not arg.startswith("-") and prev not in _VALUE_OPTIONS and (ROOT / arg.split("::")[0]).exists()
        for prev, arg in zip(["", *posargs], posargs, strict=False)
    )


@nox.session
def tests(session: nox.Session) -> None:
    """Every package's tests and the cross-package tests, against editable installs."""
    _install_torch(session)
    editable = [arg for p in PACKAGES for arg in ("-e", f"packages/{p}")]
    # peft: rlhf-hybrid fuses peft LoRA models' adapters (packages/rlhf-hybrid/tests/test_peft.py); optional
    # for users, installed here so that those tests run rather than skip.
    session.install("-q", "-c", CONSTRAINTS, *editable, "pytest", "peft", *TRITON)
    # Named paths replace the default ones; options alone (-m "not slow", -x, -k ...) add to them.
    paths = [] if _names_paths(session.posargs) else _existing(TEST_PATHS)
    session.run("pytest", *paths, *session.posargs, env=TEST_ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check with the root pyproject.toml's configuration."""
    session.install("-q", RUFF)
    session.run("ruff", "check", *_existing(LINT_PATHS), *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Install the packages (as users do, non-editable) and run the whole pipeline on the demo task.

    Extra arguments are passed to ``rlhf run`` (e.g. ``-- rl.iterations=10 sft.epochs=4``).
    """
    _install_torch(session)
    _install_built(session, *PACKAGES)
    out = ROOT / "runs" / "demo"
    # summary.json merges with an earlier one; start clean so the numbers are this run's.
    shutil.rmtree(out, ignore_errors=True)
    session.run("rlhf", "run", "--stage", "all", "--out", str(out), *session.posargs)
    session.log(f"{out / 'summary.json'}:")
    print((out / "summary.json").read_text(), flush=True)
    # 44 + 69 is a held-out evaluation question (never trained on) that carries: the SFT model
    # tends to forget the carry (103), the PPO model should answer 113.
    for stage in ("sft", "ppo"):
        session.log(f"{stage} model, held-out question 'What is 44 + 69?':")
        session.run("rlhf", "chat", "--model", str(out / stage), "--prompt", "What is 44 + 69?")


_KERNELS_ALONE_CHECK = """
import importlib.util, sys, sysconfig
extra = [m for m in ("deepspeed", "transformers", "datasets", "rlhf_data", "rlhf_hybrid") if importlib.util.find_spec(m)]
if extra:
    sys.exit(f"rlhf-kernels pulled in {extra}; it must depend on torch only")
import rlhf_kernels
if not rlhf_kernels.__file__.startswith(sysconfig.get_paths()["purelib"]):
    sys.exit(f"rlhf_kernels imports from {rlhf_kernels.__file__}, not from the installed wheel")
print(f"rlhf_kernels {rlhf_kernels.__version__} alone, from {rlhf_kernels.__file__}")
"""


@nox.session
def kernels_standalone(session: nox.Session) -> None:
    """rlhf-kernels installed alone (non-editable, torch its only dependency) passes its tests.

    triton, its optional extra, is installed too, so that the Triton kernels are tested as well.
    """
    _install_torch(session)
    _install_built(session, "rlhf-kernels", extra=("pytest", *TRITON))
    session.run("python", "-c", _KERNELS_ALONE_CHECK)
    # Run from the package's folder with its own pyproject.toml as the pytest config file, so
    # neither the workspace's pytest settings and conftest files nor the source tree (tests import
    # the installed wheel) are involved.
    session.chdir(ROOT / "packages" / "rlhf-kernels")
    session.run(
        "pytest",
        "-c",
        "pyproject.toml",
        "--rootdir",
        ".",
        "-p",
        "no:cacheprovider",
        "-o",
        "markers=gpu: needs a CUDA GPU; skipped without one",
        "tests",
        *session.posargs,
        env=TEST_ENV,
    )


@nox.session
def bench_kernels(session: nox.Session) -> None:
    """Every rlhf-kernels op against its PyTorch reference: time, peak memory, fraction of copy bandwidth.

    Full sizes on a GPU, small ones on CPU (where the Triton rows are skipped). Writes
    runs/bench-kernels.json (device, versions, git SHA, command, results) and prints a markdown table.
    Extra arguments go to ``python -m rlhf_kernels.bench`` (e.g. ``-- --ops fused_logprobs --size full``).
    """
    _install_torch(session)
    _install_built(session, "rlhf-kernels", extra=TRITON)
    (ROOT / "runs").mkdir(exist_ok=True)
    out = str(ROOT / "runs" / "bench-kernels.json")
    session.run("python", "-m", "rlhf_kernels.bench", "--out", out, *session.posargs, env=CPU_ENV)
