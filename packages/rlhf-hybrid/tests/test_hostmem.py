"""rlhf_hybrid.hostmem: with the threshold fixed, a freed big block is not recycled into the heap.

Each case runs in a fresh interpreter (the threshold is process-wide and glibc reads its environment at
start). The reference is the kernel's own map of the process (/proc/self/maps): whether a 4 MiB
``malloc`` after a 16 MiB ``malloc``/``free`` lies inside ``[heap]``. With glibc's dynamic threshold
(the negative control) the free raises the threshold to 16 MiB and the 4 MiB block comes from the heap.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from rlhf_hybrid import hostmem

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc: Linux only")

_PROBE = r"""
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("hostmem", sys.argv[2])  # the module alone: no torch import
hostmem = importlib.util.module_from_spec(spec); spec.loader.exec_module(hostmem)
fixed = hostmem.fix_mmap_threshold() if sys.argv[1] == "fix" else None
again = hostmem.fix_mmap_threshold() if sys.argv[1] == "fix" else None
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
big = libc.malloc(16 << 20); ctypes.memset(big, 1, 16 << 20); libc.free(big)
p = libc.malloc(4 << 20); ctypes.memset(p, 1, 4 << 20)
heap = [l.split()[0] for l in open("/proc/self/maps") if l.rstrip().endswith("[heap]")]
lo, hi = (int(x, 16) for x in heap[0].split("-")) if heap else (0, 0)
print(fixed, again, lo <= p < hi)
"""


def _probe(mode: str, **env: str) -> list[str]:
    full = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, hostmem.__file__], env=full, capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_dynamic_threshold_recycles_a_big_block_into_the_heap():
    # the negative control: without the fix glibc serves the 4 MiB block from the heap
    assert _probe("none") == ["None", "None", "True"]


def test_fixed_threshold_mmaps_big_blocks_once_per_process():
    assert _probe("fix") == ["True", "False", "False"]


def test_the_environment_setting_wins():
    # MALLOC_MMAP_THRESHOLD_ (glibc's own knob) is respected: nothing changed, glibc applies the user's value
    assert _probe("fix", MALLOC_MMAP_THRESHOLD_=str(64 << 20)) == ["False", "False", "True"]
