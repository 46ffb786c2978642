"""Training weights laid out so that the inference layout is a set of views of them (no copy).

The layout fuses q/k/v (and gate/up) into one matrix. Those fused matrices are views, not copies,
when their parts lie one after another in one storage (:func:`.adapters._cat`). Two ways get the
training weights there, before the first step:

* ZeRO-1/2 (and DeepSpeed's bf16 ZeRO-0 optimizer wrappers that flatten) copy all parameters into
  one flat buffer in the order of the optimizer's parameter list: :func:`order_for_fusion` puts
  each fused group's parts next to each other, in fused order, in that list;
* plain ZeRO-0 keeps every parameter as its own tensor: :func:`pack_fused_params` moves each
  group's parts into one buffer (the parameters become views of it; optimizers update them in
  place, so they stay views).

:func:`layout_sharing` measures the result: how many bytes of a layout are training storage and
how many were copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from .layout import InferenceLayout


def order_for_fusion(named: Iterable[tuple[str, nn.Parameter]], groups: Sequence[tuple[str, ...]]) -> list:
    """The parameters in their own order, except that each fused group's parts follow one another in
    fused order, where the group's first part would be."""
    named = list(named)
    by_name = dict(named)
    group_of = {n: g for g in groups for n in g if all(m in by_name for m in g)}
    out, done = [], set()
    for name, _ in named:
        if name in done:
            continue
        members = group_of.get(name, (name,))
        for m in members:
            out.append(by_name[m])
            done.add(m)
    return out


@torch.no_grad()
def pack_fused_params(model: nn.Module, groups: Sequence[tuple[str, ...]]) -> int:
    """Makes each group's parameters views of one new buffer, in fused order. Returns the bytes packed.

    Call before wrapping the model in an optimizer or DeepSpeed: the parameter objects stay the same,
    only their storage moves. Groups whose parts differ in dtype, device or trailing shape are left
    alone.
    """
    params = dict(model.named_parameters())
    packed = 0
    for group in groups:
        parts = [params[n] for n in group]
        first = parts[0]
        if any(p.dtype != first.dtype or p.device != first.device or p.shape[1:] != first.shape[1:]
               for p in parts):
            continue
        buffer = torch.cat([p.detach().reshape(p.shape[0], -1) for p in parts]).reshape(
            sum(p.shape[0] for p in parts), *first.shape[1:])
        row = 0
        for p in parts:
            p.data = buffer[row : row + p.shape[0]]
            row += p.shape[0]
        packed += buffer.numel() * buffer.element_size()
    return packed


def _storages(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def layout_sharing(layout: InferenceLayout, params: Iterable[torch.Tensor]) -> tuple[int, int]:
    """``(shared, copied)`` bytes of ``layout``'s weights: those whose storage is one of ``params``'
    storages, and the rest (copies made for the layout, or gathered ZeRO-3 weights)."""
    train = _storages(params)
    seen: set[tuple[int, int]] = set()
    shared = copied = 0
    tensors = [layout.embed_tokens, layout.embed_positions, layout.project_in, layout.project_out,
               layout.final_norm_weight, layout.final_norm_bias, layout.lm_head]
    for lw in layout.layers:
        tensors += [lw.norm1_weight, lw.norm1_bias, lw.qkv_weight, lw.qkv_bias, lw.o_weight, lw.o_bias,
                    lw.norm2_weight, lw.norm2_bias, lw.up_weight, lw.up_bias, lw.down_weight, lw.down_bias]
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), t.numel())
        if key in seen:  # a tied LM head is the embedding itself
            continue
        seen.add(key)
        nbytes = t.numel() * t.element_size()
        if t.untyped_storage().data_ptr() in train:
            shared += nbytes
        else:
            copied += nbytes
    return shared, copied


__all__ = ["layout_sharing", "order_for_fusion", "pack_fused_params"]
