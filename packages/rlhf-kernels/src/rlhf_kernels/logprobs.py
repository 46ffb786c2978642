"""Token log-probabilities and entropy over the vocabulary, without a full fp32 log-softmax.

For a language model with vocabulary V, ``log_softmax(logits.float())`` over (B, T, V) is the
largest tensor of an RLHF step (e.g. 8 x 2048 x 128k x 4 bytes = 8 GiB). The functions here
process the B*T rows in chunks: each chunk is upcast to fp32, reduced to one log-prob (and one
entropy) per row, and dropped. Backward recomputes each chunk's softmax from the saved inputs and
the per-row log-sum-exp instead of saving it.

Math, per row with z = logits / temperature, p = softmax(z), y = target:
    logprob  = z_y - logsumexp(z)
    entropy  = -sum_v p_v log p_v
    d logprob / d z = onehot(y) - p
    d entropy / d z = -p * (log p + entropy)
and d/d logits = (d/d z) / temperature.

This module holds the pure-PyTorch reference implementations, registered as the ``reference``
backend; the Triton ones (:mod:`rlhf_kernels._triton.logprobs`) stream over the vocabulary
inside each row instead and never allocate anything of size (rows, V) in the forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F

from . import _backend

Tensor = torch.Tensor


# --------------------------------------------------------------------------- per-chunk math


def _scaled_fp32(logits: Tensor, temperature: float, *, fresh: bool = False) -> Tensor:
    """(c, V) logits of any float dtype -> (c, V) fp32 logits / temperature.

    The result may alias ``logits`` (fp32 input, temperature 1), so callers never write into it.
    ``fresh=True`` says ``logits`` is a temporary the caller owns, so it may be divided in place.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z.div_(temperature) if (fresh or z is not logits) else z / temperature
    return z


