"""Next-token sampling: temperature, top-k and top-p (nucleus) in one pass, or greedy.

Order as in Hugging Face ``generate``: z = logits / temperature; keep the k largest z (top-k);
of those, keep the smallest set of largest z whose probability under softmax(z over the kept set)
reaches top_p (a token is kept iff the mass of the kept tokens strictly larger than it is
< top_p, so the token that crosses top_p is kept; ties at the threshold are all kept); sample
from softmax over what is left. ``temperature == 0`` is greedy: argmax of the logits, no filters.

Sampling uses the Gumbel-max trick, ``argmax(z + g)`` over the kept tokens with
``g = -log(-log(u))``, which draws exactly from the renormalised softmax. The uniforms ``u`` come
from a counter-based hash of (seed, row, column) (:func:`hash_uniform`), computed identically by
the reference and the Triton kernel, so the two backends draw the same token for the same seed
(up to fp rounding of the thresholds and of log), and the kernel needs no (B, V) noise tensor.
The seed is drawn from torch's CPU random generator unless given, so ``torch.manual_seed``
makes sampling reproducible.

This module holds the pure-PyTorch reference (``reference`` backend, sort based); the Triton
kernel, which finds the top-k and top-p thresholds by bisection on the logits' bit patterns
without sorting, lives in :mod:`rlhf_kernels._triton.sampling`.
"""

from __future__ import annotations

import math

import torch

from . import _backend

Tensor = torch.Tensor

_MASK32 = 0xFFFFFFFF
# Constants of the murmur3 32-bit finaliser (fmix32) and the golden-ratio increment.
_FMIX1, _FMIX2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


def _mul32(x: Tensor | int, c: int) -> Tensor | int:
    """(x * c) mod 2^32 for int64 tensors (or Python ints) x in [0, 2^32), without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _fmix32(x: Tensor | int) -> Tensor | int:
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX2)
    return x ^ (x >> 16)


def hash_uniform(seed: int, rows: int, cols: int, device: torch.device | str = "cpu") -> Tensor:
    """The (rows, cols) uniforms in (0, 1) that :func:`sample` uses for ``seed``.

    ``u[r, c] = ((h >> 9) + 0.5) / 2^23`` with ``h = fmix32((c + fmix32(r * G + fmix32(seed))) mod 2^32)``
    (fmix32: the murmur3 finaliser, G = 0x9E3779B9). h is a bijection of c within a row; u has
    2^23 levels, never exactly 0 or 1.

    Args:
        seed: Any int (taken mod 2^32).
        rows: Number of rows (sequences).
        cols: Number of columns (vocabulary).
        device: Where to build the result.

    Returns:
        (rows, cols) float32 tensor.
    """
    # Mixed on the host (the same arithmetic on a Python int): no host-to-device copy per call.
    seed_mix = _fmix32(seed & _MASK32)
    r = torch.arange(rows, dtype=torch.int64, device=device)[:, None]
    row_mix = _fmix32((_mul32(r, _GOLDEN) + seed_mix) & _MASK32)  # (rows, 1)
    c = torch.arange(cols, dtype=torch.int64, device=device)[None, :]
    h = _fmix32((c + row_mix) & _MASK32)  # (rows, cols)
    return (h >> 9).float() * 2.0**-23 + 2.0**-24


def _sample_reference(
    logits: Tensor, *, temperature: float, top_k: int, top_p: float, seed: int
) -> Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    z = logits.float() / temperature  # (B, V)
    vocab = z.shape[-1]
    if 0 < top_k < vocab:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the tokens sorted before each one
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False  # the most likely token always stays
        # Ties with the last kept value stay too (the kernel keeps z >= threshold).
        threshold = sorted_z.masked_fill(drop_sorted, float("inf")).amin(dim=-1, keepdim=True)
        z = z.masked_fill(z < threshold, float("-inf"))
    gumbel = -torch.log(-torch.log(hash_uniform(seed, z.shape[0], vocab, z.device)))  # (B, V)
    return (z + gumbel).argmax(dim=-1)


_backend.register("sample", "reference", _sample_reference)
_backend.register("sample", "triton", "rlhf_kernels._triton.sampling:sample")


def sample(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Samples one token per row of ``logits`` (temperature, then top-k, then top-p), or greedily.

    Args:
        logits: (B, V) next-token logits, fp32, bf16 or fp16.
        temperature: Softmax temperature, >= 0; 0 means greedy (argmax, filters ignored).
        top_k: Keep the k most likely tokens; 0 (or >= V) disables.
        top_p: Keep the smallest set of most likely tokens whose mass reaches top_p, in (0, 1];
            1 disables.
        seed: Seed of the sampling noise (see :func:`hash_uniform`). Default: drawn from
            ``generator`` (or torch's default CPU generator), so ``torch.manual_seed`` applies.
        generator: A CPU ``torch.Generator`` to draw the seed from when ``seed`` is None.

    Returns:
        (B,) int64 token ids.

    Raises:
        ValueError: On a non-2-D or non-float ``logits``, or an out-of-range option.
        RuntimeError: If the requested backend cannot run here (see :func:`rlhf_kernels.set_backend`).
    """
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a float (B, V) tensor; got {tuple(logits.shape)} {logits.dtype}")
    if isinstance(temperature, bool) or not (isinstance(temperature, int | float) and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite float >= 0; got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be a finite float >= 0; got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables); got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, int | float) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 disables); got {top_p!r}")
    if seed is None:
        seed = int(torch.randint(0, 2**32, (), generator=generator, dtype=torch.int64))
    impl = _backend.dispatch("sample", logits.device)
    return impl(logits, temperature=float(temperature), top_k=top_k, top_p=float(top_p), seed=int(seed))
