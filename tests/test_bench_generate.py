"""`rlhf bench generate` runs end to end on the CPU (tiny shape) and writes a complete report;
the GPU sizes are the same code with bigger numbers (docs/performance.md)."""

from __future__ import annotations

import json


def test_bench_generate_tiny(rlhf, explain, tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = rlhf(["bench", "generate", "--shape", "tiny", "--batch", "2", "--batch", "3", "--prompt-len", "8",
                 "--new-tokens", "8", "--out", out], timeout=300)
    assert proc.returncode == 0, explain(proc)
    r = json.loads(out.read_text())
    assert r["prompt_len"] == 8 and r["new_tokens"] == 8 and r["copy_bandwidth_gbs"] > 0
    assert r["versions"]["torch"] and r["git_sha"] and "bench generate" in r["command"]
    rows = {(x["method"], x["batch"]): x for x in r["rows"]}
    engine_methods = ("fast-zero2", "fast-zero3", "fast-zero3-int8")
    assert set(rows) == {(m, b) for m in ("hf", "hf-static-compile", "fast", *engine_methods) for b in (2, 3)}
    for b in (2, 3):
        for m in ("hf", "fast", *engine_methods):
            assert rows[(m, b)]["tokens_per_s"] > 0 and rows[(m, b)]["ms_per_step"] > 0, rows[(m, b)]
        assert rows[("hf", b)]["speedup_vs_hf"] == 1.0
        assert "needs CUDA" in rows[("hf-static-compile", b)]["note"]  # said, not silently skipped
    train = {x["method"]: x for x in r["train_rows"]}
    assert set(train) == {"plain-amp", "zero2", "zero3"}
    assert all(x["ms_per_step"] > 0 and (x["batch"], x["seq_len"]) == (2, 32) for x in train.values())
    assert train["plain-amp"]["ratio_vs_plain"] == 1.0
    assert abs(train["zero2"]["ratio_vs_plain"] - train["zero2"]["ms_per_step"] / train["plain-amp"]["ms_per_step"]) < 1e-9
    bad = rlhf(["bench", "generate", "--shape", "gpt-5"], timeout=60)
    assert bad.returncode == 2 and "--shape: 'gpt-5' is not allowed" in bad.stderr
    bad = rlhf(["bench", "generate", "--train-method", "zero4"], timeout=60)
    assert bad.returncode == 2 and "--train-method: 'zero4' is not allowed" in bad.stderr


def test_bench_ppo_tiny(rlhf, explain, tmp_path) -> None:
    out = tmp_path / "ppo.json"
    proc = rlhf(["bench", "ppo", "--batch", "2", "--prompt-len", "4", "--new-tokens", "4", "--iterations", "1",
                 "--out", out], timeout=300)
    assert proc.returncode == 0, explain(proc)
    r = json.loads(out.read_text())
    assert (r["actor_shape"], r["critic_shape"], r["batch"], r["iterations"]) == ("tiny", "tiny-critic", 2, 1)
    modes = [row["mode"] for row in r["rows"]]
    assert modes == ["baseline (hf generate)", "hybrid (fast generate)"]
    for row in r["rows"]:
        assert row["samples_per_s"] > 0 and row["generate_s"] > 0 and row["train_s"] > 0, row
    assert r["rows"][0]["speedup_vs_baseline"] == 1.0
    bad = rlhf(["bench", "ppo", "--zero-stage", "5"], timeout=60)
    assert bad.returncode == 2 and "--zero-stage: 5 is not allowed" in bad.stderr