def _chunk_forward(z: Tensor, targets: Tensor, need_entropy: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Log-prob, log-sum-exp and (optionally) entropy of each row of one chunk.

    Args:
        z: (c, V) fp32 scaled logits.
        targets: (c,) int64 indices in [0, V).
        need_entropy: Whether to compute the entropy.

    Returns:
        logprobs (c,), lse (c,) and entropy (c,) or None, all fp32.
    """
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    logprobs = z.gather(1, targets[:, None]).squeeze(1) - lse  # (c,)
    entropy = None
    if need_entropy:
        p = torch.exp(z - lse[:, None])  # (c, V)
        # entr(p) = -p log p with entr(0) = 0, so -inf logits (masked vocabulary) give 0, not NaN.
        entropy = torch.special.entr(p).sum(dim=-1)  # (c,)
    return logprobs, lse, entropy


def _chunk_grad(
    z: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Tensor | None,
    grad_logprobs: Tensor,
    grad_entropy: Tensor | None,
    temperature: float,
) -> Tensor:
    """Gradient w.r.t. the unscaled logits of one chunk.

    Args:
        z: (c, V) fp32 scaled logits (not modified).
        targets: (c,) int64.
        lse: (c,) fp32 log-sum-exp of ``z`` saved by the forward.
        entropy: (c,) fp32 entropy saved by the forward, or None.
        grad_logprobs: (c,) fp32 upstream gradient, zero at ignored rows.
        grad_entropy: (c,) fp32 upstream gradient, zero at ignored rows, or None.
        temperature: Softmax temperature.

    Returns:
        (c, V) fp32 gradient: g_lp * (onehot - p) - g_H * p * (log p + H), divided by temperature.
    """
    p = torch.exp(z - lse[:, None])  # (c, V), a fresh buffer that we reuse for the result
    if grad_entropy is None:
        grad = p.mul_(-grad_logprobs[:, None])
    else:
        assert entropy is not None
        # -g_H * p * (log p + H) = g_H * entr(p) - g_H * H * p; entr avoids 0 * -inf at masked logits.
        coef = grad_logprobs + grad_entropy * entropy  # (c,)
        grad = torch.special.entr(p).mul_(grad_entropy[:, None])
        grad.addcmul_(p, coef[:, None], value=-1.0)
    grad.scatter_add_(1, targets[:, None], grad_logprobs[:, None])
    if temperature != 1.0:
        grad.div_(temperature)
    return grad


def _row_chunks(n: int, chunk_size: int) -> range:
    return range(0, n, chunk_size)


def _upstream(grad: Tensor, valid: Tensor) -> Tensor:
    # Ignored rows get no gradient whatever the caller's upstream gradient says.
    return grad.float().masked_fill(~valid, 0.0)


# --------------------------------------------------------------------------- autograd Functions


class _FusedLogprobs(torch.autograd.Function):
    """Chunked log-prob/entropy of (N, V) logits; backward recomputes the softmax per chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,  # (N, V), any float dtype
        targets: Tensor,  # (N,) int64, ignored rows already set to 0
        valid: Tensor,  # (N,) bool
        temperature: float,
        chunk_size: int,
        return_entropy: bool,
    ) -> Tensor | tuple[Tensor, Tensor]:
        n = logits.shape[0]
        logprobs = logits.new_empty(n, dtype=torch.float32)
        lse = logits.new_empty(n, dtype=torch.float32)
        entropy = logits.new_empty(n, dtype=torch.float32) if return_entropy else None
        for start in _row_chunks(n, chunk_size):
            rows = slice(start, start + chunk_size)
            z = _scaled_fp32(logits[rows], temperature)  # (c, V) fp32, the only fp32 copy alive
            logprobs[rows], lse[rows], entropy_c = _chunk_forward(z, targets[rows], return_entropy)
            if entropy is not None:
                entropy[rows] = entropy_c
        logprobs.masked_fill_(~valid, 0.0)
        if entropy is not None:
            entropy.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(logits, targets, valid, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return (logprobs, entropy) if entropy is not None else logprobs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        logits, targets, valid, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 6
        g_lp = _upstream(grad_outputs[0], valid)
        g_ent = _upstream(grad_outputs[1], valid) if entropy is not None else None
        grad_logits = torch.empty_like(logits)  # (N, V) in the logits dtype
        for start in _row_chunks(logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            z = _scaled_fp32(logits[rows], ctx.temperature)
            grad_logits[rows] = _chunk_grad(
                z,
                targets[rows],
                lse[rows],
                None if entropy is None else entropy[rows],
                g_lp[rows],
                None if g_ent is None else g_ent[rows],
                ctx.temperature,
            )
        return grad_logits, None, None, None, None, None


@dataclass(frozen=True)
class ChunkRows:
    """One backend's per-chunk math for :class:`_LogprobsFromHidden` (the chunk loop, the matmuls and
    the gradient accumulation are shared by every backend; only these two differ).

    Attributes:
        forward: ``(logits (c, V), targets (c,), temperature, need_entropy) -> (logprobs, lse,
            entropy or None)``, each (c,) float32; ``logits`` in the compute dtype.
        grad: ``(logits (c, V), targets, lse, entropy or None, g_logprobs, g_entropy or None,
            temperature) -> d(loss)/d(logits)`` (c, V) in any float dtype; may overwrite ``logits``.
    """

    forward: Callable[..., tuple[Tensor, Tensor, Tensor | None]]
    grad: Callable[..., Tensor]


REFERENCE_ROWS = ChunkRows(
    forward=lambda logits, targets, temperature, need_entropy: _chunk_forward(
        _scaled_fp32(logits, temperature, fresh=True), targets, need_entropy),
    grad=lambda logits, targets, lse, entropy, g_lp, g_ent, temperature: _chunk_grad(
        _scaled_fp32(logits, temperature, fresh=True), targets, lse, entropy, g_lp, g_ent, temperature),
)


class _LogprobsFromHidden(torch.autograd.Function):
    """Like _FusedLogprobs, but each chunk's logits are computed from hidden states on the fly; the
    per-chunk log-prob math is a backend's :class:`ChunkRows`."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,  # (N, H)
        weight: Tensor,  # (V, H)
        bias: Tensor | None,  # (V,)
        targets: Tensor,  # (N,) int64, ignored rows already set to 0
        valid: Tensor,  # (N,) bool
        temperature: float,
        chunk_size: int,
        return_entropy: bool,
        rows_math: ChunkRows,
    ) -> Tensor | tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32) if return_entropy else None
        for start in _row_chunks(n, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = F.linear(hidden[rows], weight, bias)  # (c, V), matmul in the input dtype
            logprobs[rows], lse[rows], entropy_c = rows_math.forward(logits, targets[rows], temperature,
                                                                     return_entropy)
            if entropy is not None:
                entropy[rows] = entropy_c
        logprobs.masked_fill_(~valid, 0.0)
        if entropy is not None:
            entropy.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.rows_math = temperature, chunk_size, rows_math
        return (logprobs, entropy) if entropy is not None else logprobs

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        g_lp = _upstream(grad_outputs[0], valid)
        g_ent = _upstream(grad_outputs[1], valid) if entropy is not None else None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # The weight gradient sums over all chunks; accumulate in fp32 so that a bf16/fp16 weight
        # is rounded once at the end, not once per chunk. Costs one fp32 (V, H) buffer.
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in _row_chunks(hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h = hidden[rows]  # (c, H)
            grad_z = ctx.rows_math.grad(
                F.linear(h, weight, bias),  # (c, V) logits, recomputed
                targets[rows],
                lse[rows],
                None if entropy is None else entropy[rows],
                g_lp[rows],
                None if g_ent is None else g_ent[rows],
                ctx.temperature,
            )  # (c, V): fp32 (reference) or the compute dtype (kernels)
            if grad_hidden is not None:
                # Same precision as autograd: the logits gradient in the compute dtype, then matmul.
                grad_hidden[rows] = grad_z.to(weight.dtype) @ weight  # (c, H)
            if grad_weight is not None:
                grad_weight += (grad_z.t() @ h.to(grad_z.dtype)).float()  # (V, c) @ (c, H)
            if grad_bias is not None:
                grad_bias += grad_z.float().sum(dim=0)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------- validation


def _check_options(temperature: float, chunk_size: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a positive finite float; got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float; got {temperature!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def _prepare_targets(
    targets: Tensor, lead_shape: torch.Size, ignore_index: int | None
) -> tuple[Tensor, Tensor]:
    """Returns (N,) int64 targets with ignored entries set to 0 and the (N,) bool mask of valid ones."""
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise ValueError(f"targets must be an integer tensor (int64); got dtype {targets.dtype}")
    if targets.shape != lead_shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal the leading dimensions "
            f"{tuple(lead_shape)} of the logits"
        )
    flat = targets.reshape(-1).long()  # (N,)
    if ignore_index is None:
        return flat, torch.ones_like(flat, dtype=torch.bool)
    valid = flat != ignore_index
    return flat.masked_fill(~valid, 0), valid


# --------------------------------------------------------------------------- reference backends


def _fused_logprobs_reference(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float,
    return_entropy: bool,
    chunk_size: int,
    ignore_index: int | None,
) -> Tensor | tuple[Tensor, Tensor]:
    lead_shape, vocab = logits.shape[:-1], logits.shape[-1]
    flat_targets, valid = _prepare_targets(targets, lead_shape, ignore_index)
    out = _FusedLogprobs.apply(
        logits.reshape(-1, vocab),  # (N, V); a view when logits are contiguous
        flat_targets,
        valid,
        float(temperature),
        chunk_size,
        return_entropy,
    )
    if return_entropy:
        return out[0].view(lead_shape), out[1].view(lead_shape)
    return out.view(lead_shape)


def run_from_hidden(
    rows_math: ChunkRows,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None,
    temperature: float,
    return_entropy: bool,
    chunk_size: int,
    ignore_index: int | None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Flatten the rows, apply the chunked from-hidden log-prob with a backend's per-chunk math
    (:data:`REFERENCE_ROWS` or a kernel backend's :class:`ChunkRows`), restore the leading shape."""
    lead_shape, hidden_size = hidden.shape[:-1], hidden.shape[-1]
    flat_targets, valid = _prepare_targets(targets, lead_shape, ignore_index)
    out = _LogprobsFromHidden.apply(
        hidden.reshape(-1, hidden_size),  # (N, H)
        weight,
        bias,
        flat_targets,
        valid,
        float(temperature),
        chunk_size,
        return_entropy,
        rows_math,
    )
    if return_entropy:
        return out[0].view(lead_shape), out[1].view(lead_shape)
    return out.view(lead_shape)


def _logprobs_from_hidden_reference(hidden: Tensor, weight: Tensor, targets: Tensor, **kw) -> Tensor | tuple[Tensor, Tensor]:
    return run_from_hidden(REFERENCE_ROWS, hidden, weight, targets, **kw)


_backend.register("fused_logprobs", "reference", _fused_logprobs_reference)
_backend.register("logprobs_from_hidden", "reference", _logprobs_from_hidden_reference)
_backend.register("fused_logprobs", "triton", "rlhf_kernels._triton.logprobs:fused_logprobs")
_backend.register("logprobs_from_hidden", "triton", "rlhf_kernels._triton.logprobs:logprobs_from_hidden")


# --------------------------------------------------------------------------- public API


@overload
def fused_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = ...,
    return_entropy: Literal[False] = ...,
    chunk_size: int = ...,
    ignore_index: int | None = ...,
) -> Tensor: ...
@overload
def fused_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = ...,
    return_entropy: Literal[True],
    chunk_size: int = ...,
    ignore_index: int | None = ...,
) -> tuple[Tensor, Tensor]: ...
def fused_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 4096,
    ignore_index: int | None = -100,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of ``targets`` (and the entropy) under ``softmax(logits / temperature)``.

    Equivalent to ``log_softmax(logits.float() / temperature, -1).gather(-1, targets)``, but the
    B*T rows are processed ``chunk_size`` at a time, so the full (B*T, V) fp32 log-softmax never
    exists, in forward or backward. Differentiable w.r.t. ``logits``; the gradient has the dtype
    of ``logits``.

    Args:
        logits: (B, T, V) fp32, bf16 or fp16 logits (any number of leading dimensions works).
        targets: (B, T) int64 token ids in [0, V), or ``ignore_index``.
        temperature: Softmax temperature, > 0.
        return_entropy: Also return the entropy of ``softmax(logits / temperature)``.
        chunk_size: Rows (of the flattened B*T) upcast to fp32 at a time by the reference
            backend; its peak extra memory is about 2 * chunk_size * V * 4 bytes. The Triton
            kernel streams over the vocabulary inside each row and ignores it (its forward
            allocates nothing of size (rows, V); its backward only the gradient).
        ignore_index: Target value marking positions to skip (padding, prompt tokens); they get
            log-prob 0, entropy 0 and zero gradient. ``None`` disables ignoring.

    Returns:
        logprobs: (B, T) float32. With ``return_entropy=True``, a tuple (logprobs, entropy), both
        (B, T) float32.

    Raises:
        ValueError: On mismatched shapes, a non-float ``logits``, non-integer ``targets``, a
            non-positive ``temperature`` or ``chunk_size``.
        RuntimeError: If the requested backend cannot run here (see :func:`rlhf_kernels.set_backend`).
    """
    if not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(f"logits must be a floating-point (..., V) tensor; got dtype {logits.dtype}")
    _check_options(temperature, chunk_size)
    impl = _backend.dispatch("fused_logprobs", logits.device)
    return impl(
        logits,
        targets,
        temperature=temperature,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
    )


@overload
def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = ...,
    temperature: float = ...,
    return_entropy: Literal[False] = ...,
    chunk_size: int = ...,
    ignore_index: int | None = ...,
) -> Tensor: ...
@overload
def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = ...,
    temperature: float = ...,
    return_entropy: Literal[True],
    chunk_size: int = ...,
    ignore_index: int | None = ...,
) -> tuple[Tensor, Tensor]: ...
def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int = 1024,
    ignore_index: int | None = -100,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probabilities of ``targets`` (and the entropy) straight from the final hidden states.

    Computes ``fused_logprobs(hidden @ weight.T + bias, targets, ...)`` with the logits produced
    ``chunk_size`` rows at a time, so neither the (B, T, V) logits nor their fp32 log-softmax ever
    exist. Backward recomputes each chunk's logits. Differentiable w.r.t. ``hidden``, ``weight``
    and ``bias``; the weight gradient is accumulated over chunks in fp32.

    Args:
        hidden: (B, T, H) final hidden states (any number of leading dimensions works).
        weight: (V, H) lm_head weight, same dtype as ``hidden``.
        targets: (B, T) int64 token ids in [0, V), or ``ignore_index``.
        bias: Optional (V,) lm_head bias, same dtype as ``hidden``.
        temperature: Softmax temperature, > 0.
        return_entropy: Also return the entropy of ``softmax(logits / temperature)``.
        chunk_size: Rows (of the flattened B*T) whose logits exist at a time.
        ignore_index: Target value marking positions to skip; they get log-prob 0, entropy 0 and
            zero gradient. ``None`` disables ignoring.

    Returns:
        logprobs: (B, T) float32. With ``return_entropy=True``, a tuple (logprobs, entropy), both
        (B, T) float32.

    Raises:
        ValueError: On mismatched shapes or dtypes, non-integer ``targets``, a non-positive
            ``temperature`` or ``chunk_size``.
        RuntimeError: If the requested backend cannot run here (see :func:`rlhf_kernels.set_backend`).
    """
    if not hidden.is_floating_point() or hidden.dim() < 1:
        raise ValueError(f"hidden must be a floating-point (..., H) tensor; got dtype {hidden.dtype}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, {hidden.shape[-1]}) to match hidden; got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != hidden.dtype):
        raise ValueError(
            f"bias must have shape ({weight.shape[0]},) and dtype {hidden.dtype}; "
            f"got {tuple(bias.shape)} {bias.dtype}"
        )
    _check_options(temperature, chunk_size)
    impl = _backend.dispatch("logprobs_from_hidden", hidden.device)
    return impl(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
    )
