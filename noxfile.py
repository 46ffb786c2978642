"""Developer and CI sessions for the rlhf monorepo.

    python3 -m venv .venv-nox && .venv-nox/bin/pip install -q nox   # once; `nox` below is .venv-nox/bin/nox
    nox -s tests                    # install everything (the lock), run every test (slow ones too)
    nox -s tests -- -m "not slow"   # the quick run
    nox -s tests -- packages/rlhf-algos/tests -q   # only these paths
    nox -s lint                     # ruff, then scripts/check_size.py (module/function size limits)
    nox -s demo                     # rlhf run --stage all on the built-in demo (locked versions)
    nox -s demo -- rl.iterations=10             # ... with config overrides
    nox -s demo_latest              # the same with the newest releases allowed: runs/demo-latest
    nox -s kernels_standalone       # rlhf-kernels alone: with nothing but torch, then with triton too
    nox -s bench_kernels            # kernels vs their PyTorch references (CPU: small sizes)
    nox -s lock                     # regenerate constraints/lock.txt

Every session builds a fresh virtual environment under .nox/ (``-r`` reuses it). The ``tests``,
``demo``, ``kernels_standalone`` and ``bench_kernels`` sessions install with
``-c constraints/lock.txt``: a full lock (every transitive package, ``name==version``) for Linux
x86_64 / CPython 3.11, so a new transformers or datasets release cannot change the tests' or the
demo's results. ``constraints/dev.txt`` is the loose input to the lock: it pins torch (the CPU
build that lies on the CI machine's disk), deepspeed and peft and gives ranges for the rest;
``nox -s lock`` installs the newest releases it and the packages' metadata allow into a fresh
venv and writes what got installed to the lock. ``nox -s demo_latest`` runs the demo on those
newest releases without the lock (into runs/demo-latest), to see whether a relock would change
the demo's numbers before relocking. Both demo sessions print the versions they ran with.

torch is installed first, in its own pip call, so that nothing later in the install (deepspeed's
requirements, transformers) can resolve an unpinned torch to a multi-GB CUDA build. The packages'
own metadata stays unpinned: on a GPU machine, install them into an environment that already has
a CUDA torch instead of using these sessions (see README.md).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
# The loose input (torch, deepspeed and peft pinned, ranges for the rest) and the full lock made
# from it by the `lock` session; see the module docstring.
CONSTRAINTS = str(ROOT / "constraints" / "dev.txt")
LOCK = str(ROOT / "constraints" / "lock.txt")

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
# What the tests session installs besides the five packages (and the lock session too, so that the
# lock covers it; tests/test_lock.py reads this to check that it does).
# peft: rlhf-hybrid fuses peft LoRA models' adapters (packages/rlhf-hybrid/tests/test_peft.py);
# optional for users, installed here so that those tests run rather than skip.
# hypothesis: the property-based fuzz of config overrides and data rows (tests/test_fuzz_inputs.py).
# tensorboard, matplotlib: rlhf-cli's [tensorboard] and [plots] extras (report.to=tensorboard, the plots
# of report.md; tests/test_cli_report.py reads the event files and PNGs back).
TEST_EXTRAS = ("pytest", "peft", "hypothesis", *TRITON, "tensorboard", "matplotlib")
# Optional extras that no locked session installs, so the lock does not pin them (tests/test_lock.py
# checks every other extra is locked): rlhf-cli's tracker sinks, each a large dependency tree; their tests
# skip, with the reason, where the package is absent.
UNLOCKED_EXTRAS = {"rlhf-cli": ("wandb", "mlflow", "trackio")}

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


def _install_torch(session: nox.Session, constraints: str = LOCK) -> None:
    """The pinned torch first, alone: later installs then find it satisfied and leave it."""
    session.install("-q", "-c", constraints, "torch")


def _install_built(
    session: nox.Session, *packages: str, extra: tuple[str, ...] = (), constraints: str = LOCK
) -> None:
    """Install ``packages`` non-editable, as users get them.

    setuptools builds in ``packages/<name>/build/`` and reuses what it finds there, so a module
    deleted from src/ could still ship; the folder is removed before and after.
    """
    build_dirs = [ROOT / "packages" / p / "build" for p in packages]
    for d in build_dirs:
        shutil.rmtree(d, ignore_errors=True)
    session.install("-q", "-c", constraints, *[f"packages/{p}" for p in packages], *extra)
    for d in build_dirs:
        shutil.rmtree(d, ignore_errors=True)


def _existing(paths: list[str]) -> list[str]:
    """``paths`` that exist (git keeps no empty test folder, so a fresh clone may lack one)."""
    return [p for p in paths if (ROOT / p).exists()]


_EDITABLE = [arg for p in PACKAGES for arg in ("-e", f"packages/{p}")]

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
    session.install("-q", "-c", LOCK, *_EDITABLE, *TEST_EXTRAS)
    # Named paths replace the default ones; options alone (-m "not slow", -x, -k ...) add to them.
    paths = [] if _names_paths(session.posargs) else _existing(TEST_PATHS)
    # --durations: the CI log names the slowest tests (the suite should stay under ~30 minutes on 2 cores)
    session.run("pytest", *paths, "--durations=30", *session.posargs, env=TEST_ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check with the root pyproject.toml's configuration, then the size limits of the library
    code (scripts/check_size.py: modules <= 500 lines, functions <= 60; the standard library only)."""
    session.install("-q", RUFF)
    session.run("ruff", "check", *_existing(LINT_PATHS), *session.posargs)
    session.run("python", "scripts/check_size.py")


