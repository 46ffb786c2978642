"""RMSNorm and LayerNorm, optionally fused with the residual add that precedes them.

In a pre-norm transformer block every norm follows ``hidden = hidden + residual``; fusing the two
reads ``x`` and ``residual`` once and writes the sum (the next residual) and the normalised
output in the same pass, instead of three passes over memory.

Math, per row h = x + residual (added in the input dtype, as the unfused model does), in fp32:
    rms_norm:   y = h / sqrt(mean(h^2) + eps) * weight
    layer_norm: y = (h - mean(h)) / sqrt(var(h) + eps) * weight + bias      (biased variance)
y is rounded once, to the dtype of ``x``.

This module holds the pure-PyTorch references (``reference`` backend); the Triton kernels live in
:mod:`rlhf_kernels._triton.norms`. Both are differentiable: the Triton backend's backward
recomputes the forward with the reference under autograd (these are inference kernels; training
code may use them, at the cost of that recomputation).
"""

from __future__ import annotations

import torch

from . import _backend

Tensor = torch.Tensor


def _rms_norm_reference(
    x: Tensor, weight: Tensor, *, eps: float, residual: Tensor | None
) -> Tensor | tuple[Tensor, Tensor]:
    h = x if residual is None else x + residual  # (..., H), in the input dtype like the model's add
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)


def _layer_norm_reference(
    x: Tensor, weight: Tensor, bias: Tensor | None, *, eps: float, residual: Tensor | None
) -> Tensor | tuple[Tensor, Tensor]:
    h = x if residual is None else x + residual  # (..., H)
    hf = h.float()
    mean = hf.mean(-1, keepdim=True)
    centred = hf - mean
    y = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    return y if residual is None else (y, h)


_backend.register("rms_norm", "reference", _rms_norm_reference)
_backend.register("rms_norm", "triton", "rlhf_kernels._triton.norms:rms_norm")
_backend.register("layer_norm", "reference", _layer_norm_reference)
_backend.register("layer_norm", "triton", "rlhf_kernels._triton.norms:layer_norm")


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None, eps: float) -> None:
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x must be a floating-point (..., H) tensor; got dtype {x.dtype}")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (hidden,) or not t.is_floating_point()):
            raise ValueError(f"{name} must be a floating-point ({hidden},) tensor; got {tuple(t.shape)} {t.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(
            f"residual must match x: shape {tuple(x.shape)} dtype {x.dtype}; "
            f"got {tuple(residual.shape)} {residual.dtype}"
        )
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float; got {eps!r}")


def rms_norm(
    x: Tensor, weight: Tensor, *, eps: float = 1e-6, residual: Tensor | None = None
) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm of ``x`` (or of ``x + residual``), scaled by ``weight``.

    Args:
        x: (..., H) fp32, bf16 or fp16 activations.
        weight: (H,) scale, any float dtype (used in fp32).
        eps: Added to the mean square before the square root.
        residual: Optional (..., H) tensor of x's shape and dtype, added to ``x`` first.

    Returns:
        y: (..., H) in x's dtype. With ``residual``, a tuple (y, x + residual): the sum is the
        residual stream for the next block.

    Raises:
        ValueError: On mismatched shapes or dtypes, a non-float ``x`` or a negative ``eps``.
        RuntimeError: If the requested backend cannot run here (see :func:`rlhf_kernels.set_backend`).
    """
    _check(x, weight, None, residual, eps)
    return _backend.dispatch("rms_norm", x.device)(x, weight, eps=float(eps), residual=residual)


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm of ``x`` (or of ``x + residual``) over the last dimension.

    Args:
        x: (..., H) fp32, bf16 or fp16 activations.
        weight: (H,) scale, any float dtype (used in fp32).
        bias: Optional (H,) shift.
        eps: Added to the (biased) variance before the square root.
        residual: Optional (..., H) tensor of x's shape and dtype, added to ``x`` first.

    Returns:
        y: (..., H) in x's dtype. With ``residual``, a tuple (y, x + residual).

    Raises:
        ValueError: On mismatched shapes or dtypes, a non-float ``x`` or a negative ``eps``.
        RuntimeError: If the requested backend cannot run here (see :func:`rlhf_kernels.set_backend`).
    """
    _check(x, weight, bias, residual, eps)
    return _backend.dispatch("layer_norm", x.device)(x, weight, bias, eps=float(eps), residual=residual)
