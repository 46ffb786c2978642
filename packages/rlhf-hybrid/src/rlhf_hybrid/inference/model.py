"""The forward math of an :class:`InferenceLayout`: prefill of left-padded prompts and one decode step.

Both passes share the decoder blocks (:func:`_blocks`) and differ only in attention:

* prefill runs every prompt column at once with a padding-aware causal mask (PyTorch SDPA) and
  writes each row's real tokens, compacted to the front, into the KV cache;
* a decode step runs one token per row, writes its key/value at slot ``lengths[b]`` and attends
  with ``rlhf_kernels.decode_attention`` over the filled prefix (ragged rows, GQA, no mask needed).

Norms, rotary and decode attention go through rlhf_kernels' public ops (PyTorch reference on CPU,
Triton on GPU); matmuls are ``nn.functional.linear``. Shapes: B batch, T tokens in this pass,
H hidden, Hq/Hkv query/kv heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from rlhf_kernels import apply_rotary_, decode_attention, layer_norm, rms_norm

from .layout import InferenceLayout, KVCache, LayerWeights

Tensor = torch.Tensor
# attend(layer index, layer weights, q (B, T, Hq, D), k (B, T, Hkv, D), v) -> (B, T, Hq*D)
Attend = Callable[[int, LayerWeights, Tensor, Tensor, Tensor], Tensor]


def _norm(layout: InferenceLayout, x: Tensor, weight: Tensor, bias: Tensor | None,
          residual: Tensor | None = None):
    """RMSNorm or LayerNorm of ``x`` (of ``x + residual`` with a residual: returns (y, sum))."""
    if layout.norm == "rms":
        return rms_norm(x, weight, eps=layout.norm_eps, residual=residual)
    return layer_norm(x, weight, bias, eps=layout.norm_eps, residual=residual)


def _embed(layout: InferenceLayout, tokens: Tensor, positions: Tensor) -> Tensor:
    """Token (+ learned position) embeddings: tokens, positions (B, T) -> (B, T, H)."""
    x = F.embedding(tokens, layout.embed_tokens)  # (B, T, E)
    if layout.project_in is not None:
        x = F.linear(x, layout.project_in)  # (B, T, H)
    if layout.embed_positions is not None:
        x = x + F.embedding(positions + layout.position_offset, layout.embed_positions)
    return x


def _row_parallel(layout: InferenceLayout, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``linear(x, weight, bias)`` whose input features are split over the tensor-parallel group:
    each rank's partial product is summed over the group, then the bias is added once."""
    if layout.tp_group is None:
        return F.linear(x, weight, bias)
    import torch.distributed as dist

    y = F.linear(x, weight)
    dist.all_reduce(y, group=layout.tp_group)  # collective: every rank of the group, every layer
    return y if bias is None else y + bias


def _mlp(layout: InferenceLayout, lw: LayerWeights, h: Tensor) -> Tensor:
    u = F.linear(h, lw.up_weight, lw.up_bias)  # (B, T, 2I) gated, else (B, T, I)
    if layout.gated_mlp:
        gate, up = u.chunk(2, dim=-1)
        u = layout.act(gate) * up  # (B, T, I)
    else:
        u = layout.act(u)
    return _row_parallel(layout, u, lw.down_weight, lw.down_bias)  # (B, T, H)


