"""Backward through the reference for ops whose Triton kernel is forward-only."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Tensor = torch.Tensor


class _RecomputeBackward(torch.autograd.Function):
    """Forward: ``fast(*inputs)``. Backward: autograd through ``reference(*inputs)``, recomputed."""

    @staticmethod
    def forward(ctx: Any, fast: Callable[..., Any], reference: Callable[..., Any], *inputs: Any) -> Any:
        ctx.reference = reference
        ctx.is_tensor = [isinstance(t, Tensor) for t in inputs]
        ctx.others = [None if isinstance(t, Tensor) else t for t in inputs]
        ctx.save_for_backward(*[t for t in inputs if isinstance(t, Tensor)])
        return fast(*inputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved).detach() if is_t else other for is_t, other in zip(ctx.is_tensor, ctx.others, strict=True)]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[2:]) if need]
        for i in wanted:
            inputs[i].requires_grad_(True)
        with torch.enable_grad():
            outputs = ctx.reference(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grad_outputs, allow_unused=True)
        result: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(wanted, grads, strict=True):
            result[i] = g
        return (None, None, *result)


def with_reference_backward(fast: Callable[..., Any], reference: Callable[..., Any], *inputs: Any) -> Any:
    """``fast(*inputs)``, differentiable by recomputing ``reference(*inputs)`` in the backward.

    Without autograd (no grad mode, or no input requiring grad) this is just ``fast(*inputs)``.
    """
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
        return _RecomputeBackward.apply(fast, reference, *inputs)
    return fast(*inputs)
