"""Triton decode attention: one program per (sequence, kv head), online softmax over the cache.

Each program loads the G = Hq / Hkv queries that share its kv head (padded to 16 rows so the
score and output products can use ``tl.dot``; operands are upcast to fp32 first: with 16-bit
inputs the TF32 products are exact for q, k and v, and the interpreter has no 16-bit dot), then streams the sequence's filled prefix of the
cache in ``BLOCK_N`` slots at a time: scores (G, BLOCK_N), running max / sum, and the output
accumulator (G, D), all fp32. Each key and value is read once per kv head, whatever G is.
The loop bound is the sequence's own length, so ragged batches read only their filled slots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cast_rtne

Tensor = torch.Tensor


@triton.jit
def _decode_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    seqlens_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    scale,
    G,
    D,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    length = tl.load(seqlens_ptr + b).to(tl.int32)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask, d_mask = g < G, d < D
    heads = kv_head * G + g  # query heads of this group
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # (BLOCK_G, BLOCK_D)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)  # noqa: E741 (the usual name for the softmax denominator)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    n = tl.arange(0, BLOCK_N)
    for start in range(0, length, BLOCK_N):
        slots = start + n
        kv_mask = (slots < length)[:, None] & d_mask[None, :]
        k = tl.load(k_base + slots[:, None] * stride_ks + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + slots[:, None] * stride_vs + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale  # (G, N) fp32
        scores = tl.where((slots < length)[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])  # (G, N)
        l = l * alpha + tl.sum(p, 1)  # noqa: E741
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # a length-0 sequence: acc is 0, so out is 0
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :],
        cast_rtne(out, out_ptr.dtype.element_ty),
        mask=g_mask[:, None] & d_mask[None, :],
    )


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *, scale: float) -> Tensor:
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need a unit stride in their last (D) dimension")
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    group = Hq // Hkv
    block_d = max(triton.next_power_of_2(D), 16)
    _decode_attention_kernel[(B, Hkv)](
        q, k_cache, v_cache, out, cache_seqlens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        scale, group, D,
        BLOCK_G=max(triton.next_power_of_2(group), 16), BLOCK_D=block_d, BLOCK_N=64 if block_d <= 64 else 32,
        # fp32 caches: exact fp32 products. 16-bit caches: TF32 holds their values exactly.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
    )  # fmt: skip
    return out
