"""Fixtures shared by rlhf-hybrid's tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module: tiny matmuls on a shared 2-core machine run ~50x slower with
    two OpenMP threads contending with other processes than with one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world_of_one():
    """A one-process gloo world for the module (rlhf_hybrid.testing.world_of_one: env vars restored
    after); modules that build engines use it with ``pytestmark = pytest.mark.usefixtures(...)``."""
    from rlhf_hybrid.testing import world_of_one

    with world_of_one() as info:
        assert info.world_size == 1 and info.rank == 0
        yield info
