"""Benchmark every rlhf-kernels op against its PyTorch reference, in the same run.

    python -m rlhf_kernels.bench                      # GPU: full sizes; CPU: small sizes
    python -m rlhf_kernels.bench --size full --out bench.json --ops fused_logprobs,decode_attention

For each op and each implementation that can run here (``torch``: the unfused PyTorch expression
a model would otherwise use, where it differs from the reference; ``reference``; ``triton`` on a
CUDA device) it records the median time, the peak extra memory (bytes allocated during the call
beyond its inputs), the achieved bandwidth as a fraction of this device's measured copy bandwidth
(``dst.copy_(src)``) or, for matmul-bound ops, the achieved FLOP rate as a fraction of its
measured matmul rate, and the speed-up over the reference. The results carry the device, the
versions, the git SHA and the command. Not part of the test run.

The bytes model of each op counts the bytes it must move at least once (inputs read, outputs
written); a fraction near 1 means the kernel is memory-bound and at the copy speed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _backend
from ._version import __version__
from .attention import decode_attention
from .logprobs import fused_logprobs, logprobs_from_hidden
from .norms import layer_norm, rms_norm
from .quant import dequantize_blockwise, quantize_blockwise
from .rotary import apply_rotary_, rotary_cos_sin
from .sampling import sample

Tensor = torch.Tensor


# --------------------------------------------------------------------------- measurement


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensors created while active and still alive (any device).

    Every tensor produced by an aten op is charged to its storage once; the storage is released
    when the last tensor seen using it is garbage collected. Tensors created before the mode
    (the inputs) are not counted, so this is the op's peak *extra* memory.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage ptr -> [tensor count, bytes]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0:
                continue
            entry = self._refs.get(key)
            if entry is None:
                inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, Tensor)]
                if key in {a.untyped_storage().data_ptr() for a in inputs}:
                    continue  # a view of (or in-place op on) a tensor from before: no new memory
                entry = self._refs[key] = [0, storage.nbytes()]
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._release, key)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, repeat: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)  # host-device sync point: the time includes the kernels, not just their launch
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    with _PeakLiveBytes() as tracker:
        out = fn()
        del out
    return tracker.peak


def copy_bandwidth(device: torch.device, nbytes: int, repeat: int) -> float:
    """Measured device copy bandwidth, bytes per second (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, repeat, warmup=2)
    return 2 * nbytes / seconds


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeat: int) -> float:
    """Measured dense matmul rate, FLOP per second."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _time(lambda: a @ b, device, repeat, warmup=2)
    return 2 * n**3 / seconds


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One op at one size: its implementations and its work model."""

    op: str
    backend_op: str  # the registered op the "reference" / "triton" calls dispatch to
    shape: str
    dtype: torch.dtype
    impls: dict[str, Callable[[], Any]]  # name -> zero-argument call ("reference"/"triton" via the backend)
    bytes_moved: int = 0  # minimum bytes read + written
    flops: int = 0  # for matmul-bound ops (fraction of the matmul rate instead of bandwidth)


@contextlib.contextmanager
def _forced(backend: str) -> Iterator[None]:
    previous = _backend._override
    _backend.set_backend(backend)
    try:
        yield
    finally:
        _backend.set_backend(previous)


