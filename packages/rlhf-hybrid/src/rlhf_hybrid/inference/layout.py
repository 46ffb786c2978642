"""The inference layout: a causal LM's weights arranged for decoding, and its preallocated KV cache.

One family-agnostic description covers the three supported families (see :mod:`.adapters`):

    Llama-style:  RMSNorm, pre-norm, rotary positions, GQA, gated (SwiGLU) MLP
    OPT:          LayerNorm, pre- or post-norm, learned positions (offset 2), ReLU MLP, project_in/out
    GPT-2:        LayerNorm, pre-norm, learned positions, GELU-new MLP (Conv1D weights transposed)

All weights are in ``nn.functional.linear`` orientation, ``(out_features, in_features)``. Q, K and V
are fused into one ``(Hq*D + 2*Hkv*D, H)`` matrix (one matmul per layer instead of three), and the
gate and up projections of a gated MLP into one ``(2*I, H)`` matrix. Those two fused matrices are
copies made once per layout; every other tensor is the source tensor itself (no copy) when its dtype
and device already match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class LayerWeights:
    """The weights of one decoder block. H: hidden size, D: head dim, I: MLP inner size.

    Attributes:
        norm1_weight: (H,) the norm before attention (pre-norm) or after it (post-norm).
        norm1_bias: (H,) or None (RMSNorm has none).
        qkv_weight: (Hq*D + 2*Hkv*D, H) fused query, key and value projections, in that order.
        qkv_bias: (Hq*D + 2*Hkv*D,) or None.
        o_weight: (H, Hq*D) attention output projection.
        o_bias: (H,) or None.
        norm2_weight: (H,) the norm around the MLP.
        norm2_bias: (H,) or None.
        up_weight: (2*I, H) fused [gate; up] for a gated MLP, else (I, H).
        up_bias: (2*I,) / (I,) or None.
        down_weight: (H, I).
        down_bias: (H,) or None.
        attn_scale: Score scale of this layer's attention (GPT-2 may scale by 1/(layer+1) too).
    """

    norm1_weight: Tensor
    norm1_bias: Tensor | None
    qkv_weight: Tensor
    qkv_bias: Tensor | None
    o_weight: Tensor
    o_bias: Tensor | None
    norm2_weight: Tensor
    norm2_bias: Tensor | None
    up_weight: Tensor
    up_bias: Tensor | None
    down_weight: Tensor
    down_bias: Tensor | None
    attn_scale: float


@dataclass(frozen=True)
class InferenceLayout:
    """A causal LM ready for :func:`rlhf_hybrid.inference.generate`.

    Attributes:
        family: Adapter that built it: ``"llama"`` (Llama, Mistral, Qwen2), ``"opt"`` or ``"gpt2"``.
        layers: One :class:`LayerWeights` per decoder block.
        embed_tokens: (V, E) token embeddings (E = H except OPT with ``word_embed_proj_dim``).
        embed_positions: (N, H) learned position embeddings, or None for rotary models.
        position_offset: Row of ``embed_positions`` for position 0 (OPT: 2, GPT-2: 0).
        project_in: (H, E) or None: maps token embeddings to the hidden size (OPT).
        project_out: (E, H) or None: maps the final hidden state back to E (OPT).
        final_norm_weight: (H,) or None (OPT post-norm models have no final norm).
        final_norm_bias: (H,) or None.
        lm_head: (V, E) output embedding (the token embedding itself when tied).
        num_heads: Hq, query heads.
        num_kv_heads: Hkv, key/value heads (Hq % Hkv == 0; query head i reads kv head i // (Hq/Hkv)).
        head_dim: D.
        norm: ``"rms"`` or ``"layer"``.
        norm_eps: Epsilon of every norm.
        norm_before: Pre-norm (True) or post-norm (False, OPT-350m).
        act: The MLP activation (transformers' own ``ACT2FN`` module, so the math is HF's).
        gated_mlp: ``down(act(gate(x)) * up(x))`` (SwiGLU) if True, else ``down(act(up(x)))``.
        rope_theta: Rotary base for rotary models, None for learned positions.
        max_positions: Largest number of positions the model supports (learned tables), or None.
        sliding_window: Attention window of the model (Mistral), or None. Generation longer than
            this is refused, since the decode attention here is not windowed.
        tp_group: The tensor-parallel process group of a sharded layout (:func:`~.tp.shard_layout`):
            this rank holds ``num_heads`` / ``num_kv_heads`` of the heads and a slice of the MLP,
            and the attention-output and MLP-down projections are summed over the group. None: whole.
    """

    family: str
    layers: tuple[LayerWeights, ...]
    embed_tokens: Tensor
    embed_positions: Tensor | None
    position_offset: int
    project_in: Tensor | None
    project_out: Tensor | None
    final_norm_weight: Tensor | None
    final_norm_bias: Tensor | None
    lm_head: Tensor
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: str
    norm_eps: float
    norm_before: bool
    act: Callable[[Tensor], Tensor]
    gated_mlp: bool
    rope_theta: float | None
    max_positions: int | None
    sliding_window: int | None
    tp_group: object | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return self.layers[0].o_weight.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.shape[0]


@dataclass
class KVCache:
    """Preallocated keys and values of every layer, with each sequence's filled length.

    Each row's tokens are stored compacted at the front of its slots (a left-padded prompt's pad
    columns are not stored), so ``lengths[b]`` slots hold row b's keys and decode attention needs
    no padding mask.

    Attributes:
        k: (L, B, Hkv, S_max, D) keys; ``k[l]`` is the (B, Hkv, S_max, D) cache of layer l.
        v: (L, B, Hkv, S_max, D) values.
        lengths: (B,) int64 filled slots per row.
    """

    k: Tensor
    v: Tensor
    lengths: Tensor

    @classmethod
    def allocate(cls, layout: InferenceLayout, batch: int, max_len: int) -> KVCache:
        """An empty cache for ``batch`` rows of up to ``max_len`` tokens, in the layout's dtype."""
        shape = (layout.num_layers, batch, layout.num_kv_heads, max_len, layout.head_dim)
        # torch.empty: slots past a row's length are never read (decode attention masks them).
        k = torch.empty(shape, dtype=layout.dtype, device=layout.device)
        v = torch.empty(shape, dtype=layout.dtype, device=layout.device)
        return cls(k=k, v=v, lengths=torch.zeros(batch, dtype=torch.long, device=layout.device))
