"""Masked statistics and loss aggregation: the reductions every loss and estimator builds on.

Part of :mod:`rlhf_algos.functional` (import from there); its docstring states the conventions
(mask semantics, padding selected away before non-linear math, empty reductions give 0).
"""

from __future__ import annotations

import torch


def _valid(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor, True where ``mask`` is non-zero (works for bool and float masks)."""
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_invalid(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out entries replaced by 0 *before* any non-linear math.

    Selecting away a result afterwards is not enough for autograd: the backward of e.g. ``y**2``
    at a padding value of ``inf`` is ``0 * inf = nan`` even though the forward value was dropped.
    """
    return torch.where(valid, x, torch.zeros_like(x))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``x * mask``; masked-out entries contribute exactly 0 even if they are inf/nan.

    Args:
        x: Values, any shape, e.g. ``(B, T)``.
        mask: Same shape as ``x`` (or broadcastable to it), float or bool, 1 = valid. Float
            masks act as weights on the valid entries.
        dim: Dimension(s) to reduce; ``None`` reduces over all elements.

    Returns:
        The masked sum, with ``dim`` removed (0-dim if ``dim`` is None).
    """
    weighted = torch.where(_valid(mask), x * mask.to(x.dtype), torch.zeros_like(x))
    return weighted.sum() if dim is None else weighted.sum(dim=dim)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None
) -> torch.Tensor:
    """Mean of ``x`` over the valid entries of ``mask``.

    The denominator is ``mask.sum(dim)`` clamped to at least 1, so a fully masked row (or
    batch) gives 0 rather than ``0 / 0 = nan``.

    Args:
        x: Values, any shape, e.g. ``(B, T)``.
        mask: Same shape as ``x`` (or broadcastable to it), float or bool, 1 = valid.
        dim: Dimension(s) to reduce; ``None`` reduces over all elements (a token-level mean).

    Returns:
        The masked mean, with ``dim`` removed (0-dim if ``dim`` is None).
    """
    weights = mask.to(x.dtype).expand_as(x)
    denom = weights.sum() if dim is None else weights.sum(dim=dim)
    return masked_sum(x, mask, dim) / denom.clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid entries of ``mask`` (a single global statistic).

    Args:
        x: Values, any shape, e.g. ``(B, T)``.
        mask: Same shape as ``x``, float or bool, 1 = valid.
        unbiased: Use Bessel's correction ``n / (n - 1)``. With fewer than 2 valid elements the
            unbiased variance is undefined and 0 is returned instead.

    Returns:
        0-dim tensor. 0 when there are no valid elements (either flavour) or, for
        ``unbiased=True``, fewer than 2.
    """
    x = _zero_invalid(x, _valid(mask))
    mean = masked_mean(x, mask)
    sq_dev = masked_sum((x - mean) ** 2, mask)
    n = mask.to(x.dtype).expand_as(x).sum()
    if not unbiased:
        return sq_dev / n.clamp(min=1.0)
    var = sq_dev / (n - 1.0).clamp(min=1.0)
    return torch.where(n >= 2.0, var, torch.zeros_like(var))


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance over the valid entries of ``mask``.

    ``(x - mean) / sqrt(var + eps)`` with the global masked mean and the *unbiased* masked
    variance (as in DeepSpeed-Chat / TRL advantage whitening). Used to whiten advantages before
    the PPO policy loss.

    Args:
        x: Values, e.g. advantages ``(B, T)``.
        mask: Same shape as ``x``, float or bool, 1 = valid.
        shift_mean: If False the mean is added back, i.e. only the scale is normalised (used for
            rewards, whose sign carries meaning).
        eps: Added to the variance before the square root.

    Returns:
        Tensor shaped like ``x``; masked-out positions are exactly 0. With no valid elements
        the result is all zeros.
    """
    x = _zero_invalid(x, _valid(mask))
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(_valid(mask), out, torch.zeros_like(out))


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the variance of the returns explained by the value head.

    ``1 - Var[returns - values] / Var[returns]`` over the valid entries of ``mask``: 1 is a
    perfect critic, 0 is no better than a constant, negative is worse than a constant.

    Convention: when ``Var[returns] == 0`` (including fewer than 2 valid elements) the ratio is
    undefined and 0 is returned, so the metric is always finite.

    Args:
        values: Value predictions ``(B, T)``.
        returns: Value targets ``(B, T)``.
        mask: ``(B, T)``, float or bool, 1 = valid.

    Returns:
        Detached 0-dim tensor.
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask, unbiased=True)
    var_residual = masked_var(returns - values, mask, unbiased=True)
    positive = var_returns > 0
    safe_denom = torch.where(positive, var_returns, torch.ones_like(var_returns))
    ev = 1.0 - var_residual / safe_denom
    return torch.where(positive, ev, torch.zeros_like(ev))


LOSS_AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
"""Names accepted by :func:`aggregate_loss` (and every ``loss_agg`` option)."""


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str, *, norm_len: int | None = None
) -> torch.Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar: how tokens and sequences are weighted.

    Peers differ here silently (see docs/algorithms.md); we make the choice a named option:

    * ``"token-mean"``: ``sum(l * m) / sum(m)``, every valid token of the batch weighs the same
      (DeepSpeed-Chat PPO; DAPO, Yu et al. 2025, "token-level policy gradient loss"; TRL GRPO's
      default ``loss_type="dapo"``).
    * ``"seq-mean-token-mean"``: the mean over rows of each row's token mean, so every sequence
      weighs the same whatever its length (GRPO as written in Shao et al. 2024, eq. 3).
    * ``"seq-mean-token-sum"``: the mean over rows of each row's token *sum* (longer responses
      weigh more).
    * ``"seq-mean-token-sum-norm"``: row sums divided by a constant ``norm_len``, then the mean
      over rows (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.1 and its
      reference code, which divides by the generation budget ``max_new_tokens``); no length
      bias and no dependence on the batch's token count.

    Gradient accumulation: with equal-sized micro-batches whose losses are averaged (as DeepSpeed
    does over its accumulation steps), the three ``seq-mean-*`` modes give the same gradient as
    one big micro-batch. ``"token-mean"`` does only when every micro-batch holds the same number
    of valid tokens: it weighs tokens equally *within* a micro-batch, micro-batches equally
    across them.

    Fully masked rows are excluded from every mean (they neither add 0 to the numerator nor 1
    to the number of rows). An all-masked batch gives a 0 that still carries a graph
    (``backward`` works and gives zero gradients), never ``nan``. Masked-out positions may hold
    ``inf``/``nan``: they are selected away as in :func:`masked_sum`.

    Args:
        per_token: Per-token loss ``(B, T)``.
        mask: ``(B, T)``, float or bool, 1 = valid.
        mode: One of :data:`LOSS_AGG_MODES`.
        norm_len: The constant divisor for ``"seq-mean-token-sum-norm"``; defaults to ``T``.
            Pass the generation budget so that batches whose longest response is shorter than
            the budget are not up-weighted. Ignored by the other modes.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: If ``mode`` is not one of :data:`LOSS_AGG_MODES` or ``norm_len < 1``.
    """
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss_agg={mode!r} is not supported; expected one of {LOSS_AGG_MODES}")
    valid = _valid(mask)
    has_tokens = valid.any(dim=-1).to(per_token.dtype)  # (B,) 1 for rows with >= 1 valid token
    num_rows = has_tokens.sum().clamp(min=1.0)
    per_row = _per_row_loss(per_token, mask, mode, norm_len)  # (B,), 0 for empty rows
    # Empty rows already contribute exactly 0 to the sum; they are only kept out of the count.
    return (per_row * has_tokens).sum() / num_rows


def _per_row_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm_len: int | None) -> torch.Tensor:
    """Each row's loss ``(B,)`` under one of the ``seq-mean-*`` modes of :func:`aggregate_loss`; 0 for
    rows with no valid token. Raises ``ValueError`` if ``norm_len < 1``."""
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=-1)  # (B,)
    per_row = masked_sum(per_token, mask, dim=-1)  # (B,)
    if mode == "seq-mean-token-sum-norm":
        norm = per_token.shape[-1] if norm_len is None else norm_len
        if norm < 1:
            raise ValueError(f"norm_len={norm_len!r} must be >= 1")
        per_row = per_row / norm
    return per_row

