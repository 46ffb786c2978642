"""Size limits of the library code: no module over 500 lines, no function over 60 (issue 12).

    python scripts/check_size.py            # from anywhere; exits 1 and lists what is over
    python scripts/check_size.py --strict   # PENDING entries (below) fail too, as do stale ones

What is checked: every ``packages/*/src/**/*.py`` under the repository root (tests, benchmarks and
scripts are not library code and are not checked).

How lines are counted:

* a module: every line of the file;
* a function (``def`` / ``async def`` anywhere: module level, methods, nested functions; a nested
  function counts within its parent too and is also checked on its own): from its ``def`` line to
  its last line, comments and blank lines included, decorators not, **minus the lines of its
  docstring**. A long docstring documents (Args for many parameters, the paper and equation of a
  loss); it does not make the code longer to read, so it never pushes a function over the limit.

Exempt: functions decorated with ``@triton.jit`` (or ``@triton.jit(...)``). A Triton kernel is the
unit the compiler specialises and launches; splitting one into ``@triton.jit`` helpers relies on
the compiler inlining them back into the same code, which is the kernel's speed and, for sampling,
its exact results: a change to be made with a GPU at hand to measure it (and the kernels' bodies
are single streaming loops whose running state threads through every block). Kernels stay whole
here; their pure-PyTorch references are checked like any other function.

PENDING lists the violations that are known and being fixed elsewhere, each with the reason; they
are reported but do not fail the check (``--strict`` makes them fail). An entry that is no longer
over the limit is reported as stale: remove it (the script fails on stale entries only with
``--strict``; tests/test_code_size.py fails on them always, so PENDING never lists fixed code).
Everything else over a limit fails the check. tests/test_code_size.py runs this check in the test
suite and the ``lint`` nox session runs it too.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60

# "path" for a module, "path::Qualified.name" for a function (paths relative to the root, "/"-separated).
# Empty: the rlhf-cli split (pipeline.py into stages/, config.py into config_sections.py, app.py's run
# and bench_generate) fixed the last entries.
PENDING: dict[str, str] = {}


@dataclass(frozen=True)
class Violation:
    """One module or function over its limit."""

    path: str  # relative to the root, "/"-separated
    line: int
    name: str  # "<module>" or the function's qualified name (Class.method, outer.inner)
    length: int
    limit: int

    @property
    def key(self) -> str:
        return self.path if self.name == "<module>" else f"{self.path}::{self.name}"

    def __str__(self) -> str:
        return f"{self.path}:{self.line} {self.name} {self.length} lines (limit {self.limit})"


def _docstring_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        return first.end_lineno - first.lineno + 1
    return 0


def _is_triton_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Attribute) and target.attr == "jit" and isinstance(target.value, ast.Name)
            and target.value.id == "triton")


def function_lengths(tree: ast.AST) -> Iterator[tuple[str, int, int]]:
    """``(qualified name, def line, counted lines)`` of every function in ``tree`` but the exempt ones."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, int, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = prefix + child.name
                if not any(_is_triton_jit(d) for d in child.decorator_list):
                    yield name, child.lineno, child.end_lineno - child.lineno + 1 - _docstring_lines(child)
                yield from walk(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    return walk(tree, "")


def check_source(path: str, text: str) -> list[Violation]:
    """The violations of one module's source ``text``; ``path`` only names them."""
    out = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        out.append(Violation(path, 1, "<module>", lines, MAX_MODULE_LINES))
    for name, line, length in function_lengths(ast.parse(text, filename=path)):
        if length > MAX_FUNCTION_LINES:
            out.append(Violation(path, line, name, length, MAX_FUNCTION_LINES))
    return out


def library_files(root: Path) -> list[Path]:
    return sorted(root.glob("packages/*/src/**/*.py"))


def check_tree(root: Path) -> list[Violation]:
    """Every violation under ``root``'s ``packages/*/src``."""
    out = []
    for f in library_files(root):
        out += check_source(f.relative_to(root).as_posix(), f.read_text(encoding="utf-8"))
    return out


def main(argv: Sequence[str] | None = None, pending: dict[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's)")
    parser.add_argument("--strict", action="store_true", help="fail on PENDING entries and stale ones too")
    args = parser.parse_args(argv)
    pending = PENDING if pending is None else pending
    found = check_tree(args.root)
    new = [v for v in found if v.key not in pending]
    known = [v for v in found if v.key in pending]
    stale = sorted(set(pending) - {v.key for v in found})
    checked = len(library_files(args.root))
    if new:
        print(f"over the size limits ({len(new)}):")
        for v in new:
            print(f"  {v}")
    if known:
        print(f"pending, known and not failing the check ({len(known)}):")
        for v in known:
            print(f"  {v}  [{pending[v.key]}]")
    if stale:
        print("stale PENDING entries (no longer over the limit; remove them from scripts/check_size.py):")
        for key in stale:
            print(f"  {key}")
    failed = bool(new) or (args.strict and bool(known or stale))
    print(f"{checked} modules checked: {'FAILED' if failed else 'ok'} (modules <= {MAX_MODULE_LINES} lines, "
          f"functions <= {MAX_FUNCTION_LINES} lines without their docstring, @triton.jit kernels exempt)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
