"""Small helpers shared by the Triton launchers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# torch dtype -> triton dtype, for casts inside kernels (`x.to(OUT_DTYPE)`).
TL_DTYPE = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def block_for(n: int, cap: int) -> int:
    """The smallest power of two >= ``n`` (at least 16), capped at ``cap``."""
    return min(max(triton.next_power_of_2(max(n, 1)), 16), cap)


def warps_for(block: int) -> int:
    """num_warps for a 1-D block of ``block`` elements (ignored by the interpreter)."""
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """fp32 ``x`` cast to ``dtype`` rounding to nearest, ties to even, as torch does.

    A GPU's fp32 -> bf16 cast already rounds so; Triton's interpreter truncates, so for bf16 the
    rounding is done here, on the bits (then the cast is exact): the kernels then produce the
    same bf16 values on a GPU and in the interpreter. Infinities stay infinite.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
