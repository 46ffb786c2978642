"""Run the Triton kernels on CPU tensors through Triton's interpreter when there is no GPU.

``TRITON_INTERPRET=1`` must be in the environment before triton is imported (triton decorates its
own library functions at import) and before any ``@triton.jit`` kernel is defined; rlhf_kernels
imports triton only at the first dispatch to a Triton kernel, so setting it here, before any test
runs, is early enough. A value already in the environment wins.

Fixtures: ``backend`` runs a test once per backend (``reference``, ``triton``; the triton run is
skipped, with the reason, when triton is not installed) with inputs on ``device``: a GPU when
there is one, else CPU (the Triton kernels then run in the interpreter). ``cpu_backend`` is the
same for tests written with CPU tensors only: on a machine with a GPU its triton run is skipped
(the interpreter is off there, and the ``backend`` tests cover the kernels on the GPU).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rlhf_kernels import use_backend  # noqa: E402  (after TRITON_INTERPRET is set)

if importlib.util.find_spec("triton") is None:
    NO_TRITON_REASON = "triton is not installed (pip install 'rlhf-kernels[triton]'): Triton kernel tests skipped"
elif not torch.cuda.is_available() and importlib.util.find_spec("numpy") is None:
    NO_TRITON_REASON = "Triton's CPU interpreter needs numpy (pip install numpy): Triton kernel tests skipped"
else:
    NO_TRITON_REASON = ""
TRITON_INSTALLED = not NO_TRITON_REASON


def pytest_configure(config: pytest.Config) -> None:
    # The interpreter evaluates masked-out lanes too (e.g. 0 * -inf in padding) before tl.where
    # discards them; numpy warns about values that never reach an output.
    for message in ("invalid value encountered", "overflow encountered", "divide by zero encountered"):
        config.addinivalue_line("filterwarnings", f"ignore:{message}:RuntimeWarning")


@pytest.fixture(params=["reference", "triton"])
def backend(request: pytest.FixtureRequest):
    """Runs the test with every op forced to one backend; yields its name."""
    if request.param == "triton" and not TRITON_INSTALLED:
        pytest.skip(NO_TRITON_REASON)
    with use_backend(request.param):
        yield request.param


@pytest.fixture(params=["reference", "triton"])
def cpu_backend(request: pytest.FixtureRequest):
    """``backend`` for tests whose inputs are CPU tensors."""
    if request.param == "triton" and not TRITON_INSTALLED:
        pytest.skip(NO_TRITON_REASON)
    if request.param == "triton" and torch.cuda.is_available():
        pytest.skip("CPU-tensor test; with a GPU present the Triton kernels are tested on it instead")
    with use_backend(request.param):
        yield request.param


@pytest.fixture
def needs_triton() -> None:
    """Skips the test, with the reason, where the Triton kernels cannot run."""
    if not TRITON_INSTALLED:
        pytest.skip(NO_TRITON_REASON)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
