"""Rotary position embedding (RoPE) applied in place to the query and key tensors.

Su et al., "RoFormer" (2021), Eq. 34, in the "rotate half" layout of GPT-NeoX / Llama / Hugging
Face: for a head vector x with rotary dimension R (the first R of its D dims) and a token at
position p, with c_i = cos(p * f_i), s_i = sin(p * f_i), f_i = base^(-2i/R), i < R/2:
    x'_i       = x_i * c_i - x_{i+R/2} * s_i
    x'_{i+R/2} = x_{i+R/2} * c_i + x_i * s_i
Dims R..D-1 are left as they are (partial rotary). Computed in fp32, rounded once to x's dtype.

Positions are given per token, so ragged batches (each sequence at its own decode position) need
no padding logic. This module holds the pure-PyTorch reference (``reference`` backend); the
Triton kernel lives in :mod:`rlhf_kernels._triton.rotary`. Not differentiable (an inference op:
it writes into its inputs).
"""

from __future__ import annotations

import torch

from . import _backend

Tensor = torch.Tensor


def rotary_cos_sin(
    max_positions: int, rotary_dim: int, *, base: float = 10000.0, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """The cos / sin tables for :func:`apply_rotary_`.

    Args:
        max_positions: Number of positions P (rows of the tables).
        rotary_dim: R, the number of rotated dims per head (even).
        base: The frequency base (10000 in Llama 2; some models use larger).
        device: Where to build the tables.

    Returns:
        (cos, sin), each (P, R/2) float32: ``cos[p, i] = cos(p * base^(-2i/R))``.

    Raises:
        ValueError: If ``rotary_dim`` is not positive and even or ``max_positions`` is negative.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even int; got {rotary_dim!r}")
    if max_positions < 0:
        raise ValueError(f"max_positions must be >= 0; got {max_positions!r}")
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim)
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq  # (P, R/2)
    return angles.cos().float(), angles.sin().float()


def _rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    half = cos.shape[-1]
    c = cos[positions].float()[:, :, None, :]  # (B, T, 1, R/2)
    s = sin[positions].float()[:, :, None, :]
    for x in (q, k):  # (B, T, H, D), written in place
        x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
        out1, out2 = x1 * c - x2 * s, x2 * c + x1 * s
        x[..., :half] = out1
        x[..., half : 2 * half] = out2
    return q, k


_backend.register("apply_rotary_", "reference", _rotary_reference)
_backend.register("apply_rotary_", "triton", "rlhf_kernels._triton.rotary:apply_rotary_")


def apply_rotary_(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Rotates ``q`` and ``k`` in place by the rotary embedding of each token's position.

    ``q`` and ``k`` may be strided views (e.g. ``q.transpose(1, 2)`` of a (B, H, T, D) tensor);
    their last dimension must be contiguous.

    Args:
        q: (B, T, Hq, D) queries, fp32, bf16 or fp16; modified in place.
        k: (B, T, Hk, D) keys, same dtype; modified in place.
        cos: (P, R/2) float table from :func:`rotary_cos_sin`, R <= D.
        sin: (P, R/2) float table.
        positions: (B, T) integer position of each token, in [0, P).

    Returns:
        (q, k), the same tensors.

    Raises:
        ValueError: On mismatched shapes or dtypes, R > D, or a non-unit stride in the last dim.
        RuntimeError: If the requested backend cannot run here (see :func:`rlhf_kernels.set_backend`).
    """
    for name, x in (("q", q), ("k", k)):
        if x.dim() != 4 or not x.is_floating_point() or x.stride(-1) != 1:
            raise ValueError(f"{name} must be a float (B, T, H, D) tensor with unit stride in D; got {tuple(x.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1] or k.dtype != q.dtype:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} must match q {tuple(q.shape)} {q.dtype} in B, T, D and dtype")
    if cos.dim() != 2 or cos.shape != sin.shape or 2 * cos.shape[-1] > q.shape[-1]:
        raise ValueError(
            f"cos and sin must be (P, R/2) with R <= D={q.shape[-1]}; got {tuple(cos.shape)}, {tuple(sin.shape)}"
        )
    if positions.shape != q.shape[:2] or positions.is_floating_point():
        raise ValueError(f"positions must be an integer {tuple(q.shape[:2])} tensor; got {tuple(positions.shape)}")
    return _backend.dispatch("apply_rotary_", q.device)(q, k, cos, sin, positions)