def _qkv(layout: InferenceLayout, lw: LayerWeights, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One fused matmul, split into q (B, T, Hq, D), k and v (B, T, Hkv, D): views, no copies."""
    qkv = F.linear(h, lw.qkv_weight, lw.qkv_bias)  # (B, T, (Hq + 2*Hkv) * D)
    q_size, kv_size = layout.num_heads * layout.head_dim, layout.num_kv_heads * layout.head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return (q.unflatten(-1, (layout.num_heads, layout.head_dim)),
            k.unflatten(-1, (layout.num_kv_heads, layout.head_dim)),
            v.unflatten(-1, (layout.num_kv_heads, layout.head_dim)))


def _blocks(layout: InferenceLayout, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor] | None,
            attend: Attend) -> Tensor:
    """All decoder blocks: x (B, T, H) -> (B, T, H), before the final norm."""
    for i, lw in enumerate(layout.layers):
        h = _norm(layout, x, lw.norm1_weight, lw.norm1_bias) if layout.norm_before else x
        q, k, v = _qkv(layout, lw, h)
        if rope is not None:
            apply_rotary_(q, k, rope[0], rope[1], positions)  # in place, on views of the qkv output
        a = _row_parallel(layout, attend(i, lw, q, k, v), lw.o_weight, lw.o_bias)  # (B, T, H)
        if layout.norm_before:
            # Fused residual add + norm: x <- x + a, h = norm2(x).
            h, x = _norm(layout, a, lw.norm2_weight, lw.norm2_bias, residual=x)
            x = x + _mlp(layout, lw, h)
        else:
            # Post-norm (OPT-350m): the normalised sum is the next residual stream.
            x, _ = _norm(layout, a, lw.norm1_weight, lw.norm1_bias, residual=x)
            x, _ = _norm(layout, _mlp(layout, lw, x), lw.norm2_weight, lw.norm2_bias, residual=x)
    return x


def _logits(layout: InferenceLayout, x: Tensor) -> Tensor:
    """Final norm, output projection and LM head of the last tokens: x (B, H) -> (B, V) float32."""
    if layout.final_norm_weight is not None:
        x = _norm(layout, x, layout.final_norm_weight, layout.final_norm_bias)
    if layout.project_out is not None:
        x = F.linear(x, layout.project_out)  # (B, E)
    # float32 like HF generate, which upcasts the last logits before its logits processors.
    return F.linear(x, layout.lm_head).float()


def prefill(layout: InferenceLayout, cache: KVCache, input_ids: Tensor, attention_mask: Tensor,
            positions: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
    """Runs the left-padded prompts, fills the cache, returns the next-token logits.

    Args:
        layout: The model.
        cache: An empty cache with S_max >= P; its ``lengths`` are set to the real prompt lengths.
        input_ids: (B, P) left-padded prompts.
        attention_mask: (B, P) 1 for real tokens, 0 for padding; the last column must be real.
        positions: (B, P) position of each column (counted over real tokens).
        rope: (cos, sin) tables from ``rlhf_kernels.rotary_cos_sin``, or None.

    Returns:
        (B, V) float32 logits at each row's last prompt token.
    """
    B, P = input_ids.shape
    real = attention_mask.bool()  # (B, P)
    # Slot order: each row's real columns first, in order (a stable sort puts pads last), so row b's
    # cache holds its n_b real tokens in slots 0..n_b-1 and decode needs no padding mask.
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # (B, P)
    causal = torch.ones(P, P, dtype=torch.bool, device=real.device).tril()  # (P, P)
    # Query i sees real keys j <= i. Pad queries see themselves too, so no row is fully masked (SDPA
    # would give NaN); their outputs are never used.
    allowed = (causal & real[:, None, :]) | torch.eye(P, dtype=torch.bool, device=real.device)  # (B, P, P)
    allowed = allowed[:, None]  # (B, 1, P, P), broadcast over heads
    gqa = layout.num_heads != layout.num_kv_heads

    def attend(i: int, lw: LayerWeights, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        idx = order[:, :, None, None].expand_as(k)  # (B, P, Hkv, D)
        cache.k[i, :, :, :P] = k.gather(1, idx).transpose(1, 2)  # (B, Hkv, P, D), real tokens first
        cache.v[i, :, :, :P] = v.gather(1, idx).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, P, D)
            attn_mask=allowed, scale=lw.attn_scale, enable_gqa=gqa,
        )  # (B, Hq, P, D)
        return out.transpose(1, 2).flatten(2)  # (B, P, Hq*D)

    x = _embed(layout, input_ids, positions)  # (B, P, H)
    x = _blocks(layout, x, positions, rope, attend)
    cache.lengths.copy_(real.sum(dim=1))
    return _logits(layout, x[:, -1])  # left padding: the last column is every row's last real token


def decode_step(layout: InferenceLayout, cache: KVCache, tokens: Tensor, positions: Tensor,
                rope: tuple[Tensor, Tensor] | None) -> Tensor:
    """Runs one new token per row and appends its keys/values to the cache.

    Capturable in a CUDA graph (:mod:`.graphs`): no host sync and no data-dependent shape (the
    cache write is an indexed store at ``lengths``, decode attention reads the lengths on the
    device), and it reads its inputs and the cache only from the given tensors, updating
    ``cache.lengths`` in place. Rows are independent: padding rows never change the others.

    Args:
        layout: The model.
        cache: The cache after prefill / previous steps; ``lengths`` is advanced by one.
        tokens: (B,) the tokens to run.
        positions: (B,) their positions.
        rope: (cos, sin) tables, or None.

    Returns:
        (B, V) float32 logits of the next token.
    """
    B = tokens.shape[0]
    rows = torch.arange(B, device=tokens.device)
    slot = cache.lengths  # (B,) each row writes at its own (compacted) length
    seqlens = slot + 1

    def attend(i: int, lw: LayerWeights, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = cache.k[i], cache.v[i]  # (B, Hkv, S_max, D)
        k_cache[rows, :, slot] = k[:, 0]  # (B, Hkv, D) into slot[b] of row b
        v_cache[rows, :, slot] = v[:, 0]
        out = decode_attention(q[:, 0].contiguous(), k_cache, v_cache, seqlens, scale=lw.attn_scale)  # (B, Hq, D)
        return out.flatten(1)[:, None]  # (B, 1, Hq*D)

    pos = positions[:, None]  # (B, 1)
    x = _embed(layout, tokens[:, None], pos)  # (B, 1, H)
    x = _blocks(layout, x, pos, rope, attend)
    cache.lengths.add_(1)
    return _logits(layout, x[:, 0])
