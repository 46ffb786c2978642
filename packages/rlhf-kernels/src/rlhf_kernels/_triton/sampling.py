"""Triton sampling: temperature, top-k, top-p and the Gumbel-max draw in one program per row.

No sort. Each fp32 z = logit / temperature maps to an order-preserving integer key in
[0, 2^32) (its bit pattern, negatives flipped); thresholds are found by bisection on that key:
- top-k: the largest key x with count(key >= x) >= k, i.e. the k-th largest z exactly
  (32 counting passes over the row);
- top-p: the smallest key x with sum_{kept, key > x} exp(z - max) < top_p * sum_{kept} exp(z - max),
  i.e. the last token whose mass above is still below top_p (32 summing passes).
A last pass draws ``argmax(z + gumbel)`` over the kept tokens, with the uniforms of
:func:`rlhf_kernels.sampling.hash_uniform` recomputed in place from (seed, row, column).
Greedy is a single argmax pass. The passes re-read the row (from L2 for rows of a few hundred KB).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sampling import _FMIX1, _FMIX2, _GOLDEN, _MASK32
from ._common import block_for, warps_for

Tensor = torch.Tensor

_MAX_BLOCK_V = 4096


@triton.jit
def _mul32(x, c: tl.constexpr):
    # (x * c) mod 2^32 for int64 x in [0, 2^32), split so nothing overflows int64.
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


@triton.jit
def _fmix32(x, C1: tl.constexpr, C2: tl.constexpr):
    x = x ^ (x >> 16)
    x = _mul32(x, C1)
    x = x ^ (x >> 13)
    x = _mul32(x, C2)
    return x ^ (x >> 16)


@triton.jit
def _keys(z):
    # Order-preserving map of fp32 to int64 in [0, 2^32): flip the magnitude bits of negatives.
    bits = z.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648


@triton.jit
def _sample_kernel(
    logits_ptr,
    stride_row,
    out_ptr,
    V,
    temperature,
    top_k,
    top_p,
    seed_mix,
    GREEDY: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    GOLDEN: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    offs = tl.arange(0, BLOCK_V)
    best = float("-inf")
    best_idx = tl.zeros((), tl.int64)
    if GREEDY:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            block_best = tl.max(z, 0)
            take = block_best > best  # strict: the first maximum wins, as in torch.argmax
            best_idx = tl.where(take, start + tl.argmax(z, 0).to(tl.int64), best_idx)
            best = tl.where(take, block_best, best)
    else:
        threshold = tl.zeros((), tl.int64)  # key of the smallest kept z; 0 keeps everything
        if TOP_K:
            hi = tl.full((), 4294967295, tl.int64)
            for _ in range(32):
                mid = (threshold + hi + 1) // 2
                count = tl.zeros((), tl.int64)
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    mask = cols < V
                    z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) / temperature
                    count += tl.sum((mask & (_keys(z) >= mid)).to(tl.int64), 0)
                enough = count >= top_k
                threshold = tl.where(enough, mid, threshold)
                hi = tl.where(enough, hi, mid - 1)
        if TOP_P:
            row_max = float("-inf")
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
                row_max = tl.maximum(row_max, tl.max(z, 0))
            kept_mass = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + offs
                mask = cols < V
                z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
                kept_mass += tl.sum(tl.where(mask & (_keys(z) >= threshold), tl.exp(z - row_max), 0.0), 0)
            target = top_p * kept_mass
            hi = tl.full((), 4294967295, tl.int64)
            for _ in range(32):
                mid = (threshold + hi) // 2
                above = 0.0
                for start in range(0, V, BLOCK_V):
                    cols = start + offs
                    mask = cols < V
                    z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
                    keys = _keys(z)
                    above += tl.sum(tl.where(mask & (keys > mid) & (keys >= threshold), tl.exp(z - row_max), 0.0), 0)
                small = above < target
                hi = tl.where(small, mid, hi)
                threshold = tl.where(small, threshold, mid + 1)
        row_mix = _fmix32((_mul32(row, GOLDEN) + seed_mix) & 0xFFFFFFFF, C1, C2)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
            h = _fmix32((cols.to(tl.int64) + row_mix) & 0xFFFFFFFF, C1, C2)
            u = (h >> 9).to(tl.float32) * 1.1920928955078125e-07 + 5.9604644775390625e-08  # 2^-23, 2^-24
            score = tl.where(mask & (_keys(z) >= threshold), z - tl.log(-tl.log(u)), float("-inf"))
            block_best = tl.max(score, 0)
            take = block_best > best
            best_idx = tl.where(take, start + tl.argmax(score, 0).to(tl.int64), best_idx)
            best = tl.where(take, block_best, best)
    tl.store(out_ptr + row, best_idx)


def _fmix32_host(x: int) -> int:
    x ^= x >> 16
    x = (x * _FMIX1) & _MASK32
    x ^= x >> 13
    x = (x * _FMIX2) & _MASK32
    return x ^ (x >> 16)


def sample(logits: Tensor, *, temperature: float, top_k: int, top_p: float, seed: int) -> Tensor:
    B, V = logits.shape
    out = torch.zeros(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    block = block_for(V, _MAX_BLOCK_V)
    greedy = temperature == 0.0
    _sample_kernel[(B,)](
        logits, logits.stride(0), out, V, temperature if not greedy else 1.0, top_k, top_p,
        _fmix32_host(seed & _MASK32),
        GREEDY=greedy, TOP_K=(not greedy) and 0 < top_k < V, TOP_P=(not greedy) and top_p < 1.0,
        GOLDEN=_GOLDEN, C1=_FMIX1, C2=_FMIX2, BLOCK_V=block, num_warps=warps_for(block),
    )  # fmt: skip
    return out
