"""constraints/lock.txt is a well-formed full lock that agrees with constraints/dev.txt and covers
every requirement the packages and the nox sessions name (regenerate it with
``python3 -m nox -s lock``). Reads files only: no install, no network."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints" / "lock.txt"
DEV = ROOT / "constraints" / "dev.txt"

_PIN = re.compile(r"([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)==([0-9][A-Za-z0-9.!+]*)")


def parse_lock(text: str) -> tuple[dict[str, str], list[str]]:
    """The lock's pins (canonical name -> version) and its problems: lines that are neither a
    comment nor ``name==version``, and names pinned twice."""
    pins: dict[str, str] = {}
    problems = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _PIN.fullmatch(line)
        if m is None:
            problems.append(f"line {n}: {line!r} is neither a comment nor name==version")
            continue
        name = canonicalize_name(m[1])
        if name in pins:
            problems.append(f"line {n}: {name} pinned twice")
        pins[name] = m[2]
    return pins, problems


def _requirements(lines: list[str]) -> list[Requirement]:
    """Requirement lines (comments and blank lines skipped) as Requirements."""
    reqs = (line.split("#", 1)[0].strip() for line in lines)
    return [Requirement(r) for r in reqs if r]


def dev_requirements() -> list[Requirement]:
    return _requirements(DEV.read_text().splitlines())


def noxfile_constants(*names: str) -> dict[str, object]:
    """Module-level constants of noxfile.py (it imports nox, which the test venv lacks), evaluated
    from their assignments alone, in order."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    assigns = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in names for t in node.targets)
    ]
    namespace: dict[str, object] = {}
    exec(compile(ast.Module(body=assigns, type_ignores=[]), "noxfile.py", "exec"), namespace)
    return {name: namespace[name] for name in names}


def named_requirements() -> dict[str, list[Requirement]]:
    """What must be locked, by where it is named: each package's dependencies and optional
    extras (the rlhf-* packages themselves excepted), and what the tests session installs
    besides the packages (a superset of the other locked sessions' extras)."""
    named: dict[str, list[Requirement]] = {}
    unlocked = noxfile_constants("UNLOCKED_EXTRAS")["UNLOCKED_EXTRAS"]
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        project = tomllib.loads(pyproject.read_text())["project"]
        deps = list(project.get("dependencies", []))
        for name, extra in project.get("optional-dependencies", {}).items():
            if name not in unlocked.get(project["name"], ()):
                deps += extra
        named[str(pyproject.relative_to(ROOT))] = [
            r for r in _requirements(deps) if not canonicalize_name(r.name).startswith("rlhf-")
        ]
    test_extras = noxfile_constants("TRITON", "TEST_EXTRAS")["TEST_EXTRAS"]
    named["noxfile.py TEST_EXTRAS"] = _requirements(list(test_extras))
    return named


def coverage_problems(pins: dict[str, str], named: dict[str, list[Requirement]]) -> list[str]:
    """Requirements that the lock leaves out or pins outside their specifier."""
    problems = []
    for where, reqs in named.items():
        for req in reqs:
            if req.marker is not None and not req.marker.evaluate():
                continue
            name = canonicalize_name(req.name)
            if name not in pins:
                problems.append(f"{where} requires {req}, which the lock does not pin")
            elif not req.specifier.contains(pins[name], prereleases=True):
                problems.append(f"{where} requires {req}, the lock pins {name}=={pins[name]}")
    return problems


def dev_problems(pins: dict[str, str], dev: list[Requirement]) -> list[str]:
    """dev.txt's pins that the lock does not pin to the same version (without a local tag), and
    its ranges that the lock's versions fall outside."""
    problems = []
    for req in dev:
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"dev.txt constrains {req}, the lock does not pin {name}")
            continue
        exact = [s.version for s in req.specifier if s.operator in ("==", "===")]
        if exact and pins[name] not in exact:
            problems.append(f"dev.txt pins {req}, the lock pins {name}=={pins[name]}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"dev.txt allows {req}, the lock pins {name}=={pins[name]}")
    return problems


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    pins, problems = parse_lock(LOCK.read_text())
    assert not problems, "\n".join(problems)
    return pins


def test_lock_has_a_header_saying_how_to_regenerate_it():
    text = LOCK.read_text()
    header = text.split("\n", 1)[0]
    assert header.startswith("#"), "constraints/lock.txt must start with a header comment"
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "python3 -m nox -s lock" in comments
    assert "Linux x86_64" in comments and "CPython 3.11" in comments


def test_lock_pins_no_rlhf_package_and_no_local_version(lock):
    assert [n for n in lock if n.startswith("rlhf-")] == []
    assert {n: v for n, v in lock.items() if "+" in v} == {}, "local version tags do not resolve elsewhere"


def test_lock_agrees_with_dev_txt(lock):
    dev = dev_requirements()
    for name in ("torch", "deepspeed", "peft"):
        assert any(canonicalize_name(r.name) == name and "==" in str(r.specifier) for r in dev), (
            f"dev.txt no longer pins {name}; update this test"
        )
    problems = dev_problems(lock, dev)
    assert not problems, "\n".join(problems)


def test_lock_covers_every_named_requirement(lock):
    problems = coverage_problems(lock, named_requirements())
    assert not problems, "\n".join(problems) + "\n(regenerate: python3 -m nox -s lock)"


def test_the_checks_catch_a_broken_lock(lock):
    """Each check fails on a lock broken in the way it looks for."""
    named = named_requirements()
    tokenizers = canonicalize_name("tokenizers")  # a transitive dependency rlhf-data names itself
    assert any(canonicalize_name(r.name) == tokenizers for r in named["packages/rlhf-data/pyproject.toml"])
    without = {n: v for n, v in lock.items() if n != tokenizers}
    assert any("tokenizers" in p and "does not pin" in p for p in coverage_problems(without, named))
    too_old = lock | {"transformers": "4.0.0"}
    assert any("transformers" in p for p in coverage_problems(too_old, named))

    dev = dev_requirements()
    assert any("torch" in p for p in dev_problems(lock | {"torch": "2.12.0"}, dev))
    assert any("deepspeed" in p for p in dev_problems(lock | {"deepspeed": "0.0.1"}, dev))

    _, problems = parse_lock("# header\ntorch==2.13.0\ntorch>=2\nnumpy\nTorch==2.13.0\n")
    assert len(problems) == 3, problems


def test_unlocked_extras_are_extras_that_exist():
    # noxfile.py UNLOCKED_EXTRAS exempts extras from the lock; each must name a real extra (a typo would
    # exempt nothing) and none of them may be something the tests session installs.
    unlocked = noxfile_constants("UNLOCKED_EXTRAS")["UNLOCKED_EXTRAS"]
    test_extras = {canonicalize_name(r.name) for r in named_requirements()["noxfile.py TEST_EXTRAS"]}
    for package, extras in unlocked.items():
        project = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())["project"]
        for extra in extras:
            assert extra in project.get("optional-dependencies", {}), f"{package} has no extra {extra!r}"
            for req in _requirements(project["optional-dependencies"][extra]):
                assert canonicalize_name(req.name) not in test_extras, (package, extra, req)


def test_a_public_pin_accepts_the_local_cpu_build():
    # The lock writes torch==2.13.0; pip must accept the local CPU build 2.13.0+cpu under it.
    assert SpecifierSet("==2.13.0").contains("2.13.0+cpu")
