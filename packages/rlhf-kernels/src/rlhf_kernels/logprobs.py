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

The pure-PyTorch reference implementations (:mod:`rlhf_kernels._logprobs_reference`) are
registered here as the ``reference`` backend; the Triton ones (:mod:`rlhf_kernels._triton.logprobs`)
stream over the vocabulary inside each row instead and never allocate anything of size (rows, V)
in the forward.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch

from . import _backend
from ._logprobs_reference import (
    REFERENCE_ROWS,
    ChunkRows,
    _fused_logprobs_reference,
    _logprobs_from_hidden_reference,
    run_from_hidden,
)

__all__ = ["REFERENCE_ROWS", "ChunkRows", "fused_logprobs", "logprobs_from_hidden", "run_from_hidden"]

Tensor = torch.Tensor


# --------------------------------------------------------------------------- validation


def _check_options(temperature: float, chunk_size: int) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise ValueError(f"temperature must be a positive finite float; got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite float; got {temperature!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int; got {chunk_size!r}")


def _check_from_hidden(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """The shape and dtype checks of :func:`logprobs_from_hidden`'s tensors (``ValueError``)."""
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


# --------------------------------------------------------------------------- backends


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
    _check_from_hidden(hidden, weight, bias)
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
