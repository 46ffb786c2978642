"""Triton blockwise int8 / int4 quantize and dequantize: ``BLOCKS`` quantization blocks per program.

Each program handles a (BLOCKS, block_size) tile as two (BLOCKS, block_size / 2) halves, the
even and the odd elements, which are exactly the low and high nibbles of the int4 bytes, so
packing is one shift and or. The math is the reference's (:mod:`rlhf_kernels.quant`), step for
step: absmax / qmax rounded to the scale dtype first (to nearest, ties to even), codes by IEEE
division and round half to even, so scales and codes match the reference's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import _INT4_OFFSET, _QMAX, QuantizedTensor, _work_dtype
from ._common import cast_rtne

Tensor = torch.Tensor


@triton.jit
def _round_half_even(x):
    r = tl.floor(x + 0.5)
    # A tie (x + 0.5 an integer) rounded up to an odd integer goes back down to the even one.
    tie = (r - x) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _div(x, y, WORK: tl.constexpr):
    # IEEE division, as torch does it: Triton's fp32 `/` may use a faster approximate division.
    if WORK == tl.float64:
        return x / y
    else:
        return tl.math.div_rn(x, y)


@triton.jit
def _quantize_kernel(
    x_ptr,
    data_ptr,
    scales_ptr,
    numel,
    num_blocks,
    scale_max,
    block_size,
    QMAX: tl.constexpr,
    INT4: tl.constexpr,
    WORK: tl.constexpr,
    SCALE_VIA_F32: tl.constexpr,
    BLOCKS: tl.constexpr,
    HALF: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,)
    pairs = tl.arange(0, HALF)  # (HALF,): element pairs (2j, 2j + 1) of a block
    half = block_size // 2
    in_block = (blocks < num_blocks)[:, None] & (pairs < half)[None, :]
    even_idx = blocks[:, None] * block_size + 2 * pairs[None, :]  # (BLOCKS, HALF) flat index
    even = tl.load(x_ptr + even_idx, mask=in_block & (even_idx < numel), other=0.0).to(WORK)
    odd = tl.load(x_ptr + even_idx + 1, mask=in_block & (even_idx + 1 < numel), other=0.0).to(WORK)
    absmax = tl.maximum(tl.max(tl.abs(even), 1), tl.max(tl.abs(odd), 1))  # (BLOCKS,)
    # Round the scale to its storage dtype before quantizing against it (see quant.py).
    scale = tl.minimum(_div(absmax, tl.full((), QMAX, WORK), WORK), scale_max)
    if SCALE_VIA_F32:  # fp64 work, 16-bit scales: the interpreter cannot cast fp64 -> bf16 directly
        scale = scale.to(tl.float32)
    scale = cast_rtne(scale, scales_ptr.dtype.element_ty)
    tl.store(scales_ptr + blocks, scale, mask=blocks < num_blocks)
    s = scale.to(WORK)
    divisor = tl.where(s > 0, s, 1.0)[:, None]
    q_even = tl.minimum(tl.maximum(_round_half_even(_div(even, divisor, WORK)), -QMAX), QMAX)
    q_odd = tl.minimum(tl.maximum(_round_half_even(_div(odd, divisor, WORK)), -QMAX), QMAX)
    if INT4:
        low = (q_even + 8).to(tl.int32)
        high = (q_odd + 8).to(tl.int32)
        packed = (low | (high << 4)).to(tl.uint8)
        tl.store(data_ptr + blocks[:, None] * half + pairs[None, :], packed, mask=in_block)
    else:
        tl.store(data_ptr + even_idx, q_even.to(tl.int8), mask=in_block)
        tl.store(data_ptr + even_idx + 1, q_odd.to(tl.int8), mask=in_block)


@triton.jit
def _dequantize_kernel(
    data_ptr,
    scales_ptr,
    out_ptr,
    numel,
    num_blocks,
    out_min,
    out_max,
    block_size,
    INT4: tl.constexpr,
    WORK: tl.constexpr,
    BLOCKS: tl.constexpr,
    HALF: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    pairs = tl.arange(0, HALF)
    half = block_size // 2
    in_block = (blocks < num_blocks)[:, None] & (pairs < half)[None, :]
    even_idx = blocks[:, None] * block_size + 2 * pairs[None, :]
    if INT4:
        byte = tl.load(data_ptr + blocks[:, None] * half + pairs[None, :], mask=in_block, other=0).to(tl.int32)
        q_even = ((byte & 0x0F) - 8).to(WORK)
        q_odd = ((byte >> 4) - 8).to(WORK)
    else:
        q_even = tl.load(data_ptr + even_idx, mask=in_block, other=0).to(WORK)
        q_odd = tl.load(data_ptr + even_idx + 1, mask=in_block, other=0).to(WORK)
    s = tl.load(scales_ptr + blocks, mask=blocks < num_blocks, other=0.0).to(WORK)[:, None]
    # Clamp to the output dtype's finite range, as the reference does (qmax * scale can be 1 ulp over).
    even = cast_rtne(tl.minimum(tl.maximum(q_even * s, out_min), out_max), out_ptr.dtype.element_ty)
    odd = cast_rtne(tl.minimum(tl.maximum(q_odd * s, out_min), out_max), out_ptr.dtype.element_ty)
    tl.store(out_ptr + even_idx, even, mask=in_block & (even_idx < numel))
    tl.store(out_ptr + even_idx + 1, odd, mask=in_block & (even_idx + 1 < numel))


def _tiling(block_size: int) -> tuple[int, int]:
    """(BLOCKS per program, HALF = power of two >= block_size / 2)."""
    half = triton.next_power_of_2(block_size // 2)
    return max(1, 2048 // half), half


def _work(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if _work_dtype(dtype) == torch.float64 else tl.float32


def quantize(x: Tensor, *, bits: int, block_size: int, scale_dtype: torch.dtype) -> QuantizedTensor:
    numel = x.numel()
    num_blocks = -(-numel // block_size)
    flat = x.reshape(-1).contiguous()
    if bits == 8:
        data = torch.empty(num_blocks, block_size, dtype=torch.int8, device=x.device)
    else:
        data = torch.empty(num_blocks, block_size // 2, dtype=torch.uint8, device=x.device)
    scales = torch.empty(num_blocks, dtype=scale_dtype, device=x.device)
    if num_blocks:
        blocks, half = _tiling(block_size)
        _quantize_kernel[(triton.cdiv(num_blocks, blocks),)](
            flat, data, scales, numel, num_blocks, torch.finfo(scale_dtype).max, block_size,
            QMAX=_QMAX[bits], INT4=bits == 4, WORK=_work(x.dtype),
            SCALE_VIA_F32=x.dtype == torch.float64 and scale_dtype in (torch.bfloat16, torch.float16),
            BLOCKS=blocks, HALF=half, num_warps=4,
        )  # fmt: skip
    return QuantizedTensor(
        data=data, scales=scales, shape=x.shape, dtype=x.dtype, bits=bits, block_size=block_size, numel=numel
    )


def dequantize(q: QuantizedTensor) -> Tensor:
    out = torch.empty(q.numel, dtype=q.dtype, device=q.data.device)
    num_blocks = q.scales.shape[0]
    if q.numel:
        blocks, half = _tiling(q.block_size)
        finfo = torch.finfo(q.dtype)
        _dequantize_kernel[(triton.cdiv(num_blocks, blocks),)](
            q.data.contiguous(), q.scales.contiguous(), out, q.numel, num_blocks, finfo.min, finfo.max,
            q.block_size, INT4=q.bits == 4, WORK=_work(q.dtype), BLOCKS=blocks, HALF=half, num_warps=4,
        )  # fmt: skip
    return out.view(q.shape)


assert _INT4_OFFSET == 8  # the kernels hard-code the int4 offset
