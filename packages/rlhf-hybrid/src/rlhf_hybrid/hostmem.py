"""Host memory while big models are built: keep glibc's malloc from holding on to freed buffers.

glibc serves an allocation from ``mmap`` (returned to the OS on ``free``) only above its *mmap
threshold*, and that threshold is dynamic: each freed mmapped block raises it to the block's size, up
to 32 MiB on 64-bit builds (``mallopt(3)``, ``M_MMAP_THRESHOLD``). Building a model partitioned
(``rlhf_hybrid.zero_init``) allocates and frees one whole parameter after another (each rank receives or
initialises it, keeps its partition, frees the rest), so after the first few frees the later
parameter-sized buffers come from the heap, and the freed heap stays in the process's resident memory
as fragments. Measured with ``benchmarks/zero3_memory.py`` (a 495M-parameter Llama, 2 ranks, CPU,
actor only; docs/performance.md): the partitioned build of rank 1 peaked at 0.99x the model's fp32 size
with the dynamic threshold and 0.70x with a fixed 1 MiB one, and the ranks' resident memory once the
engine was built fell from 4.7-5.1 GiB to 3.3 GiB.

:func:`fix_mmap_threshold` sets the threshold once per process, from the first partitioned build on.
Blocks of at least 1 MiB are then always mmapped; on a GPU run these are host-side buffers of loading
and offload, rarely on a hot path. A ``MALLOC_MMAP_THRESHOLD_`` in the environment (glibc's own
setting, read at process start) wins: nothing is changed then. Not glibc (macOS, musl): nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "fix_mmap_threshold"]

MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # <malloc.h>
_state: dict[str, bool] = {}


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process (once; later calls do nothing).

    Returns:
        Whether the threshold was set by this call: False when already done, when
        ``MALLOC_MMAP_THRESHOLD_`` is in the environment, or when the C library is not glibc.
    """
    if _state.get("done") or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return False
    _state["done"] = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))
