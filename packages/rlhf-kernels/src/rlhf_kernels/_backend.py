"""Backend selection: which implementation of an op runs.

Every op registers a pure-PyTorch ``reference`` implementation (the CPU path and the test oracle)
and a ``triton`` one. The choice is made once per (op, device type), at the first call, and cached:

1. the backend requested by :func:`set_backend` / :func:`use_backend`, else
2. the environment variable ``RLHF_KERNELS_BACKEND`` (``auto`` | ``reference`` | ``triton``), else
3. ``auto``: ``triton`` when a Triton implementation is registered, triton is importable and the
   input is on a CUDA device; ``reference`` otherwise.

An explicit request that cannot be honoured raises instead of silently falling back. An explicit
``triton`` request for CPU inputs is honoured only under ``TRITON_INTERPRET=1`` (Triton's
interpreter runs the kernels on CPU tensors, slowly; it is how the tests check the kernels without
a GPU); ``auto`` never picks the interpreter.

Triton implementations are registered as ``"module:function"`` strings and imported at their
first dispatch, so that importing rlhf_kernels never imports triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

ENV_VAR = "RLHF_KERNELS_BACKEND"
CHOICES = ("auto", "reference", "triton")
_IMPLEMENTATIONS = ("reference", "triton")

# op -> backend -> implementation, or "module:function" to import at first dispatch
_REGISTRY: dict[str, dict[str, Callable[..., Any] | str]] = {}
# Backend requested in code (set_backend / use_backend); None means "read the environment".
_override: str | None = None
# (op, device type) -> chosen backend. Cleared whenever the request changes.
_chosen: dict[tuple[str, str], str] = {}


def register(op: str, backend: str, fn: Callable[..., Any] | str) -> Callable[..., Any] | str:
    """Registers ``fn`` as the ``backend`` implementation of ``op``.

    Args:
        op: Public op name, e.g. ``"fused_logprobs"``.
        backend: ``"reference"`` or ``"triton"``.
        fn: The implementation; it receives the public function's (validated) arguments. A string
            ``"package.module:function"`` is imported at the first dispatch to it (Triton modules
            import triton at their top, so they are registered this way).

    Returns:
        ``fn``, so this can be used as a decorator body.

    Raises:
        ValueError: If ``backend`` is not one of the implementation kinds.
    """
    if backend not in _IMPLEMENTATIONS:
        raise ValueError(f"backend must be one of {_IMPLEMENTATIONS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = fn
    _chosen.clear()  # a new implementation can change what `auto` picks
    return fn


def _validate(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {', '.join(CHOICES)}; got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Requests a backend for every op, overriding ``RLHF_KERNELS_BACKEND``.

    Clears the cached per-op choices, so the next call of each op chooses again.

    Args:
        name: ``"auto"``, ``"reference"`` or ``"triton"``; ``None`` removes the override so that
            the environment variable is read again.

    Raises:
        ValueError: If ``name`` is not an allowed value.
    """
    global _override
    _override = None if name is None else _validate(name)
    _chosen.clear()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous request on exit.

    Args:
        name: ``"auto"``, ``"reference"`` or ``"triton"``.

    Raises:
        ValueError: If ``name`` is not an allowed value.
    """
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _requested() -> tuple[str, str]:
    """Returns (requested backend, where the request came from)."""
    if _override is not None:
        return _override, "set_backend()/use_backend()"
    raw = os.environ.get(ENV_VAR, "")
    value = raw.strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(
            f"environment variable {ENV_VAR}={raw!r} is not a valid backend; "
            f"allowed values: {', '.join(CHOICES)}"
        )
    return value, f"{ENV_VAR}={raw}"


@functools.cache
def _triton_importable() -> bool:
    # find_spec locates the package without importing it (importing triton is slow and, on a
    # machine without a GPU driver, can fail noisily).
    return importlib.util.find_spec("triton") is not None


def _triton_unusable_reason(op: str, device: torch.device) -> str | None:
    if "triton" not in _REGISTRY[op]:
        return f"no Triton implementation of {op!r} is registered"
    if not _triton_importable():
        return "triton is not installed (pip install triton)"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's interpreter runs the kernels on CPU tensors (tests)
    if device.type != "cuda":
        return (
            f"the input is on device type {device.type!r}, and Triton kernels need a CUDA device "
            "(or, for CPU tensors, TRITON_INTERPRET=1 set before triton is imported)"
        )
    return None


def get_backend(op: str, device: torch.device | str = "cpu") -> str:
    """Returns the backend that ``op`` uses for inputs on ``device``, choosing it on first use.

    Args:
        op: Public op name, e.g. ``"fused_logprobs"``.
        device: Device of the op's input; only its type (``cpu``, ``cuda``, ...) matters.

    Returns:
        ``"reference"`` or ``"triton"``.

    Raises:
        ValueError: If ``op`` is unknown or ``RLHF_KERNELS_BACKEND`` holds an invalid value.
        RuntimeError: If the requested backend cannot run ``op`` on ``device``.
    """
    device_type = torch.device(device).type
    key = (op, device_type)
    chosen = _chosen.get(key)
    if chosen is not None:  # hot path: one dict lookup per call
        return chosen
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; registered ops: {', '.join(sorted(_REGISTRY))}")
    requested, source = _requested()
    reason = _triton_unusable_reason(op, torch.device(device_type))
    if requested == "auto":
        # Never the interpreter: on CPU the reference is the fast path.
        chosen = "triton" if reason is None and device_type == "cuda" else "reference"
    elif requested == "triton" and reason is not None:
        raise RuntimeError(f"{op}: backend 'triton' was requested ({source}) but cannot be used: {reason}")
    else:
        chosen = requested
    if chosen not in _REGISTRY[op]:
        raise RuntimeError(
            f"{op}: backend {chosen!r} was requested ({source}) but no such implementation is registered"
        )
    _chosen[key] = chosen
    return chosen


def dispatch(op: str, device: torch.device) -> Callable[..., Any]:
    """Returns the implementation of ``op`` for inputs on ``device`` (see :func:`get_backend`)."""
    backend = get_backend(op, device)
    impl = _REGISTRY[op][backend]
    if isinstance(impl, str):  # first dispatch to a lazily registered implementation
        module, _, name = impl.partition(":")
        impl = getattr(importlib.import_module(module), name)
        _REGISTRY[op][backend] = impl
    return impl
