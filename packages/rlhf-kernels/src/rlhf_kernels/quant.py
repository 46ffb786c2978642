"""Blockwise symmetric int8/int4 quantization (the codec behind ZeRO++-style quantized collectives).

The tensor is flattened, zero-padded to a multiple of ``block_size`` and cut into blocks; each
block b gets one scale ``s_b = absmax_b / qmax`` (qmax = 127 for int8, 7 for int4) and each element
the code ``q = round(x / s_b)`` in [-qmax, qmax]. Dequantization is ``q * s_b``. Rounding to nearest
bounds every element's error by half a step, ``s_b / 2``. See Dettmers et al., "8-bit Optimizers
via Block-wise Quantization" (2022), and Wang et al., "ZeRO++" (2023), Sec. 3.1.

int4 codes are stored offset by +8 (so in [1, 15]) and packed two per byte: element 2k of a block
in the low nibble of byte k, element 2k+1 in the high nibble.

This module holds the pure-PyTorch reference implementations, registered as the ``reference``
backend; the Triton kernels live in :mod:`rlhf_kernels._triton.quant`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _backend

Tensor = torch.Tensor

_QMAX = {8: 127, 4: 7}
_INT4_OFFSET = 8


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A blockwise-quantized tensor, as returned by :func:`quantize_blockwise`.

    Attributes:
        data: The codes. bits=8: (num_blocks, block_size) int8. bits=4: (num_blocks,
            block_size // 2) uint8, two offset codes per byte (see the module docstring).
        scales: (num_blocks,) per-block scale ``absmax / qmax``, in the requested scale dtype;
            0 for an all-zero block.
        shape: Shape of the original tensor.
        dtype: Dtype of the original tensor (and of the dequantized one).
        bits: 4 or 8.
        block_size: Elements per block (positive, even).
        numel: Number of elements of the original tensor (the rest of the last block is padding).
    """

    data: Tensor
    scales: Tensor
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    block_size: int
    numel: int


def _check_args(bits: int, block_size: int) -> None:
    if bits not in _QMAX or isinstance(bits, bool):
        raise ValueError(f"bits must be one of (4, 8); got {bits!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even int (e.g. 64, 128, 256); got {block_size!r}")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs.
    return torch.promote_types(dtype, torch.float32)


def _quantize_reference(
    x: Tensor, *, bits: int, block_size: int, scale_dtype: torch.dtype
) -> QuantizedTensor:
    qmax = _QMAX[bits]
    numel = x.numel()
    num_blocks = -(-numel // block_size)
    work = _work_dtype(x.dtype)
    flat = x.reshape(-1).to(work)  # (numel,)
    blocks = F.pad(flat, (0, num_blocks * block_size - numel)).view(num_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (num_blocks,)
    # Round the scale to its storage dtype *before* quantizing, so codes are computed against the
    # scale that dequantization will use and the half-step error bound holds for it. Clamping keeps
    # a scale beyond the storage dtype's range (e.g. fp16 scales for values > 8e6) finite.
    scales = (absmax / qmax).clamp_(max=torch.finfo(scale_dtype).max).to(scale_dtype)  # (num_blocks,)
    s = scales.to(work)
    # All-zero blocks (or a scale that underflowed to 0) divide by 1 instead of 0: their elements
    # are below the smallest scale and round to code 0.
    divisor = torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.round(blocks / divisor[:, None]).clamp_(-qmax, qmax)  # (num_blocks, block_size)
    if bits == 8:
        data = codes.to(torch.int8)
    else:
        nibbles = (codes + _INT4_OFFSET).to(torch.uint8)  # in [1, 15]
        data = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)  # (num_blocks, block_size // 2)
    return QuantizedTensor(
        data=data,
        scales=scales,
        shape=x.shape,
        dtype=x.dtype,
        bits=bits,
        block_size=block_size,
        numel=numel,
    )


def _dequantize_reference(q: QuantizedTensor) -> Tensor:
    work = _work_dtype(q.dtype)
    if q.bits == 8:
        codes = q.data.to(work)  # (num_blocks, block_size)
    else:
        low, high = q.data & 0x0F, q.data >> 4  # (num_blocks, block_size // 2) each
        codes = torch.stack((low, high), dim=-1).view(q.data.shape[0], q.block_size).to(work)
        codes -= _INT4_OFFSET
    values = (codes * q.scales.to(work)[:, None]).view(-1)[: q.numel]  # (numel,)
    # qmax * (absmax / qmax) can round one ulp above absmax; clamp so a block holding the dtype's
    # largest finite value does not come back as inf.
    finfo = torch.finfo(q.dtype)
    return values.clamp_(finfo.min, finfo.max).to(q.dtype).view(q.shape)


_backend.register("quantize_blockwise", "reference", _quantize_reference)
_backend.register("quantize_blockwise", "triton", "rlhf_kernels._triton.quant:quantize")
_backend.register("dequantize_blockwise", "reference", _dequantize_reference)
_backend.register("dequantize_blockwise", "triton", "rlhf_kernels._triton.quant:dequantize")


def quantize_blockwise(
    x: Tensor,
    bits: int = 8,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
) -> QuantizedTensor:
    """Quantizes ``x`` blockwise and symmetrically to int8 or packed int4.

    Every element's reconstruction error is at most half a step (``scale / 2``) of its block, up to
    fp rounding, provided the block's scale is representable in ``scale_dtype`` (not clamped to its
    maximum, not flushed to zero).

    Args:
        x: Floating-point tensor of any shape, on any device.
        bits: 8 (int8 codes) or 4 (int4 codes, two per byte).
        block_size: Elements sharing one scale; positive and even. The flattened tensor is
            zero-padded to a multiple of it.
        scale_dtype: Floating dtype the scales are stored in.

    Returns:
        A :class:`QuantizedTensor` with ``data`` (num_blocks, block_size) int8 or
        (num_blocks, block_size // 2) uint8 and ``scales`` (num_blocks,), where
        num_blocks = ceil(x.numel() / block_size).

    Raises:
        ValueError: If ``bits`` is not 4 or 8, ``block_size`` is not a positive even int, or
            ``x`` / ``scale_dtype`` is not floating point.
    """
    _check_args(bits, block_size)
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got dtype {x.dtype}")
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise ValueError(
            f"scale_dtype must be a floating dtype (torch.float32, torch.bfloat16, torch.float16); "
            f"got {scale_dtype!r}"
        )
    impl = _backend.dispatch("quantize_blockwise", x.device)
    return impl(x, bits=bits, block_size=block_size, scale_dtype=scale_dtype)


def dequantize_blockwise(q: QuantizedTensor) -> Tensor:
    """Reconstructs the tensor quantized by :func:`quantize_blockwise`.

    Args:
        q: The quantized tensor.

    Returns:
        Tensor of shape ``q.shape`` and dtype ``q.dtype``, on the device of ``q.data``.

    Raises:
        ValueError: If ``q.bits`` or ``q.block_size`` is invalid.
    """
    _check_args(q.bits, q.block_size)
    impl = _backend.dispatch("dequantize_blockwise", q.data.device)
    return impl(q)
