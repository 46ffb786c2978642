"""Quantized all-gather / reduce-scatter in a 4-process gloo group on CPU: results against the
full-precision collectives within error bounds recomputed here from every rank's input, and the
bytes reported against counts worked out by hand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rlhf_kernels import CommStats, quantized_all_gather, quantized_reduce_scatter, two_level_groups

WORLD = 4
QMAX = {8: 127, 4: 7}
BLOCK = 64
SLACK = 1 + 2**-7  # the stored scale may round up (bf16 scales: by up to 2^-8 relative) + fp noise


def rank_input(rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Every rank's input, reproducible anywhere: mixed magnitudes so block scales differ."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(shape, generator=gen) * 10 ** torch.randint(-2, 2, shape, generator=gen)


def half_steps(chunk: torch.Tensor, bits: int) -> torch.Tensor:
    """Per element: half the quantization step of its block, chunk quantized on its own."""
    flat = chunk.reshape(-1).double()
    blocks = -(-flat.numel() // BLOCK)
    padded = torch.nn.functional.pad(flat.abs(), (0, blocks * BLOCK - flat.numel())).view(blocks, BLOCK)
    step = padded.amax(dim=1) / QMAX[bits]
    return (step.repeat_interleave(BLOCK)[: flat.numel()] / 2 * SLACK).view(chunk.shape)


def check_all_gather(rank: int) -> None:
    shape = (6, 50)  # 300 elements: 4 full blocks and a padded one
    for bits in (8, 4):
        for scale_dtype in (torch.float32, torch.bfloat16):
            shard = rank_input(rank, shape)
            full, stats = quantized_all_gather(shard, bits=bits, block_size=BLOCK, scale_dtype=scale_dtype)
            exact = torch.empty(WORLD * shape[0], shape[1])
            dist.all_gather(list(exact.chunk(WORLD)), shard)  # the full-precision collective
            bound = torch.cat([half_steps(rank_input(r, shape), bits) for r in range(WORLD)])
            assert full.shape == exact.shape and full.dtype == shard.dtype
            assert bool(((full.double() - exact.double()).abs() <= bound).all()), (bits, scale_dtype)
            # Everyone holds the same tensor, this rank's own shard included (dequantized too).
            others = [torch.empty_like(full) for _ in range(WORLD)]
            dist.all_gather(others, full)
            assert all(torch.equal(o, full) for o in others)
            # Bytes by hand: 5 blocks of 64 -> 320 codes (int8: 320 B, int4: 160 B) + 5 scales,
            # sent to each of the 3 other ranks; bf16 would send 300 * 2 B to each.
            scale_bytes = 5 * (4 if scale_dtype == torch.float32 else 2)
            code_bytes = 320 * bits // 8
            assert stats == CommStats(3 * (code_bytes + scale_bytes), 3 * code_bytes, 3 * scale_bytes, 3 * 600)


def check_all_gather_bytes_ratio(rank: int) -> None:
    # Block-aligned shards: codes are exactly 2x (int8) / 4x (int4) smaller than bf16; the scales
    # (one fp32 per 64 elements) cost 1/16 B per element on top.
    shard = rank_input(rank, (8, 64))
    for bits, ratio in ((8, 2), (4, 4)):
        _, stats = quantized_all_gather(shard, bits=bits, block_size=BLOCK)
        assert stats.bf16_bytes == ratio * stats.code_bytes
        assert stats.scale_bytes == 3 * 8 * 4
        assert stats.saving == pytest.approx(2 / (bits / 8 + 4 / 64))  # 1.88x and 3.56x with the scales


def check_reduce_scatter(rank: int, two_level_groups_: tuple) -> None:
    shape = (WORLD * 3, 70)  # each rank's chunk: 3 x 70 = 210 elements, 4 blocks (last one padded)
    inputs = [rank_input(r, shape).to(torch.bfloat16) for r in range(WORLD)]
    mine = inputs[rank]
    chunks = [x.float().view(WORLD, 3, 70) for x in inputs]  # chunk j of rank r: chunks[r][j]
    exact = torch.empty(3, 70)
    dist.reduce_scatter_tensor(exact, mine.float())  # the full-precision collective (fp32 sum)
    for bits in (4, 8):
        bound1 = sum(half_steps(chunks[r][rank], bits) for r in range(WORLD))
        for exchange in ("all_to_all", "send_recv"):
            out, stats = quantized_reduce_scatter(mine, bits=bits, block_size=BLOCK, exchange=exchange)
            assert out.shape == (3, 70) and out.dtype == torch.bfloat16
            # + half a bf16 ulp for rounding the fp32 sum to the output dtype.
            tol = bound1 + exact.abs().double() * 2**-8
            assert bool(((out.double() - exact.double()).abs() <= tol).all()), (bits, exchange)
            if exchange == "all_to_all":
                reference_out = out
            else:  # the same payloads through isend/irecv: the same result, bit for bit
                assert torch.equal(out, reference_out)
            code_bytes = 256 * bits // 8  # 4 blocks of 64
            assert stats == CommStats(3 * (code_bytes + 16), 3 * code_bytes, 3 * 16, 3 * 210 * 2)
        avg, _ = quantized_reduce_scatter(mine, op="avg", bits=bits, block_size=BLOCK)
        assert bool(((avg.double() - exact.double() / WORLD).abs() <= tol / WORLD + 1e-6).all())

        # Two levels: 2 "nodes" x 2 ranks. Level 1 reduces each node's 2 contributions; level 2
        # re-quantizes the node partial sums, whose scales follow from their absmax (plus level-1 error).
        intra, inter = two_level_groups_
        out2, stats2 = quantized_reduce_scatter(
            mine, bits=bits, block_size=BLOCK, intra_group=intra, inter_group=inter
        )
        bound = torch.zeros(3, 70, dtype=torch.float64)
        for node in range(2):
            members = [2 * node, 2 * node + 1]
            err1 = sum(half_steps(chunks[r][rank], bits) for r in members)
            partial = sum(chunks[r][rank].double() for r in members)
            bound += err1 + half_steps(partial.abs() + err1.amax(), bits)
        tol2 = bound + exact.abs().double() * 2**-8
        assert bool(((out2.double() - exact.double()).abs() <= tol2).all()), ("two-level", bits)
        # Level 1 sends 2 chunks to the 1 local peer; level 2 one chunk to the 1 other node.
        code_bytes = 256 * bits // 8
        assert stats2 == CommStats(3 * (code_bytes + 16), 3 * code_bytes, 3 * 16, 3 * 210 * 2)


def check_errors(rank: int) -> None:
    with pytest.raises(ValueError, match="divisible by the world size"):
        quantized_reduce_scatter(torch.randn(6, 2))
    with pytest.raises(ValueError, match="both intra_group and inter_group"):
        quantized_reduce_scatter(torch.randn(8, 2), intra_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="op must be"):
        quantized_reduce_scatter(torch.randn(8, 2), op="max")


def worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        groups = two_level_groups(2)
        check_all_gather(rank)
        check_all_gather_bytes_ratio(rank)
        check_reduce_scatter(rank, groups)
        check_errors(rank)
        open(os.path.join(result_dir, f"ok{rank}"), "w").close()
    except BaseException:
        with open(os.path.join(result_dir, f"error{rank}"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_quantized_collectives_four_gloo_ranks(tmp_path):
    # This file runs as a script (see the bottom), so that the spawned ranks can import `worker`
    # from __main__ whatever import mode pytest used for the test module.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error*")))
    assert result.returncode == 0, errors or result.stderr[-5000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ok{r}" for r in range(WORLD)]


def test_stats_saving_and_sum():
    a = CommStats(bytes_sent=100, code_bytes=80, scale_bytes=20, bf16_bytes=400)
    assert a.saving == 4.0
    assert a + a == CommStats(200, 160, 40, 800)


if __name__ == "__main__":
    mp.spawn(worker, args=(free_port(), sys.argv[1]), nprocs=WORLD, join=True)
