"""Decode attention: one new query token per sequence against a preallocated KV cache.

During generation each step has one query per sequence and a KV cache of S_max preallocated
slots, of which the first ``cache_seqlens[b]`` are filled (the new token's key and value already
written). Sequences in a batch have different lengths (ragged), so each attends to its own prefix.
Grouped-query attention (GQA): Hq query heads share Hkv key/value heads, query head i reading
kv head i // (Hq / Hkv) (the Hugging Face ``repeat_kv`` convention); Hkv = Hq is plain multi-head.

    out[b, i] = softmax(scale * q[b, i] . K[b, i // G, :L_b]^T) V[b, i // G, :L_b]

This module holds the pure-PyTorch reference (``reference`` backend); the Triton kernel, which
streams over the cache with an online softmax and reads each kv head once for its whole query
group, lives in :mod:`rlhf_kernels._triton.attention`. Not differentiable (an inference op).
Neither backend reads the lengths on the host when they are on an accelerator, so a decode step
built on this op can be captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch

from . import _backend

Tensor = torch.Tensor


def _decode_attention_reference(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *, scale: float,
    longest: int | None = None,
) -> Tensor:
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if longest is None:
        # Lengths on the CPU: read the longest one and skip the unfilled tail (no device involved).
        # Lengths on an accelerator: attend over all S_max slots instead (masked slots add exactly
        # 0), because reading them would be a host-device sync in every decode step and would make
        # the step impossible to capture in a CUDA graph.
        on_host = cache_seqlens.device.type == "cpu"
        longest = (int(cache_seqlens.max()) if B else 0) if on_host else k_cache.shape[2]
    k = k_cache[:, :, :longest].float()  # (B, Hkv, L, D)
    v = v_cache[:, :, :longest].float()
    qg = q.float().view(B, Hkv, Hq // Hkv, D)  # (B, Hkv, G, D)
    scores = torch.einsum("bhgd,bhld->bhgl", qg, k) * scale  # (B, Hkv, G, L)
    valid = torch.arange(longest, device=q.device)[None, :] < cache_seqlens[:, None].to(q.device)  # (B, L)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    v = v.masked_fill(~valid[:, None, :, None], 0.0)  # unfilled slots may hold anything, even NaN
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty sequence (length 0) gives 0
    out = torch.einsum("bhgl,bhld->bhgd", probs, v)  # (B, Hkv, G, D)
    return out.reshape(B, Hq, D).to(q.dtype)


_backend.register("decode_attention", "reference", _decode_attention_reference)
_backend.register("decode_attention", "triton", "rlhf_kernels._triton.attention:decode_attention")


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *, scale: float | None = None
) -> Tensor:
    """Attention of one new query token per sequence over its filled KV-cache prefix.

    Args:
        q: (B, Hq, D) queries of the new tokens, fp32, bf16 or fp16.
        k_cache: (B, Hkv, S_max, D) preallocated keys, same dtype; Hq must be a multiple of Hkv.
            Any strides with a unit-stride last dim (e.g. a (B, S_max, Hkv, D) buffer transposed).
        v_cache: (B, Hkv, S_max, D) preallocated values, same shape and dtype.
        cache_seqlens: (B,) integer count of filled slots per sequence (including the new token),
            in [0, S_max]. A sequence of length 0 gets a zero output.
        scale: Score scale; default ``1 / sqrt(D)``.

    Returns:
        (B, Hq, D) attention output in q's dtype (fp32 softmax and accumulation).

    Raises:
        ValueError: On mismatched shapes or dtypes, or Hq not a multiple of Hkv.
        RuntimeError: If the requested backend cannot run here (see :func:`rlhf_kernels.set_backend`).
    """
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a float (B, Hq, D) tensor; got {tuple(q.shape)} {q.dtype}")
    B, Hq, D = q.shape
    if k_cache.dim() != 4 or k_cache.shape[0] != B or k_cache.shape[3] != D or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must both be (B={B}, Hkv, S_max, D={D}); "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache/v_cache dtype {k_cache.dtype}/{v_cache.dtype} must equal q dtype {q.dtype}")
    if k_cache.shape[1] == 0 or Hq % k_cache.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({k_cache.shape[1]})")
    if cache_seqlens.shape != (B,) or cache_seqlens.is_floating_point():
        raise ValueError(f"cache_seqlens must be an integer ({B},) tensor; got {tuple(cache_seqlens.shape)}")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    impl = _backend.dispatch("decode_attention", q.device)
    return impl(q, k_cache, v_cache, cache_seqlens, scale=scale)
