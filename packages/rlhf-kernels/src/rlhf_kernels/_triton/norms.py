"""Triton RMSNorm / LayerNorm fused with the residual add: one program per row, one pass.

Each program loads a whole row of ``x`` (and ``residual``), writes ``h = x + residual`` rounded to
the input dtype (the next residual stream), reduces ``h`` in fp32 and writes ``y``. Rows up to
``_MAX_HIDDEN`` elements fit in one block. Forward only: the backward recomputes the reference
(see :mod:`rlhf_kernels._triton._autograd`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..norms import _layer_norm_reference, _rms_norm_reference
from ._autograd import with_reference_backward
from ._common import block_for, cast_rtne, warps_for

Tensor = torch.Tensor

_MAX_HIDDEN = 65536


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    bias_ptr,
    y_ptr,
    h_ptr,
    H,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * H + cols, mask=mask, other=0.0)
        # Add in fp32 and round to the input dtype: exactly what torch's bf16/fp16 `x + r` does.
        x = cast_rtne(x.to(tl.float32) + r.to(tl.float32), x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * H + cols, x, mask=mask)
    h = x.to(tl.float32)
    if IS_RMS:
        out = h * (1.0 / tl.sqrt(tl.sum(h * h, 0) / H + eps))
    else:
        centred = tl.where(mask, h - tl.sum(h, 0) / H, 0.0)
        out = centred * (1.0 / tl.sqrt(tl.sum(centred * centred, 0) / H + eps))
    out = out * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * H + cols, cast_rtne(out, y_ptr.dtype.element_ty), mask=mask)


def _launch(
    x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, eps: float, is_rms: bool
) -> Tensor | tuple[Tensor, Tensor]:
    hidden = x.shape[-1]
    if hidden > _MAX_HIDDEN:
        raise RuntimeError(f"triton norm: hidden size {hidden} exceeds the kernel's limit {_MAX_HIDDEN}")
    x2 = x.reshape(-1, hidden).contiguous()  # (N, H)
    r2 = residual.reshape(-1, hidden).contiguous() if residual is not None else x2
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else y
    if x2.shape[0]:
        block = block_for(hidden, _MAX_HIDDEN)
        _norm_fwd_kernel[(x2.shape[0],)](
            x2, r2, weight.contiguous(), bias.contiguous() if bias is not None else weight, y, h, hidden, eps,
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            BLOCK_H=block, num_warps=warps_for(block),
        )  # fmt: skip
    y = y.view(x.shape)
    return y if residual is None else (y, h.view(x.shape))


def rms_norm(
    x: Tensor, weight: Tensor, *, eps: float, residual: Tensor | None
) -> Tensor | tuple[Tensor, Tensor]:
    def fast(x: Tensor, weight: Tensor, residual: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
        return _launch(x, weight, None, residual, eps, is_rms=True)

    reference = functools.partial(_rms_norm_ref_positional, eps=eps)
    return with_reference_backward(fast, reference, x, weight, residual)


def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, eps: float, residual: Tensor | None
) -> Tensor | tuple[Tensor, Tensor]:
    def fast(
        x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None
    ) -> Tensor | tuple[Tensor, Tensor]:
        return _launch(x, weight, bias, residual, eps, is_rms=False)

    reference = functools.partial(_layer_norm_ref_positional, eps=eps)
    return with_reference_backward(fast, reference, x, weight, bias, residual)


def _rms_norm_ref_positional(
    x: Tensor, weight: Tensor, residual: Tensor | None, *, eps: float
) -> Tensor | tuple[Tensor, Tensor]:
    return _rms_norm_reference(x, weight, eps=eps, residual=residual)


def _layer_norm_ref_positional(
    x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, *, eps: float
) -> Tensor | tuple[Tensor, Tensor]:
    return _layer_norm_reference(x, weight, bias, eps=eps, residual=residual)
