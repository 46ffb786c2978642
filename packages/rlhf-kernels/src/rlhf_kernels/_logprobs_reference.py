"""The pure-PyTorch reference of :mod:`rlhf_kernels.logprobs` (its ``reference`` backend, the CPU path
and the test oracle): per-chunk math, the chunked autograd Functions, and the from-hidden driver
that the Triton backend shares (:func:`run_from_hidden` with a backend's :class:`ChunkRows`).

The math and the public functions are documented in :mod:`rlhf_kernels.logprobs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

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


def _zero_ignored(valid: Tensor, logprobs: Tensor, entropy: Tensor | None) -> None:
    """Ignored rows get log-prob 0 and entropy 0 (in place); every backend's forward ends with this."""
    logprobs.masked_fill_(~valid, 0.0)
    if entropy is not None:
        entropy.masked_fill_(~valid, 0.0)


def _forward_chunks(
    like: Tensor,
    valid: Tensor,
    chunk_size: int,
    return_entropy: bool,
    chunk: Callable[[slice], tuple[Tensor, Tensor, Tensor | None]],
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The chunk loop of both reference forwards: ``chunk(rows)`` gives one chunk's (logprobs, lse,
    entropy or None); returns the (N,) fp32 logprobs, lse and entropy (or None), ignored rows zeroed.
    ``like`` is the (N, ...) input the outputs are allocated next to."""
    n = like.shape[0]
    logprobs = like.new_empty(n, dtype=torch.float32)
    lse = like.new_empty(n, dtype=torch.float32)
    entropy = like.new_empty(n, dtype=torch.float32) if return_entropy else None
    for start in _row_chunks(n, chunk_size):
        rows = slice(start, start + chunk_size)
        logprobs[rows], lse[rows], entropy_c = chunk(rows)
        if entropy is not None:
            entropy[rows] = entropy_c
    _zero_ignored(valid, logprobs, entropy)
    return logprobs, lse, entropy


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
        logprobs, lse, entropy = _forward_chunks(
            logits, valid, chunk_size, return_entropy,
            # (c, V) fp32 scaled logits: the only fp32 copy alive
            lambda rows: _chunk_forward(_scaled_fp32(logits[rows], temperature), targets[rows], return_entropy),
        )
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
        logprobs, lse, entropy = _forward_chunks(
            hidden, valid, chunk_size, return_entropy,
            # (c, V) logits, matmul in the input dtype
            lambda rows: rows_math.forward(F.linear(hidden[rows], weight, bias), targets[rows], temperature,
                                           return_entropy),
        )
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


# --------------------------------------------------------------------------- rows in, rows out (every backend)


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


def _lead_view(out: Tensor | tuple[Tensor, Tensor], lead_shape: torch.Size,
               return_entropy: bool) -> Tensor | tuple[Tensor, Tensor]:
    """An autograd Function's (N,) output(s) viewed back to the inputs' leading shape (every backend)."""
    if return_entropy:
        return out[0].view(lead_shape), out[1].view(lead_shape)
    return out.view(lead_shape)


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
    return _lead_view(out, lead_shape, return_entropy)


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
    return _lead_view(out, lead_shape, return_entropy)


def _logprobs_from_hidden_reference(hidden: Tensor, weight: Tensor, targets: Tensor, **kw) -> Tensor | tuple[Tensor, Tensor]:
    return run_from_hidden(REFERENCE_ROWS, hidden, weight, targets, **kw)

