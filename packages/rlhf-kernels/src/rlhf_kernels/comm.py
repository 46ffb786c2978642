"""Quantized collectives over any torch.distributed process group (gloo on CPU, NCCL on GPU).

Wang et al., "ZeRO++: Extremely Efficient Collective Communication for Giant Model Training"
(2023):
- qwZ (Sec. 3.1): weights are all-gathered as blockwise-quantized shards (int8 by default) and
  dequantized on arrival -> :func:`quantized_all_gather`.
- qgZ (Sec. 3.3): gradients are reduce-scattered by quantizing each destination's chunk (int4 by
  default), exchanging the chunks with one all-to-all and reducing the received chunks locally in
  fp32, instead of a ring reduce-scatter that would re-quantize at every hop. Optionally in two
  levels: first inside each node (intra-node group), which cuts the data by the node size, then
  across nodes (inter-node group) -> :func:`quantized_reduce_scatter`.

Each call returns the result and a :class:`CommStats` with the bytes this rank sent (codes plus
scales) and what the same exchange would send with a bf16 payload, so callers can log the saving.
Bytes are counted per algorithm, not measured on the wire: an all-gather sends this rank's
payload to each of the other ranks; an all-to-all sends one chunk to each other rank.

Quantization is :func:`rlhf_kernels.quantize_blockwise` (so it runs the Triton kernel on GPUs);
every payload is one contiguous uint8 buffer per destination: the codes, then the scales' bytes.
Each destination chunk is quantized on its own (padded to whole blocks), so no block straddles
two chunks and the error bound of each received element is half a step of its own chunk's block.

Exchanges use ``all_gather`` and ``all_to_all_single``; gloo implements both on CPU (checked
with torch 2.13). For a backend without all-to-all, ``exchange="send_recv"`` does the same
exchange with point-to-point ``isend``/``irecv`` (same bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .quant import QuantizedTensor, _check_args, dequantize_blockwise, quantize_blockwise

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

Tensor = torch.Tensor
Exchange = Literal["all_to_all", "send_recv"]

_BF16_BYTES = 2


@dataclass(frozen=True)
class CommStats:
    """What one quantized collective sent from this rank.

    Attributes:
        bytes_sent: Bytes this rank sent to other ranks: ``code_bytes + scale_bytes``.
        code_bytes: Of which quantized codes (1 byte per element for int8, 1/2 for int4,
            including the padding of each chunk's last block).
        scale_bytes: Of which per-block scales.
        bf16_bytes: Bytes the same exchange would send with the tensor in bf16.
    """

    bytes_sent: int
    code_bytes: int
    scale_bytes: int
    bf16_bytes: int

    @property
    def saving(self) -> float:
        """``bf16_bytes / bytes_sent`` (about 2 for int8 and 4 for int4, less the scales)."""
        return self.bf16_bytes / self.bytes_sent if self.bytes_sent else float("inf")

    def __add__(self, other: CommStats) -> CommStats:
        return CommStats(
            self.bytes_sent + other.bytes_sent,
            self.code_bytes + other.code_bytes,
            self.scale_bytes + other.scale_bytes,
            self.bf16_bytes + other.bf16_bytes,
        )


# --------------------------------------------------------------------------- payload codec


@dataclass(frozen=True)
class _Layout:
    """How one quantized row (a destination chunk) is laid out in its uint8 payload."""

    cols: int  # elements of the chunk
    blocks: int  # quantization blocks per chunk (the last one zero-padded)
    code_bytes: int
    scale_bytes: int

    @property
    def row_bytes(self) -> int:
        return self.code_bytes + self.scale_bytes


def _layout(cols: int, bits: int, block_size: int, scale_dtype: torch.dtype) -> _Layout:
    blocks = -(-cols // block_size)
    code_bytes = blocks * block_size * bits // 8
    return _Layout(cols, blocks, code_bytes, blocks * torch.finfo(scale_dtype).bits // 8)


def _pack_rows(x: Tensor, layout: _Layout, bits: int, block_size: int, scale_dtype: torch.dtype) -> Tensor:
    """(rows, cols) -> (rows, row_bytes) uint8: each row quantized on its own, codes then scales."""
    rows = x.shape[0]
    padded = F.pad(x, (0, layout.blocks * block_size - layout.cols))  # (rows, blocks * block_size)
    q = quantize_blockwise(padded, bits=bits, block_size=block_size, scale_dtype=scale_dtype)
    codes = q.data.view(torch.uint8).reshape(rows, layout.code_bytes)
    scales = q.scales.view(torch.uint8).reshape(rows, layout.scale_bytes)
    return torch.cat([codes, scales], dim=1)


def _unpack_rows(
    payload: Tensor, layout: _Layout, bits: int, block_size: int, scale_dtype: torch.dtype, dtype: torch.dtype
) -> Tensor:
    """(rows, row_bytes) uint8 -> (rows, cols) dequantized in ``dtype``."""
    rows = payload.shape[0]
    code_dtype = torch.int8 if bits == 8 else torch.uint8
    codes = payload[:, : layout.code_bytes].contiguous().view(code_dtype)
    codes = codes.reshape(rows * layout.blocks, block_size * bits // 8)
    scales = payload[:, layout.code_bytes :].contiguous().view(scale_dtype).reshape(-1)  # (rows * blocks,)
    numel = rows * layout.blocks * block_size
    q = QuantizedTensor(
        data=codes,
        scales=scales,
        shape=torch.Size([rows, layout.blocks * block_size]),
        dtype=dtype,
        bits=bits,
        block_size=block_size,
        numel=numel,
    )
    return dequantize_blockwise(q)[:, : layout.cols]


# --------------------------------------------------------------------------- exchanges


def _exchange(send: Tensor, group: ProcessGroup | None, how: Exchange) -> Tensor:
    """All-to-all of equal rows: row j of ``send`` goes to group rank j; row j of the result came from it."""
    recv = torch.empty_like(send)
    if how == "all_to_all":
        dist.all_to_all_single(recv, send, group=group)
        return recv
    me, world = dist.get_rank(group), dist.get_world_size(group)
    recv[me] = send[me]
    requests = []
    for step in range(1, world):  # at each step every rank sends to one peer and receives from another
        dst, src = (me + step) % world, (me - step) % world
        requests.append(dist.isend(send[dst].contiguous(), dist.get_global_rank(group or dist.group.WORLD, dst), group))
        requests.append(dist.irecv(recv[src], dist.get_global_rank(group or dist.group.WORLD, src), group))
    for request in requests:
        request.wait()
    return recv


def _check_common(x: Tensor, bits: int, block_size: int, scale_dtype: torch.dtype) -> None:
    _check_args(bits, block_size)
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"the input must be a floating-point tensor with at least one dim; got {x.dtype} {tuple(x.shape)}")
    if not isinstance(scale_dtype, torch.dtype) or not scale_dtype.is_floating_point:
        raise ValueError(f"scale_dtype must be a floating dtype; got {scale_dtype!r}")


def _stats(layout: _Layout, rows_sent: int) -> CommStats:
    return CommStats(
        bytes_sent=rows_sent * layout.row_bytes,
        code_bytes=rows_sent * layout.code_bytes,
        scale_bytes=rows_sent * layout.scale_bytes,
        bf16_bytes=rows_sent * layout.cols * _BF16_BYTES,
    )


# --------------------------------------------------------------------------- public API


def quantized_all_gather(
    shard: Tensor,
    *,
    group: ProcessGroup | None = None,
    bits: int = 8,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, CommStats]:
    """All-gathers blockwise-quantized shards and returns the dequantized full tensor (ZeRO++ qwZ).

    Every rank (this one too) gets the dequantized values of every shard, so all ranks hold the
    same full tensor. Each element is within half a quantization step of its block of the
    original shard.

    Args:
        shard: (n, ...) this rank's shard; the same shape and dtype on every rank of ``group``.
        group: Process group (default: the world).
        bits: 8 or 4.
        block_size: Elements per quantization block (positive, even).
        scale_dtype: Dtype of the per-block scales on the wire.

    Returns:
        (full, stats): full is (world * n, ...) in shard's dtype, the shards in group-rank order;
        stats counts this rank's payload once per other rank.

    Raises:
        ValueError: On invalid ``bits`` / ``block_size`` / ``scale_dtype`` or a non-float shard.
    """
    _check_common(shard, bits, block_size, scale_dtype)
    world = dist.get_world_size(group)
    layout = _layout(shard.numel(), bits, block_size, scale_dtype)
    payload = _pack_rows(shard.reshape(1, -1), layout, bits, block_size, scale_dtype)  # (1, row_bytes)
    gathered = payload.new_empty(world, layout.row_bytes)
    dist.all_gather(list(gathered.unbind(0)), payload[0], group=group)
    full = _unpack_rows(gathered, layout, bits, block_size, scale_dtype, shard.dtype)  # (world, n * ...)
    return full.reshape(world * shard.shape[0], *shard.shape[1:]), _stats(layout, world - 1)


def _reduce_level(
    rows: Tensor, group: ProcessGroup | None, bits: int, block_size: int, scale_dtype: torch.dtype, exchange: Exchange
) -> tuple[Tensor, CommStats]:
    """One all-to-all level: rows (world, k, cols) -> fp32 (k, cols), the sum over ranks of their row for me."""
    world, k, cols = rows.shape
    layout = _layout(cols, bits, block_size, scale_dtype)
    send = _pack_rows(rows.reshape(world * k, cols), layout, bits, block_size, scale_dtype)  # (world * k, bytes)
    recv = _exchange(send.view(world, k * layout.row_bytes), group, exchange)
    received = _unpack_rows(recv.view(world * k, -1), layout, bits, block_size, scale_dtype, torch.float32)
    # Reduce in fp32 whatever the input dtype: the point of qgZ's all-to-all is one rounding per level.
    return received.view(world, k, cols).sum(dim=0), _stats(layout, (world - 1) * k)


def _check_reduce_scatter(op: str, exchange: str, intra_group: ProcessGroup | None,
                          inter_group: ProcessGroup | None) -> None:
    """The ``ValueError`` checks of :func:`quantized_reduce_scatter`'s options."""
    if op not in ("sum", "avg"):
        raise ValueError(f"op must be 'sum' or 'avg'; got {op!r}")
    if exchange not in ("all_to_all", "send_recv"):
        raise ValueError(f"exchange must be 'all_to_all' or 'send_recv'; got {exchange!r}")
    if (intra_group is None) != (inter_group is None):
        raise ValueError("pass both intra_group and inter_group for the two-level schedule, or neither")


def _reduce_two_levels(
    chunks: Tensor, intra_group: ProcessGroup, inter_group: ProcessGroup, bits: int, block_size: int,
    scale_dtype: torch.dtype, exchange: Exchange,
) -> tuple[Tensor, CommStats]:
    """The two-level schedule of :func:`quantized_reduce_scatter`: chunks (world, cols) -> fp32 (1, cols),
    the sum over every rank of its chunk for me, and the stats of both levels."""
    world = chunks.shape[0]
    local, nodes = dist.get_world_size(intra_group), dist.get_world_size(inter_group)
    local_rank, node = dist.get_rank(intra_group), dist.get_rank(inter_group)
    if local * nodes != world or dist.get_rank() != node * local + local_rank:
        raise ValueError(
            f"two-level groups must tile the world as global rank = node * node_size + local rank; got "
            f"world {world}, intra size {local}, inter size {nodes}, rank {dist.get_rank()} at "
            f"(node {node}, local {local_rank})"
        )
    # Level 1, inside the node: local peer l gets chunks {n * local + l : every node n}.
    by_local = chunks.view(nodes, local, -1).transpose(0, 1)  # (local, nodes, cols)
    partial, stats1 = _reduce_level(by_local, intra_group, bits, block_size, scale_dtype, exchange)
    # Level 2, across nodes: the node partial sum of chunk n * local + my_local goes to node n.
    total, stats2 = _reduce_level(partial[:, None], inter_group, bits, block_size, scale_dtype, exchange)
    return total, stats1 + stats2


def quantized_reduce_scatter(
    tensor: Tensor,
    *,
    group: ProcessGroup | None = None,
    op: Literal["sum", "avg"] = "sum",
    bits: int = 4,
    block_size: int = 128,
    scale_dtype: torch.dtype = torch.float32,
    intra_group: ProcessGroup | None = None,
    inter_group: ProcessGroup | None = None,
    exchange: Exchange = "all_to_all",
) -> tuple[Tensor, CommStats]:
    """Reduce-scatter by quantize -> all-to-all -> local fp32 reduction (ZeRO++ qgZ).

    Rank r gets the sum (or mean) over ranks of chunk r of ``tensor``, like
    ``reduce_scatter_tensor``. Per received element the error is at most the sum, over the
    contributions reduced, of half a quantization step of each one's block (per level).

    With ``intra_group`` and ``inter_group`` (see :func:`two_level_groups`), the exchange runs in
    two levels: inside the node each rank receives the node's contributions to the chunks of all
    ranks sharing its local index and reduces them; then the node partial sums (re-quantized)
    are exchanged across nodes. Inter-node traffic shrinks by the node size.

    Args:
        tensor: (world * n, ...) the same shape and dtype on every rank.
        group: Process group of the one-level schedule (default: the world). Ignored with two levels.
        op: ``"sum"`` or ``"avg"``.
        bits: 4 or 8.
        block_size: Elements per quantization block (positive, even).
        scale_dtype: Dtype of the per-block scales on the wire.
        intra_group: This rank's intra-node group (two-level schedule).
        inter_group: This rank's inter-node group (ranks with the same local index).
        exchange: ``"all_to_all"`` (one ``all_to_all_single``) or ``"send_recv"`` (pairwise
            ``isend``/``irecv``, for backends without all-to-all).

    Returns:
        (chunk, stats): chunk is (n, ...) in tensor's dtype; stats sums both levels.

    Raises:
        ValueError: On invalid options, a dim 0 not divisible by the world size, only one of the
            two groups, or groups whose layout is not global rank = node * node_size + local.
    """
    _check_common(tensor, bits, block_size, scale_dtype)
    _check_reduce_scatter(op, exchange, intra_group, inter_group)
    two_level = intra_group is not None
    world = dist.get_world_size() if two_level else dist.get_world_size(group)
    if tensor.shape[0] % world:
        raise ValueError(f"tensor dim 0 ({tensor.shape[0]}) must be divisible by the world size ({world})")
    out_shape = (tensor.shape[0] // world, *tensor.shape[1:])
    chunks = tensor.reshape(world, -1)  # (world, cols): chunk j goes to rank j
    if not two_level:
        total, stats = _reduce_level(chunks[:, None], group, bits, block_size, scale_dtype, exchange)
    else:
        total, stats = _reduce_two_levels(chunks, intra_group, inter_group, bits, block_size, scale_dtype, exchange)
    total = total.reshape(-1)
    if op == "avg":
        total = total / world
    return total.to(tensor.dtype).reshape(out_shape), stats


def two_level_groups(ranks_per_node: int) -> tuple[ProcessGroup, ProcessGroup]:
    """Builds this rank's (intra-node, inter-node) groups for a node-major rank layout.

    Global rank r is local rank ``r % ranks_per_node`` of node ``r // ranks_per_node`` (the layout
    torchrun and the deepspeed launcher use). Every rank must call this, in the same order
    relative to its other ``new_group`` calls.

    Args:
        ranks_per_node: Ranks per node; must divide the world size.

    Returns:
        (intra_group, inter_group) of this rank.

    Raises:
        ValueError: If ``ranks_per_node`` does not divide the world size.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if ranks_per_node <= 0 or world % ranks_per_node:
        raise ValueError(f"ranks_per_node ({ranks_per_node}) must be positive and divide the world size ({world})")
    nodes = world // ranks_per_node
    intra = inter = None
    for node in range(nodes):  # every rank creates every group, as new_group requires
        g = dist.new_group([node * ranks_per_node + i for i in range(ranks_per_node)])
        if rank // ranks_per_node == node:
            intra = g
    for local in range(ranks_per_node):
        g = dist.new_group([n * ranks_per_node + local for n in range(nodes)])
        if rank % ranks_per_node == local:
            inter = g
    assert intra is not None and inter is not None
    return intra, inter