def _with_backend(backend: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with _forced(backend):
            return fn()

    return call


SIZES: dict[str, dict[str, Any]] = {
    # The issue's GPU acceptance sizes.
    "full": dict(
        logprobs=(16, 512, 50272), hidden=(4, 512, 4096, 50272), norm=(16 * 512, 4096), rotary=(16, 512, 32, 128),
        attention=(64, 32, 32, 512, 64), sample=(64, 50272), quant=64 * 2**20, copy=2**30, matmul=8192,
    ),
    # Small enough for a 2-core CPU in about a minute; still the real vocabulary.
    "small": dict(
        logprobs=(2, 64, 50272), hidden=(2, 64, 256, 50272), norm=(512, 1024), rotary=(2, 64, 8, 64),
        attention=(8, 8, 8, 256, 64), sample=(8, 50272), quant=4 * 2**20, copy=2**26, matmul=512,
    ),
}  # fmt: skip


class _Inputs:
    """Random inputs of the cases, drawn in a fixed order from one CPU generator seeded 0."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.item = torch.finfo(dtype).bits // 8  # bytes per element
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen).to(device=self.device, dtype=self.dtype)

    def randint(self, high: int, shape: tuple[int, ...]) -> Tensor:
        return torch.randint(0, high, shape, generator=self.gen).to(self.device)


def build_cases(size: str, device: torch.device, dtype: torch.dtype, ops: set[str] | None) -> list[Case]:
    """Every op's cases at ``size`` (a key of :data:`SIZES`), those of ``ops`` only when given.

    The inputs of every case are drawn (in this order) whatever ``ops`` is, so a case's inputs do not
    depend on which others were asked for.
    """
    s, r = SIZES[size], _Inputs(device, dtype)
    cases = [*_logprobs_cases(s, r), *_norm_cases(s, r), *_decode_cases(s, r), *_quant_cases(s, r)]
    return [c for c in cases if ops is None or c.backend_op in ops]


def _logprobs_cases(s: dict[str, Any], r: _Inputs) -> list[Case]:
    """fused_logprobs (forward; forward + backward) and logprobs_from_hidden."""
    cases: list[Case] = []
    B, T, V = s["logprobs"]
    logits = r.randn(B, T, V)
    targets = r.randint(V, (B, T))

    def naive_logprobs() -> Tensor:
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)

    cases.append(Case("fused_logprobs", "fused_logprobs", f"B={B} T={T} V={V}", r.dtype, {
        "torch": naive_logprobs, "reference": lambda: fused_logprobs(logits, targets),
        "triton": lambda: fused_logprobs(logits, targets),
    }, bytes_moved=logits.numel() * r.item))  # fmt: skip

    logits_g = logits.detach().clone().requires_grad_()

    def naive_fwd_bwd() -> None:
        logits_g.grad = None
        torch.log_softmax(logits_g.float(), -1).gather(-1, targets[..., None]).sum().backward()

    def fused_fwd_bwd() -> None:
        logits_g.grad = None
        fused_logprobs(logits_g, targets).sum().backward()

    cases.append(Case("fused_logprobs fwd+bwd", "fused_logprobs", f"B={B} T={T} V={V}", r.dtype, {
        "torch": naive_fwd_bwd, "reference": fused_fwd_bwd, "triton": fused_fwd_bwd,
    }, bytes_moved=3 * logits.numel() * r.item))  # fmt: skip

    Bh, Th, H, Vh = s["hidden"]
    hidden, weight = r.randn(Bh, Th, H), r.randn(Vh, H)
    targets_h = r.randint(Vh, (Bh, Th))
    cases.append(Case("logprobs_from_hidden", "logprobs_from_hidden", f"N={Bh * Th} H={H} V={Vh}", r.dtype, {
        "torch": lambda: torch.log_softmax((hidden @ weight.T).float(), -1).gather(-1, targets_h[..., None]),
        "reference": lambda: logprobs_from_hidden(hidden, weight, targets_h),
        "triton": lambda: logprobs_from_hidden(hidden, weight, targets_h),
    }, flops=2 * Bh * Th * H * Vh))  # fmt: skip
    return cases


def _norm_cases(s: dict[str, Any], r: _Inputs) -> list[Case]:
    """rms_norm and layer_norm, each with a residual add."""
    cases: list[Case] = []
    N, Hn = s["norm"]
    x, res, w, b = r.randn(N, Hn), r.randn(N, Hn), r.randn(Hn), r.randn(Hn)

    def naive_rms() -> tuple[Tensor, Tensor]:
        h = x + res
        return torch.nn.functional.rms_norm(h, (Hn,), w, 1e-6), h

    def naive_ln() -> tuple[Tensor, Tensor]:
        h = x + res
        return torch.nn.functional.layer_norm(h, (Hn,), w, b, 1e-5), h

    cases.append(Case("rms_norm + residual", "rms_norm", f"rows={N} H={Hn}", r.dtype, {
        "torch": naive_rms, "reference": lambda: rms_norm(x, w, residual=res),
        "triton": lambda: rms_norm(x, w, residual=res),
    }, bytes_moved=4 * N * Hn * r.item))  # fmt: skip
    cases.append(Case("layer_norm + residual", "layer_norm", f"rows={N} H={Hn}", r.dtype, {
        "torch": naive_ln, "reference": lambda: layer_norm(x, w, b, residual=res),
        "triton": lambda: layer_norm(x, w, b, residual=res),
    }, bytes_moved=4 * N * Hn * r.item))  # fmt: skip
    return cases


def _decode_cases(s: dict[str, Any], r: _Inputs) -> list[Case]:
    """The decode-step ops: apply_rotary_, decode_attention, sample."""
    cases: list[Case] = []
    Br, Tr, Hr, Dr = s["rotary"]
    q, k = r.randn(Br, Tr, Hr, Dr), r.randn(Br, Tr, Hr, Dr)
    cos, sin = rotary_cos_sin(4096, Dr, device=r.device)
    positions = torch.arange(Tr, device=r.device).repeat(Br, 1)
    cases.append(Case("apply_rotary_ (q and k)", "apply_rotary_", f"B={Br} T={Tr} H={Hr} D={Dr}", r.dtype, {
        "reference": lambda: apply_rotary_(q, k, cos, sin, positions),
        "triton": lambda: apply_rotary_(q, k, cos, sin, positions),
    }, bytes_moved=4 * q.numel() * r.item))  # fmt: skip

    Ba, Hq, Hkv, L, Da = s["attention"]
    qa = r.randn(Ba, Hq, Da)
    kc, vc = r.randn(Ba, Hkv, L, Da), r.randn(Ba, Hkv, L, Da)
    lengths = torch.full((Ba,), L, device=r.device)
    cases.append(Case("decode_attention", "decode_attention", f"B={Ba} heads={Hq}/{Hkv} L={L} D={Da}", r.dtype, {
        "reference": lambda: decode_attention(qa, kc, vc, lengths),
        "triton": lambda: decode_attention(qa, kc, vc, lengths),
    }, bytes_moved=(2 * kc.numel() + 2 * qa.numel()) * r.item))  # fmt: skip

    Bs, Vs = s["sample"]
    logits_s = r.randn(Bs, Vs)
    cases.append(Case("sample (T=0.7, top-k 50, top-p 0.9)", "sample", f"B={Bs} V={Vs}", r.dtype, {
        "reference": lambda: sample(logits_s, temperature=0.7, top_k=50, top_p=0.9, seed=0),
        "triton": lambda: sample(logits_s, temperature=0.7, top_k=50, top_p=0.9, seed=0),
    }, bytes_moved=logits_s.numel() * r.item))  # fmt: skip
    return cases


def _quant_cases(s: dict[str, Any], r: _Inputs) -> list[Case]:
    """quantize_blockwise and dequantize_blockwise, int8 and int4."""
    cases: list[Case] = []
    numel = s["quant"]
    xq = r.randn(numel)
    for bits in (8, 4):
        q_bits = quantize_blockwise(xq, bits=bits)
        code_bytes = numel * bits // 8 + q_bits.scales.numel() * 4
        cases.append(Case(f"quantize int{bits}", "quantize_blockwise", f"numel={numel} block=128", r.dtype, {
            "reference": lambda bits=bits: quantize_blockwise(xq, bits=bits),
            "triton": lambda bits=bits: quantize_blockwise(xq, bits=bits),
        }, bytes_moved=numel * r.item + code_bytes))  # fmt: skip
        cases.append(Case(f"dequantize int{bits}", "dequantize_blockwise", f"numel={numel} block=128", r.dtype, {
            "reference": lambda q_bits=q_bits: dequantize_blockwise(q_bits),
            "triton": lambda q_bits=q_bits: dequantize_blockwise(q_bits),
        }, bytes_moved=numel * r.item + code_bytes))  # fmt: skip
    return cases


# --------------------------------------------------------------------------- running


@dataclass
class Row:
    op: str
    shape: str
    dtype: str
    impl: str
    ms: float | None
    peak_extra_mib: float | None
    achieved: str | None  # "123.4 GB/s" or "12.3 TFLOP/s"
    fraction: float | None  # of the measured copy bandwidth or matmul rate
    speedup_vs_reference: float | None
    note: str = ""


@dataclass
class Report:
    device: str
    environment: dict[str, str]
    copy_bandwidth_gbps: float
    matmul_tflops: float
    rows: list[Row] = field(default_factory=list)


def _version(dist_name: str) -> str:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if out.returncode:
        return "unknown (not in a git checkout)"
    return out.stdout.strip() + (" (dirty)" if dirty.stdout.strip() else "")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run(size: str, device: torch.device, dtype: torch.dtype, ops: set[str] | None, repeat: int) -> Report:
    s = SIZES[size]
    bandwidth = copy_bandwidth(device, s["copy"], repeat)
    flops_rate = matmul_rate(device, s["matmul"], dtype if device.type == "cuda" else torch.float32, repeat)
    report = Report(
        device=_device_name(device),
        environment={
            "rlhf_kernels": __version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "python": platform.python_version(),
            "git_sha": _git_sha(),
            "command": " ".join([sys.executable, "-m", "rlhf_kernels.bench", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "size": size,
        },
        copy_bandwidth_gbps=bandwidth / 1e9,
        matmul_tflops=flops_rate / 1e12,
    )
    for case in build_cases(size, device, dtype, ops):
        ref_ms = None
        for impl, fn in case.impls.items():
            if impl == "triton" and device.type != "cuda":
                # Under TRITON_INTERPRET the kernels would run, but the interpreter is no speed.
                report.rows.append(Row(case.op, case.shape, str(case.dtype), impl, None, None, None, None, None,
                                       "skipped: Triton kernels are timed on CUDA devices only"))  # fmt: skip
                continue
            if impl in ("reference", "triton"):
                try:
                    with _forced(impl):
                        _backend.dispatch(case.backend_op, device)
                except RuntimeError as e:
                    report.rows.append(Row(case.op, case.shape, str(case.dtype), impl, None, None, None, None, None,
                                           f"skipped: {e}"))  # fmt: skip
                    continue
                fn = _with_backend(impl, fn)
            seconds = _time(fn, device, repeat, warmup=2)
            peak = _peak_extra_bytes(fn, device)
            if case.flops:
                rate = case.flops / seconds
                achieved, fraction = f"{rate / 1e12:.3g} TFLOP/s", rate / flops_rate
            else:
                rate = case.bytes_moved / seconds
                achieved, fraction = f"{rate / 1e9:.3g} GB/s", rate / bandwidth
            ms = seconds * 1e3
            if impl == "reference":
                ref_ms = ms
            report.rows.append(Row(case.op, case.shape, str(case.dtype), impl, ms, peak / 2**20, achieved, fraction,
                                   None))  # fmt: skip
        for row in report.rows:
            if row.op == case.op and row.ms is not None and ref_ms:
                row.speedup_vs_reference = ref_ms / row.ms
    return report


def to_markdown(report: Report) -> str:
    env = report.environment
    lines = [
        f"Device: {report.device}; measured copy bandwidth {report.copy_bandwidth_gbps:.3g} GB/s, "
        f"matmul {report.matmul_tflops:.3g} TFLOP/s",
        f"rlhf_kernels {env['rlhf_kernels']}, torch {env['torch']}, triton {env['triton']}, "
        f"python {env['python']}, git {env['git_sha']}, {env['date']}",
        f"Command: {env['command']}",
        "",
        "| op | shape | dtype | impl | ms | peak extra MiB | achieved | fraction of copy BW / matmul | "
        "speed-up vs reference |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for r in report.rows:
        lines.append(
            f"| {r.op} | {r.shape} | {r.dtype.removeprefix('torch.')} | {r.impl} | {fmt(r.ms, '.3f')} | "
            f"{fmt(r.peak_extra_mib, '.1f')} | {r.achieved or ''} | {fmt(r.fraction, '.1%')} | "
            f"{fmt(r.speedup_vs_reference, '.2f')} | {r.note}".rstrip(" |") + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_kernels.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--size", default="auto", choices=["auto", "small", "full"], help="auto: full on cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                        help="auto: bfloat16 on cuda, float32 on cpu")  # fmt: skip
    parser.add_argument("--ops", default=None, help="comma-separated op names, e.g. fused_logprobs,rms_norm")
    parser.add_argument("--repeat", type=int, default=None, help="timed calls per measurement (median)")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)  # fmt: skip
    size = args.size if args.size != "auto" else ("full" if device.type == "cuda" else "small")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)  # fmt: skip
    repeat = args.repeat or (20 if device.type == "cuda" else 3)
    ops = set(args.ops.split(",")) if args.ops else None
    report = run(size, device, dtype, ops, repeat)
    print(to_markdown(report), flush=True)  # noqa: T201 (a command-line entry point)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(asdict(report), f, indent=2)


if __name__ == "__main__":
    main()
