"""Peak memory and time of HybridEngine.token_logprobs' path against rlhf_kernels.logprobs_from_hidden (CPU).

    OMP_NUM_THREADS=1 python benchmarks/logprobs_memory.py              # both sizes, 5 repeats
    OMP_NUM_THREADS=1 python benchmarks/logprobs_memory.py --sizes demo --repeats 3

Issue 12, item 4. ``HybridEngine.token_logprobs`` runs the whole causal LM, so the (B, L, V) logits
exist, then hands their last L - start positions to ``fused_logprobs``; ``logprobs_from_hidden``
takes the final hidden states and the LM-head weight and makes the logits ``chunk_size`` rows at
a time, so the (B, L, V) logits (and, in backward, their gradient) never exist. Two paths, on the
same seeded tiny Llama (the demo's shape: hidden 256, 2 layers, 8 heads, MLP 1024, tied
embeddings) and the same tokens:

* ``logits``: what token_logprobs does today: ``model(...).logits[:, start - 1 : -1]`` ->
  ``fused_logprobs``;
* ``hidden``: ``model.model(...).last_hidden_state[:, start - 1 : -1]`` -> ``logprobs_from_hidden``
  with ``lm_head.weight``.

Each in two modes: ``score`` (``no_grad``, log-probs only: rollout scoring) and ``train`` (log-probs
and entropy, then ``backward`` of their mean: a policy step). Each (size, mode, path) runs in a fresh
subprocess, so the peak is that run's own, measured two ways:

* ``RSS``: the process's peak RSS after its first call (``getrusage(RUSAGE_SELF).ru_maxrss``) minus
  its RSS just before it (after the model and inputs were built): what the call adds at its peak,
  everything included (allocator caching, oneDNN/MKL scratch, one-time buffers), so noisy by some
  tens of MiB;
* ``tensors``: the peak bytes of tensors alive during a second call, counted op by op by
  rlhf-kernels' benchmark harness (``rlhf_kernels.bench._PeakLiveBytes``, the CPU measure of
  ``python -m rlhf_kernels.bench``): exact and repeatable, but blind to memory outside tensors.

Time: the median of ``--repeats`` further calls in the same process. A last subprocess
per size compares the two paths' log-probs, entropies and parameter gradients bit for bit.

Writes runs/logprobs-memory.json (machine, versions, git SHA, command, rows) and prints a markdown
table. Not part of the test run; the results are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (batch, sequence length, vocabulary); the demo's micro-batch of 64 sequences of about 80 tokens,
# then Llama-3's vocabulary with a batch small enough for the CPU machine.
SIZES = {"demo": (64, 80, 320), "vocab128k": (8, 80, 128256)}
START = 1  # log-probs of tokens [1, L), as SFT and the preference stages ask for them (the most rows)
PATHS = ("logits", "hidden")
MODES = ("score", "train")


def _model(vocab: int):
    import torch
    from rlhf_hybrid import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_llama_config(vocab, hidden_size=256, num_layers=2, num_heads=8, intermediate_size=1024)
    return LlamaForCausalLM(config).float()


def _inputs(batch: int, length: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    return ids, mask


def _run_path(model, path: str, ids, mask, *, entropy: bool):
    """One call of ``path``: (B, L - START) log-probs (and entropies), as token_logprobs returns them."""
    from rlhf_hybrid import position_ids_from_mask
    from rlhf_kernels import fused_logprobs, logprobs_from_hidden

    pos = position_ids_from_mask(mask)
    targets = ids[:, START:]
    if path == "logits":  # HybridEngine.logits + token_logprobs
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        return fused_logprobs(logits[:, START - 1 : -1], targets, return_entropy=entropy)
    hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    head = model.lm_head
    return logprobs_from_hidden(hidden[:, START - 1 : -1], head.weight, targets, bias=head.bias,
                                return_entropy=entropy)


def _call(model, path: str, mode: str, ids, mask) -> None:
    import torch

    if mode == "score":
        with torch.no_grad():
            _run_path(model, path, ids, mask, entropy=False)
        return
    model.zero_grad(set_to_none=True)
    lp, ent = _run_path(model, path, ids, mask, entropy=True)
    (-lp.mean() - 0.01 * ent.mean()).backward()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_measure(size: str, mode: str, path: str, repeats: int) -> dict:
    """Runs in a fresh process: the peak extra memory of the first call, then the median time."""
    import torch

    batch, length, vocab = SIZES[size]
    model = _model(vocab)
    model.train(mode == "train")
    ids, mask = _inputs(batch, length, vocab)
    gc.collect()
    rss_before, peak_before = _rss_bytes(), _peak_rss_bytes()
    _call(model, path, mode, ids, mask)
    peak_after = _peak_rss_bytes()
    from rlhf_kernels.bench import _PeakLiveBytes

    with _PeakLiveBytes() as tracker:
        _call(model, path, mode, ids, mask)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _call(model, path, mode, ids, mask)
        times.append(time.perf_counter() - t0)
    return {"size": size, "batch": batch, "length": length, "vocab": vocab, "mode": mode, "path": path,
            "rss_before_mib": rss_before / 2**20, "peak_before_mib": peak_before / 2**20,
            "peak_after_mib": peak_after / 2**20, "peak_extra_mib": (peak_after - rss_before) / 2**20,
            "tensor_peak_mib": tracker.peak / 2**20,
            "median_s": statistics.median(times), "times_s": times, "threads": torch.get_num_threads()}


def child_compare(size: str) -> dict:
    """Both paths on the same model and tokens: are log-probs, entropies and gradients bitwise equal?"""
    import torch

    batch, length, vocab = SIZES[size]
    model = _model(vocab)
    ids, mask = _inputs(batch, length, vocab)
    out = {}
    for path in PATHS:
        model.zero_grad(set_to_none=True)
        lp, ent = _run_path(model, path, ids, mask, entropy=True)
        (-lp.mean() - 0.01 * ent.mean()).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            score = _run_path(model, path, ids, mask, entropy=False)
        out[path] = (lp.detach(), ent.detach(), grads, score)
    (lp_a, ent_a, g_a, s_a), (lp_b, ent_b, g_b, s_b) = out["logits"], out["hidden"]

    def diff(a, b) -> float:
        return float((a.double() - b.double()).abs().max())

    grad_diffs = {n: diff(g_a[n], g_b[n]) for n in g_a}
    worst = max(grad_diffs, key=grad_diffs.get)
    return {"size": size, "logprobs_equal": bool(torch.equal(lp_a, lp_b)), "logprobs_max_abs_diff": diff(lp_a, lp_b),
            "score_equal": bool(torch.equal(s_a, s_b)), "score_max_abs_diff": diff(s_a, s_b),
            "entropy_equal": bool(torch.equal(ent_a, ent_b)), "entropy_max_abs_diff": diff(ent_a, ent_b),
            "grads_equal": all(torch.equal(g_a[n], g_b[n]) for n in g_a), "grad_max_abs_diff": grad_diffs[worst],
            "grad_max_abs_diff_param": worst,
            "grads_unequal": sum(not torch.equal(g_a[n], g_b[n]) for n in g_a), "grads_total": len(g_a)}


def _environment() -> dict:
    from importlib.metadata import version

    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"git_sha": sha + ("-dirty" if dirty else ""), "command": " ".join([sys.executable, *sys.argv]),
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.platform()}",
            "load_average": os.getloadavg(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "versions": {p: version(p) for p in ("torch", "transformers", "rlhf-kernels", "rlhf-hybrid")},
            "python": platform.python_version()}


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(rows: list[dict], compares: list[dict]) -> str:
    out = ["| size (B x L x V) | mode | path | peak extra MiB: RSS | tensors | median s | "
           "hidden / logits: RSS | tensors | time |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["size"], r["mode"], r["path"]): r for r in rows}
    for (size, mode, path), r in by.items():
        base = by.get((size, mode, "logits"))
        ratio = (f"{r['peak_extra_mib'] / base['peak_extra_mib']:.2f}x | "
                 f"{r['tensor_peak_mib'] / base['tensor_peak_mib']:.2f}x | {r['median_s'] / base['median_s']:.2f}x"
                 if path == "hidden" and base else " | | ")
        out.append(f"| {size} ({r['batch']} x {r['length']} x {r['vocab']}) | {mode} | {path} | "
                   f"{r['peak_extra_mib']:.1f} | {r['tensor_peak_mib']:.1f} | {r['median_s']:.3f} | {ratio} |")
    out += ["", "| size | log-probs equal (max diff) | score-mode equal (max diff) | entropy equal (max diff) | "
                "gradients equal (unequal / all; max diff, where) |", "|---|---|---|---|---|"]
    for c in compares:
        out.append(f"| {c['size']} | {c['logprobs_equal']} ({c['logprobs_max_abs_diff']:.3g}) | "
                   f"{c['score_equal']} ({c['score_max_abs_diff']:.3g}) | "
                   f"{c['entropy_equal']} ({c['entropy_max_abs_diff']:.3g}) | {c['grads_equal']} "
                   f"({c['grads_unequal']} / {c['grads_total']}; {c['grad_max_abs_diff']:.3g}, "
                   f"{c['grad_max_abs_diff_param']}) |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {list(SIZES)}")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls after the measured first one")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "logprobs-memory.json")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # size mode path | compare size
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "compare":
            result = child_compare(args.child[1])
        else:
            size, mode, path = args.child
            result = child_measure(size, mode, path, args.repeats)
        print(json.dumps(result))
        return
    env = _environment()
    rows, compares = [], []
    for size in args.sizes.split(","):
        for mode in MODES:
            for path in PATHS:  # the baseline first, then the candidate, one after the other
                rows.append(_child(["--child", size, mode, path, "--repeats", str(args.repeats)]))
                print(json.dumps(rows[-1]), file=sys.stderr)
        compares.append(_child(["--child", "compare", size]))
        print(json.dumps(compares[-1]), file=sys.stderr)
    env["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**env, "rows": rows, "compare": compares}, indent=1))
    print(json.dumps(env, indent=1))
    print(_table(rows, compares))


if __name__ == "__main__":
    main()
