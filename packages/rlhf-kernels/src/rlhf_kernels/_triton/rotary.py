"""Triton rotary embedding, in place: one program per token, all heads of q (then k) at once.

Each program reads the token's position, its cos/sin row (R/2 values), and rotates the
(heads, R/2) halves of every head; only the first R dims of each head are read or written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rtne

Tensor = torch.Tensor


@triton.jit
def _rotary_kernel(
    x_ptr,
    stride_b,
    stride_t,
    stride_h,
    positions_ptr,
    stride_pb,
    stride_pt,
    cos_ptr,
    sin_ptr,
    stride_c,
    T,
    HEADS,
    HALF,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    pos = tl.load(positions_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    c = tl.load(cos_ptr + pos * stride_c + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]  # (1, R/2)
    s = tl.load(sin_ptr + pos * stride_c + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    base = x_ptr + b * stride_b + t * stride_t
    for h0 in range(0, HEADS, BLOCK_HEADS):
        h = h0 + tl.arange(0, BLOCK_HEADS)
        mask = (h < HEADS)[:, None] & i_mask[None, :]
        ptr1 = base + h[:, None] * stride_h + i[None, :]  # (heads, R/2)
        x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr1, cast_rtne(x1 * c - x2 * s, x_ptr.dtype.element_ty), mask=mask)
        tl.store(ptr1 + HALF, cast_rtne(x2 * c + x1 * s, x_ptr.dtype.element_ty), mask=mask)


def apply_rotary_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    B, T = q.shape[:2]
    half = cos.shape[-1]
    if B * T == 0 or half == 0:
        return q, k
    cos, sin = cos.contiguous(), sin.contiguous()
    for x in (q, k):  # (B, T, H, D), strided views are written through
        heads = x.shape[2]
        block_heads = min(triton.next_power_of_2(heads), 16)
        _rotary_kernel[(B * T,)](
            x, x.stride(0), x.stride(1), x.stride(2), positions, positions.stride(0), positions.stride(1),
            cos, sin, cos.stride(0), T, heads, half,
            BLOCK_HEADS=block_heads, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
        )  # fmt: skip
    return q, k
