"""The benchmark harness runs on CPU (small sizes) and records what docs/performance.md needs."""

from __future__ import annotations

import json

import torch
from rlhf_kernels import fused_logprobs
from rlhf_kernels.bench import _peak_extra_bytes, main


def test_peak_extra_bytes_counts_live_allocations_only():
    cpu = torch.device("cpu")
    assert _peak_extra_bytes(lambda: torch.empty(1000), cpu) == 4000
    # Two 4000-byte temporaries alive at once, then dropped: peak 8000, not the 12000 allocated in all.
    def two_then_one():
        a, b = torch.ones(1000), torch.ones(1000)
        del a, b
        return torch.ones(1000)

    assert _peak_extra_bytes(two_then_one, cpu) == 8000
    x = torch.ones(1000)
    assert _peak_extra_bytes(lambda: x.add_(1), cpu) == 0  # in place on an input: nothing new


def test_fused_logprobs_peak_is_a_chunk_not_the_full_log_softmax():
    logits, targets = torch.randn(64, 5000), torch.randint(0, 5000, (64,))
    cpu = torch.device("cpu")
    naive = _peak_extra_bytes(lambda: torch.log_softmax(logits, -1).gather(-1, targets[:, None]), cpu)
    fused = _peak_extra_bytes(lambda: fused_logprobs(logits, targets, chunk_size=8), cpu)
    assert naive >= 64 * 5000 * 4 and fused <= naive / 4


def test_bench_cli_writes_results_with_provenance(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--device", "cpu", "--size", "small", "--ops", "rms_norm,quantize_blockwise", "--repeat", "1",
          "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert report["copy_bandwidth_gbps"] > 0 and report["matmul_tflops"] > 0
    for key in ("torch", "triton", "python", "git_sha", "command", "rlhf_kernels"):
        assert report["environment"][key]
    rows = {(r["op"], r["impl"]): r for r in report["rows"]}
    assert {op for op, _ in rows} == {"rms_norm + residual", "quantize int8", "quantize int4"}
    ref = rows[("rms_norm + residual", "reference")]
    assert ref["ms"] > 0 and ref["fraction"] > 0 and ref["speedup_vs_reference"] == 1.0
    assert rows[("rms_norm + residual", "torch")]["ms"] > 0  # the unfused baseline, same run
    assert rows[("quantize int8", "triton")]["note"].startswith("skipped")  # no GPU: not timed
    assert "| rms_norm + residual |" in capsys.readouterr().out