# The versions a demo ran with (what a relock would change), printed before it runs.
_DEMO_VERSIONS = ("torch", "transformers", "tokenizers", "datasets", "deepspeed", "accelerate", "numpy")
_PRINT_VERSIONS = f"""
from importlib.metadata import PackageNotFoundError, version
for name in {_DEMO_VERSIONS!r}:
    try:
        print(f"{{name:<13}} {{version(name)}}")
    except PackageNotFoundError:
        print(f"{{name:<13}} not installed")
"""


def _demo(session: nox.Session, constraints: str, out: Path) -> None:
    """Install the packages with ``constraints`` (as users do, non-editable), print the versions
    that got installed and run the whole pipeline on the demo task into ``out``."""
    _install_torch(session, constraints)
    # rlhf-cli's plots extra (matplotlib): the demo writes runs/demo/plots/*.png and report.md
    _install_built(session, *PACKAGES, extra=("matplotlib",), constraints=constraints)
    session.log(f"installed with -c {Path(constraints).relative_to(ROOT)}:")
    # Under --install-only session.run runs nothing and returns None: stop here, before the
    # Python code below deletes `out` and reads a summary.json that no run wrote.
    if session.run("python", "-c", _PRINT_VERSIONS) is None:
        return
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


@nox.session
def demo(session: nox.Session) -> None:
    """The whole pipeline on the demo task into runs/demo, installed as users do, with the lock.

    The packages are installed non-editable. Extra arguments are passed to ``rlhf run`` (e.g. ``-- rl.iterations=10 sft.epochs=4``).
    """
    _demo(session, LOCK, ROOT / "runs" / "demo")


@nox.session
def demo_latest(session: nox.Session) -> None:
    """The demo without the lock (the newest releases dev.txt allows) into runs/demo-latest.

    Only ``-c constraints/dev.txt``: the newest releases that it and the packages' metadata allow,
    i.e. what ``nox -s lock`` would lock now. Compare its summary.json with runs/demo's before
    relocking: a difference is the new releases' doing.

    Extra arguments are passed to ``rlhf run``.
    """
    _demo(session, CONSTRAINTS, ROOT / "runs" / "demo-latest")


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
@nox.parametrize("triton", [False, True], ids=["torch-only", "with-triton"])
def kernels_standalone(session: nox.Session, triton: bool) -> None:
    """rlhf-kernels installed alone (non-editable, torch its only dependency) passes its tests.

    Twice: as `pip install rlhf-kernels` gives it (torch only: every op runs its PyTorch reference,
    an explicit Triton request says triton is missing), and with triton, its optional extra, so that
    the Triton kernels are tested as well.
    """
    _install_torch(session)
    _install_built(session, "rlhf-kernels", extra=("pytest", *(TRITON if triton else ())))
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


