"""Gathering ZeRO-3 shards for generate mode: one collective per layer, optionally quantized.

DeepSpeed ZeRO-3 keeps, on each of the W ranks of a parameter's process group, one flat partition
of every parameter (``param.ds_tensor``: elements ``[r*s, (r+1)*s)`` of the flattened tensor, the
last rank's zero-padded). Generate mode needs every weight whole, once per rollout.
:func:`gather_full_params` builds them bucket by bucket, a bucket being one decoder layer (every
parameter whose name has a first numeric component i, as ``model.layers.i.``) or the rest
(embeddings, final norm, LM head):

* each rank concatenates its partitions of the bucket's parameters into one flat shard (the same
  size on every rank), and the shards are all-gathered in ONE collective per bucket — instead of one
  per parameter (GatheredParameters) — either exactly or through rlhf-kernels'
  ``quantized_all_gather`` (ZeRO++ qwZ, Wang et al. 2023: blockwise int8 / int4 on the wire, each
  element within half a quantization step of its block);
* the whole parameters are written into one new buffer per bucket, in an order where each fused
  group of the inference layout (q/k/v, gate/up) is adjacent, so the layout's fused matrices are
  views of it (no second copy);
* the memory of a bucket's gathered shards is freed before the next bucket: the peak is the full
  weights (which generation needs) plus one layer's gathered shards, never a second full copy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .inference.storage import order_for_fusion

_LAYER = re.compile(r"\.(\d+)\.")
QUANTIZATIONS = ("none", "int8", "int4")


@dataclass(frozen=True)
class GatherStats:
    """What one gather moved.

    Attributes:
        collectives: all-gathers issued (one per bucket).
        bytes_sent: payload this rank sent to the others (codes + scales when quantized).
        bytes_unquantized: what the same gather sends in the weights' own dtype.
    """

    collectives: int
    bytes_sent: int
    bytes_unquantized: int


def layer_buckets(names: Sequence[str]) -> list[list[str]]:
    """``names`` grouped by their first numeric component (a decoder layer), in order of first
    appearance; names with none form one bucket of their own, placed where its first name is."""
    buckets: dict[object, list[str]] = {}
    for name in names:
        m = _LAYER.search(name)
        buckets.setdefault(int(m.group(1)) if m else None, []).append(name)
    return list(buckets.values())


def _bits(quantization: str) -> int:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"gather_quantization: {quantization!r} is not allowed; allowed: {', '.join(QUANTIZATIONS)}")
    return {"none": 0, "int8": 8, "int4": 4}[quantization]


@torch.no_grad()
def gather_full_params(
    module: nn.Module,
    *,
    fused: Sequence[tuple[str, ...]] = (),
    quantization: str = "none",
    block_size: int = 128,
    device: torch.device | str | None = None,
) -> tuple[dict[str, torch.Tensor], GatherStats]:
    """Every parameter of a ZeRO-3-partitioned ``module``, whole, on every rank. Collective.

    Args:
        module: The module DeepSpeed ZeRO-3 partitioned (every parameter has ``ds_tensor``).
        fused: Parameter-name groups to place adjacently, in this order (``inference.fused_groups``).
        quantization: "none" (exact), "int8" or "int4" (blockwise, on the wire only).
        block_size: Elements per quantization block.
        device: Where the whole weights go (default: where the partitions are).

    Returns:
        ``(params, stats)``: name -> whole tensor (views of one buffer per bucket), and
        :class:`GatherStats`.

    Raises:
        ValueError: A parameter is not ZeRO-3-partitioned, or a bad ``quantization``.
    """
    import torch.distributed as dist

    bits = _bits(quantization)
    named = dict(module.named_parameters())
    for name, p in named.items():
        if not hasattr(p, "ds_tensor"):
            raise ValueError(f"gather_full_params: parameter {name!r} is not ZeRO-3-partitioned (no ds_tensor)")
    names = {id(p): n for n, p in named.items()}
    out: dict[str, torch.Tensor] = {}
    collectives = sent = unquantized = 0
    for bucket in layer_buckets(list(named)):
        params = order_for_fusion(((n, named[n]) for n in bucket), fused)
        group = getattr(params[0], "ds_process_group", None)
        world = dist.get_world_size(group)
        shard = torch.cat([p.ds_tensor.detach().reshape(-1) for p in params])  # (n,) this rank's partitions
        if device is not None:
            shard = shard.to(device)
        full, bytes_sent = _all_gather_shard(shard, group, world, bits, block_size)
        sent += bytes_sent
        unquantized += shard.numel() * shard.element_size() * (world - 1)
        collectives += 1
        for p, whole in zip(params, _whole_params(full.view(world, -1), params, shard), strict=True):
            out[names[id(p)]] = whole
        del full
    return out, GatherStats(collectives, sent, unquantized)


def _all_gather_shard(shard: torch.Tensor, group, world: int, bits: int, block_size: int) -> tuple[torch.Tensor, int]:
    """Every rank's ``shard`` (n,) in one all-gather, exact (``bits=0``) or quantized on the wire.

    Returns ``(full (world * n,), bytes this rank sent)``. Collective.
    """
    import torch.distributed as dist

    if bits:
        from rlhf_kernels.comm import quantized_all_gather

        full, stats = quantized_all_gather(shard, group=group, bits=bits, block_size=block_size)
        return full, stats.bytes_sent
    full = shard.new_empty(world * shard.numel())
    dist.all_gather(list(full.view(world, -1).unbind(0)), shard, group=group)
    return full, shard.numel() * shard.element_size() * (world - 1)


def _whole_params(full: torch.Tensor, params: Sequence[nn.Parameter], shard: torch.Tensor) -> list[torch.Tensor]:
    """The whole tensors of ``params`` from a bucket's gathered partitions ``full`` (world, n) (row r:
    rank r's partitions, in ``params`` order), as views of one new buffer in ``params`` order."""
    buffer = shard.new_empty(sum(p.ds_numel for p in params))
    wholes = []
    offset = start = 0
    for p in params:
        part = p.ds_tensor.numel()
        whole = buffer[start : start + p.ds_numel]
        whole.copy_(full[:, offset : offset + part].reshape(-1)[: p.ds_numel])
        wholes.append(whole.view(p.ds_shape))
        offset += part
        start += p.ds_numel
    return wholes


__all__ = ["QUANTIZATIONS", "GatherStats", "gather_full_params", "layer_buckets"]
