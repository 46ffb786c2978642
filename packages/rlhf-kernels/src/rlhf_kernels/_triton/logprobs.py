"""Triton fused log-prob / entropy: one program per row, streaming over the vocabulary.

Forward: an online (single pass) log-sum-exp over ``BLOCK_V``-wide slices of the row, carrying
the running max ``m``, ``s = sum exp(z - m)`` and ``t = sum exp(z - m) * (z - m)``; then
``logprob = z_y - lse`` and ``entropy = log s - t / s``. Nothing but the three per-row scalars
(log-prob, lse, entropy) is written: no fp32 copy of the logits exists, not even per chunk.

Backward: a second streaming pass recomputes ``p = exp(z - lse)`` slice by slice and writes the
gradient in the logits dtype (see the math in :mod:`rlhf_kernels.logprobs`).

``logprobs_from_hidden`` computes each row chunk's logits with one matmul (cuBLAS) and runs the
same row kernels on them; its backward writes the logits gradient over the recomputed logits
buffer, so per chunk only one (chunk, V) buffer in the compute dtype exists.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .._logprobs_reference import (
    ChunkRows,
    _lead_view,
    _prepare_targets,
    _upstream,
    _zero_ignored,
    run_from_hidden,
)
from ._common import block_for, cast_rtne, warps_for

Tensor = torch.Tensor

_MAX_BLOCK_V = 4096


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr,
    stride_outer,
    stride_inner,
    inner,
    targets_ptr,
    logprobs_ptr,
    lse_ptr,
    entropy_ptr,
    V,
    temperature,
    RETURN_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    # Rows are (outer, inner) pairs, so a (B, T-1, V) slice of (B, T, V) logits needs no copy.
    base = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")  # running max of z
    s = 0.0  # sum exp(z - m)
    t = 0.0  # sum exp(z - m) * (z - m)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row of -inf so far: no NaN
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)  # 0 at -inf logits and padding
        if RETURN_ENTROPY:
            # Re-centre t on the new max: sum e_old (z - m_new) = t + (m - m_new) * s.
            shift = tl.where(s > 0, (m - m_safe) * s, 0.0)
            t = (t + shift) * alpha + tl.sum(tl.where(e > 0, e * (z - m_safe), 0.0), 0)
        s = s * alpha + tl.sum(e, 0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(base + target).to(tl.float32) / temperature
    tl.store(logprobs_ptr + row, z_target - lse)
    tl.store(lse_ptr + row, lse)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.log(s) - t / s)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr,
    stride_outer,
    stride_inner,
    inner,
    grad_ptr,
    stride_grad,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    V,
    temperature,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    grad_base = grad_ptr + row * stride_grad
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g_lp = tl.load(grad_logprobs_ptr + row)
    if HAS_ENTROPY:
        entropy = tl.load(entropy_ptr + row)
        g_ent = tl.load(grad_entropy_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        p = tl.exp(z - lse)
        grad = -g_lp * p
        if HAS_ENTROPY:
            # d entropy / d z = -p (log p + H); p == 0 (a -inf logit) contributes 0, not 0 * -inf.
            grad += tl.where(p > 0, -g_ent * p * (z - lse + entropy), 0.0)
        grad = tl.where(cols == target, grad + g_lp, grad) / temperature
        tl.store(grad_base + cols, cast_rtne(grad, grad_ptr.dtype.element_ty), mask=mask)


def _rows(logits: Tensor) -> tuple[Tensor, int, int, int, int]:
    """(tensor, rows, inner, stride_outer, stride_inner) addressing the (..., V) rows of ``logits``.

    A 3-D tensor with a unit-stride last dimension is used as it is (e.g. the shifted
    ``logits[:, :-1]``); anything else is reshaped to (N, V), which copies only if it must.
    """
    if logits.dim() == 3 and logits.stride(-1) == 1:
        outer, inner = logits.shape[:2]
        return logits, outer * inner, max(inner, 1), logits.stride(0), logits.stride(1)
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    n = flat.shape[0]
    return flat, n, max(n, 1), 0, flat.stride(0)


def _forward_rows(
    logits: Tensor, targets: Tensor, temperature: float, return_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Launches the forward kernel; returns (logprobs, lse, entropy or None), (N,) fp32 each."""
    src, n, inner, s_outer, s_inner = _rows(logits)
    vocab = logits.shape[-1]
    logprobs = torch.empty(n, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if return_entropy else None
    if n:
        block = block_for(vocab, _MAX_BLOCK_V)
        _logprobs_fwd_kernel[(n,)](
            src, s_outer, s_inner, inner, targets, logprobs, lse,
            entropy if entropy is not None else lse,  # unused when RETURN_ENTROPY is False
            vocab, temperature, RETURN_ENTROPY=return_entropy, BLOCK_V=block, num_warps=warps_for(block),
        )  # fmt: skip
    return logprobs, lse, entropy


def _backward_rows(
    logits: Tensor,
    grad_out: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    g_lp: Tensor,
    g_ent: Tensor | None,
    temperature: float,
) -> None:
    """Writes d(loss)/d(logits) of every row into ``grad_out`` ((N, V), unit stride in V).

    ``grad_out`` may be ``logits`` itself: each element is read before it is overwritten, by the
    same program.
    """
    src, n, inner, s_outer, s_inner = _rows(logits)
    vocab = logits.shape[-1]
    if not n:
        return
    block = block_for(vocab, _MAX_BLOCK_V)
    has_entropy = entropy is not None and g_ent is not None
    _logprobs_bwd_kernel[(n,)](
        src, s_outer, s_inner, inner, grad_out, grad_out.stride(0), targets, lse,
        entropy if has_entropy else lse, g_lp, g_ent if has_entropy else g_lp,
        vocab, temperature, HAS_ENTROPY=has_entropy, BLOCK_V=block, num_warps=warps_for(block),
    )  # fmt: skip


class _TritonFusedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,  # (..., V), any float dtype
        targets: Tensor,  # (N,) int64, ignored rows set to 0
        valid: Tensor,  # (N,) bool
        temperature: float,
        return_entropy: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        logprobs, lse, entropy = _forward_rows(logits, targets, temperature, return_entropy)
        _zero_ignored(valid, logprobs, entropy)
        ctx.save_for_backward(logits, targets, valid, lse, entropy)
        ctx.temperature = temperature
        return (logprobs, entropy) if entropy is not None else logprobs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        logits, targets, valid, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 5
        g_lp = _upstream(grad_outputs[0], valid).contiguous()
        g_ent = _upstream(grad_outputs[1], valid).contiguous() if entropy is not None else None
        vocab = logits.shape[-1]
        grad = torch.empty(valid.shape[0], vocab, dtype=logits.dtype, device=logits.device)  # (N, V)
        _backward_rows(logits, grad, targets, lse, entropy, g_lp, g_ent, ctx.temperature)
        return grad.view(logits.shape), None, None, None, None


def fused_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    return_entropy: bool,
    chunk_size: int,  # rows need no chunking here: nothing of size (rows, V) is allocated
    ignore_index: int | None,
) -> Tensor | tuple[Tensor, Tensor]:
    lead_shape = logits.shape[:-1]
    flat_targets, valid = _prepare_targets(targets, lead_shape, ignore_index)
    out = _TritonFusedLogprobs.apply(logits, flat_targets, valid, float(temperature), return_entropy)
    return _lead_view(out, lead_shape, return_entropy)


def _grad_rows(logits: Tensor, targets: Tensor, lse: Tensor, entropy: Tensor | None, g_lp: Tensor,
               g_ent: Tensor | None, temperature: float) -> Tensor:
    """d(loss)/d(logits) of one chunk, written over ``logits`` (compute dtype) by the backward kernel."""
    _backward_rows(logits, logits, targets, lse, entropy, g_lp.contiguous(),
                   None if g_ent is None else g_ent.contiguous(), temperature)
    return logits


TRITON_ROWS = ChunkRows(forward=_forward_rows, grad=_grad_rows)


def logprobs_from_hidden(hidden: Tensor, weight: Tensor, targets: Tensor, **kw) -> Tensor | tuple[Tensor, Tensor]:
    return run_from_hidden(TRITON_ROWS, hidden, weight, targets, **kw)