# The lock's header. The platform line is checked by the session: pip resolves platform-specific
# dependencies (markers, wheels) for the interpreter it runs under.
_LOCK_PLATFORM = "Linux x86_64, CPython 3.11"
_LOCK_HEADER = f"""\
# Full lock for development, CI and the demo: every package (transitive ones included) that the
# nox sessions tests, demo, kernels_standalone and bench_kernels install, except the five rlhf-*
# packages themselves. They install with `-c constraints/lock.txt`; demo_latest does not.
# Platform: {_LOCK_PLATFORM}.
# Generated from constraints/dev.txt (the loose input) and the packages' metadata by
#     python3 -m nox -s lock
# Do not edit by hand: change dev.txt or a pyproject.toml and regenerate.
# torch is written without its local version tag (2.13.0, not 2.13.0+cpu): here it matches the CPU
# build in pip's local wheel directory, elsewhere PyPI's build (on Linux a CUDA build, whose
# nvidia-* dependencies are not in this lock).
"""
_PLATFORM_CHECK = """
import platform, sys
print(platform.system(), platform.machine(), sys.implementation.name, *sys.version_info[:2])
"""
# Installed into every venv; pip freeze leaves them out. A pinned package that requires one keeps
# it in the lock.
_INSTALLER_PACKAGES = ("pip", "setuptools", "wheel")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _required_installers(session: nox.Session) -> set[str]:
    """Those of pip/setuptools/wheel that an installed distribution requires (pip show's Required-by)."""
    shown = session.run(
        "python", "-m", "pip", "show", *_INSTALLER_PACKAGES, silent=True, success_codes=[0, 1], stderr=None
    )
    required, name = set(), None
    for line in shown.splitlines():
        key, _, value = line.partition(":")
        if key == "Name":
            name = _canonical(value.strip())
        elif key == "Required-by" and value.strip():
            required.add(name)
    return required


@nox.session(python="3.11")
def lock(session: nox.Session) -> None:
    """Regenerate constraints/lock.txt from constraints/dev.txt (newest releases allowed).

    Installs what the tests session installs (a superset of the other locked sessions) with only
    ``-c constraints/dev.txt`` into a fresh venv, and writes every installed package but the
    rlhf-* ones, pinned, sorted, atomically.
    """
    here = session.run("python", "-c", _PLATFORM_CHECK, silent=True, stderr=None).split()
    if here != ["Linux", "x86_64", "cpython", "3", "11"]:
        session.error(f"the lock is for {_LOCK_PLATFORM}; this venv is {' '.join(here)}")
    _install_torch(session, CONSTRAINTS)
    # The tests session's install (editable, so that the packages fall out of pip freeze); the other
    # locked sessions install subsets of it.
    session.install("-q", "-c", CONSTRAINTS, *_EDITABLE, *TEST_EXTRAS)
    # stderr=None: pip's warnings go to the terminal, not into the text parsed here.
    frozen = session.run(
        "python", "-m", "pip", "freeze", "--all", "--exclude-editable", silent=True, stderr=None
    )
    keep_installers = _required_installers(session)
    pins: dict[str, str] = {}
    for line in frozen.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.strip().partition("==")
        if not sep:
            session.error(f"pip freeze gave {line!r}, not name==version; cannot lock it")
        name = _canonical(name)
        if name.startswith("rlhf-") or (name in _INSTALLER_PACKAGES and name not in keep_installers):
            continue
        # A local version tag (torch's +cpu) names a build only this machine's wheel directory has;
        # the public version matches that build here and PyPI's elsewhere.
        pins[name] = version.split("+", 1)[0]
    text = _LOCK_HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))
    tmp = Path(LOCK + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, LOCK)
    session.log(f"wrote {len(pins)} pins to {Path(LOCK).relative_to(ROOT)}")
