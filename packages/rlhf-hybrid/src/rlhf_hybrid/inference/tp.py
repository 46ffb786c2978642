"""Tensor-parallel resharding of an inference layout for generation.

``shard_layout(layout, group)`` keeps, on each rank of ``group``, a contiguous block of the
attention heads (query heads and their key/value heads together, so grouped-query attention stays
local) and of the MLP's inner features (Megatron-LM's column-parallel QKV / gate-up and
row-parallel output / down projections, Shoeybi et al. 2019). The two row-parallel projections
are summed over the group (:func:`.model._row_parallel`); embeddings, norms and the LM head stay
whole on every rank. Every rank of the group must run the same batch in lockstep.
"""

from __future__ import annotations

import dataclasses

import torch

from .layout import InferenceLayout


def _rows(t: torch.Tensor | None, blocks: list[tuple[int, int]]) -> torch.Tensor | None:
    """The concatenation of row ranges [start, stop) of ``t`` (None stays None)."""
    if t is None:
        return None
    return torch.cat([t[a:b] for a, b in blocks], dim=0)


def shard_layout(layout: InferenceLayout, group) -> InferenceLayout:
    """This rank's shard of ``layout`` for the tensor-parallel process ``group``.

    Raises:
        ValueError: the heads, key/value heads or MLP features do not divide by the group size
            (the message names the numbers).
    """
    import torch.distributed as dist

    tp, r = dist.get_world_size(group), dist.get_rank(group)
    if tp == 1:
        return layout
    inner = layout.layers[0].down_weight.shape[1]
    for name, n in (("attention heads", layout.num_heads), ("key/value heads", layout.num_kv_heads),
                    ("MLP features", inner)):
        if n % tp:
            raise ValueError(f"inference_tp_size={tp}: the model's {n} {name} do not divide by {tp}")
    D = layout.head_dim
    hq, hkv, i_loc = layout.num_heads // tp, layout.num_kv_heads // tp, inner // tp
    q_total, kv_total = layout.num_heads * D, layout.num_kv_heads * D
    qkv_blocks = [(r * hq * D, (r + 1) * hq * D),  # this rank's query heads ...
                  (q_total + r * hkv * D, q_total + (r + 1) * hkv * D),  # ... their key heads ...
                  (q_total + kv_total + r * hkv * D, q_total + kv_total + (r + 1) * hkv * D)]  # ... values
    if layout.gated_mlp:  # fused [gate; up]: this rank's gate rows, then its up rows
        up_blocks = [(r * i_loc, (r + 1) * i_loc), (inner + r * i_loc, inner + (r + 1) * i_loc)]
    else:
        up_blocks = [(r * i_loc, (r + 1) * i_loc)]
    layers = []
    for lw in layout.layers:
        layers.append(dataclasses.replace(
            lw,
            qkv_weight=_rows(lw.qkv_weight, qkv_blocks),  # (hq*D + 2*hkv*D, H)
            qkv_bias=_rows(lw.qkv_bias, qkv_blocks),
            o_weight=lw.o_weight[:, r * hq * D : (r + 1) * hq * D],  # (H, hq*D), summed over the group
            up_weight=_rows(lw.up_weight, up_blocks),  # (2*i_loc, H) gated, else (i_loc, H)
            up_bias=_rows(lw.up_bias, up_blocks),
            down_weight=lw.down_weight[:, r * i_loc : (r + 1) * i_loc],  # (H, i_loc), summed over the group
        ))
    return dataclasses.replace(layout, layers=tuple(layers), num_heads=hq, num_kv_heads=hkv, tp_group=group)


__all__ = ["shard_layout"]
