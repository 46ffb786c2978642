"""Generation benchmark: HF ``generate`` vs HF static cache + ``torch.compile`` vs the fast path,
and train mode vs a plain PyTorch step.

Every method runs in the same process on the same random weights, for each batch size, with EOS
disabled so that every row generates exactly ``new_tokens`` tokens. Reported per method and batch:
tokens/s, ms per decode step, the memory-bandwidth floor of a decode step (weights + KV cache read
once, at the measured copy bandwidth), peak device memory (CUDA only) and speed-up over HF.

Methods: ``hf``, ``hf-static-compile`` (CUDA only), ``fast`` (the inference layout over the plain
model), and through a :class:`~rlhf_hybrid.HybridEngine` holding the weights as training does —
``fast-zero2`` (ZeRO-2: the layout is views of the training weights) and ``fast-zero3`` /
``fast-zero3-int8`` (ZeRO-3: the time includes gathering the shards, exactly or int8 on the wire).

Train mode (:func:`run_train`): one optimizer step (forward, backward, AdamW) of a batch through
HybridEngine under ZeRO-2 and ZeRO-3, against a plain PyTorch mixed-precision step of the same
model and batch (fp32 weights, bf16 autocast, torch AdamW), reported as ms/step and the ratio.

On CUDA the fast paths replay CUDA graphs of their decode step, captured during the warm-up run.

``rlhf bench generate`` is the command-line front; the issue's sizes (OPT-1.3B and Llama-3.2-1B
shapes, batch 8-128, prompt 256, 256 new tokens) are for a GPU; ``--shape tiny`` runs anywhere.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

SHAPES = {
    # facebook/opt-1.3b: 24 layers, hidden 2048, 32 heads, FFN 8192, vocab 50272
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                             vocab_size=50272, word_embed_proj_dim=2048, max_position_embeddings=2048)),
    # meta-llama/Llama-3.2-1B: 16 layers, hidden 2048, 32 heads / 8 KV heads, FFN 8192, vocab 128256
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                   num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                   max_position_embeddings=4096, tie_word_embeddings=True)),
    # facebook/opt-350m: 24 layers, hidden 1024, 16 heads, FFN 4096, 512-wide embeddings, post-norm
    "opt-350m": ("opt", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                             vocab_size=50272, word_embed_proj_dim=512, do_layer_norm_before=False,
                             max_position_embeddings=2048)),
    "tiny-critic": ("llama", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  intermediate_size=64, vocab_size=512, max_position_embeddings=512)),
    "tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=512, max_position_embeddings=512)),
}
METHODS = ("hf", "hf-static-compile", "fast", "fast-zero2", "fast-zero3", "fast-zero3-int8")
TRAIN_METHODS = ("plain-amp", "zero2", "zero3")


@dataclass
class Row:
    shape: str
    method: str
    batch: int
    tokens_per_s: float | None = None
    ms_per_step: float | None = None
    floor_ms_per_step: float | None = None
    peak_mem_gib: float | None = None
    speedup_vs_hf: float | None = None
    note: str = ""


@dataclass
class TrainRow:
    shape: str
    method: str
    batch: int
    seq_len: int
    ms_per_step: float | None = None
    peak_mem_gib: float | None = None
    ratio_vs_plain: float | None = None
    note: str = ""


@dataclass
class Report:
    device: str
    dtype: str
    prompt_len: int
    new_tokens: int
    copy_bandwidth_gbs: float
    versions: dict
    git_sha: str
    command: str
    rows: list[Row] = field(default_factory=list)
    train_rows: list[TrainRow] = field(default_factory=list)


def build_model(shape: str, dtype: torch.dtype, device: torch.device):
    """A randomly initialised model of ``shape`` (see :data:`SHAPES`)."""
    family, kw = SHAPES[shape]
    torch.manual_seed(0)
    if family == "opt":
        from transformers import OPTConfig, OPTForCausalLM

        model = OPTForCausalLM(OPTConfig(**kw))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**kw))
    model.generation_config.eos_token_id = None  # every row runs the full length
    return model.to(device=device, dtype=dtype).eval()


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted)."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    _sync(device)
    return 2 * nbytes * 5 / (time.perf_counter() - t0)


def decode_floor_s(model, batch: int, context: int, dtype: torch.dtype, bandwidth: float) -> float:
    """Seconds a decode step needs at least: every weight and the KV cache read once."""
    weights = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
    cfg = model.config
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * batch * kv_heads * head_dim * context * torch.finfo(dtype).bits // 8
    return (weights + kv) / bandwidth


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    fn()  # warm-up (and compilation)
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def run(shapes: list[str], batches: list[int], prompt_len: int, new_tokens: int, methods: list[str],
        device: torch.device, dtype: torch.dtype, command: str = "") -> Report:
    """Benchmark every method on every shape and batch size (see the module docstring)."""
    from . import inference

    if device.type == "cuda":
        # cuDNN attention's first call at each new shape took 16-22 s in HF generate's prefill on an
        # H100 (../shared/gpu/README.md): off for every method, so no row times that.
        torch.backends.cuda.enable_cudnn_sdp(False)
    bandwidth = copy_bandwidth(device)
    report = Report(_device_name(device), str(dtype).replace("torch.", ""), prompt_len, new_tokens, bandwidth / 1e9,
                    _versions(), _git_sha(), command)
    for shape in shapes:
        model = build_model(shape, dtype, device)
        vocab = model.config.vocab_size
        for batch in batches:
            g = torch.Generator().manual_seed(batch)
            ids = torch.randint(3, vocab, (batch, prompt_len), generator=g).to(device)
            mask = torch.ones_like(ids)
            floor = decode_floor_s(model, batch, prompt_len + new_tokens // 2, dtype, bandwidth)
            hf_s = None
            for method in methods:
                row = Row(shape, method, batch, floor_ms_per_step=floor * 1e3)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                try:
                    fn = _method(method, model, ids, mask, new_tokens, device, inference)
                except NotImplementedError as e:
                    row.note = str(e)
                    report.rows.append(row)
                    continue
                try:
                    seconds = _timed(fn, device)
                finally:
                    model.__dict__.pop("forward", None)  # undo hf-static-compile's compiled forward
                row.tokens_per_s = batch * new_tokens / seconds
                row.ms_per_step = seconds / new_tokens * 1e3
                if device.type == "cuda":
                    row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
                if method == "hf":
                    hf_s = seconds
                row.speedup_vs_hf = hf_s / seconds if hf_s else None
                report.rows.append(row)
                fn = None  # an engine method's copy of the model goes before the next method builds its own
                _free(device)
        del model
    return report


def _method(method: str, model, ids, mask, new_tokens: int, device: torch.device, inference) -> Callable[[], object]:
    if method == "hf":
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if method == "hf-static-compile":
        if device.type != "cuda":
            raise NotImplementedError("needs CUDA (torch.compile of the static-cache decode step)")
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                                      cache_implementation="static")
    if method == "fast":
        reason = inference.supported(model, max_length=ids.shape[1] + new_tokens)
        if reason:
            raise NotImplementedError(reason)
        layout = inference.build_layout(model)
        # On CUDA: one DecodeGraphs for the warm-up and the timed run, so the capture is not timed
        # (as an engine keeps one across rollouts).
        graphs = inference.DecodeGraphs() if device.type == "cuda" else None
        return lambda: inference.generate(layout, ids, mask, max_new_tokens=new_tokens, do_sample=False,
                                          eos_token_id=None, pad_token_id=0, graphs=graphs)
    if method.startswith("fast-zero"):
        engine = _engine(model, int(method[len("fast-zero")]), "int8" if method.endswith("int8") else "none")
        return lambda: engine.generate(ids, mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                                       pad_token_id=0)
    raise ValueError(f"method: {method!r} is not allowed; allowed: {', '.join(METHODS)}")


def _engine(model, stage: int, quantization: str = "none", generation: str = "fast"):
    """A trainable HybridEngine over a copy of ``model`` (weights as training holds them: ZeRO
    ``stage``, AdamW state allocated), in a world of one when no process group exists."""
    import copy

    from .distributed import init_distributed
    from .engine import EngineConfig, HybridEngine

    init_distributed()
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(next(model.parameters()).dtype, "fp32")
    cfg = EngineConfig(zero_stage=stage, dtype=dtype, generation=generation, gather_quantization=quantization,
                       micro_batch_size=1, max_grad_norm=0.0)
    engine = HybridEngine(copy.deepcopy(model), cfg)
    engine.eval()
    return engine


def run_train(report: Report, shapes: list[str], batch: int, seq_len: int, methods: list[str],
              device: torch.device, dtype: torch.dtype, steps: int = 3) -> Report:
    """Appends train-mode rows to ``report``: ms per optimizer step of ``batch`` x ``seq_len`` random
    tokens (mean of ``steps`` after one warm-up), plain PyTorch mixed precision vs HybridEngine."""
    for shape in shapes:
        vocab = SHAPES[shape][1]["vocab_size"]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (batch, seq_len), generator=g).to(device)
        mask = torch.ones_like(ids)
        plain_ms = None
        for method in methods:
            row = TrainRow(shape, method, batch, seq_len)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            if method == "plain-amp":
                step = _plain_amp_step(build_model(shape, torch.float32, device).train(), ids, mask, device)
            elif method in ("zero2", "zero3"):
                engine = _engine(build_model(shape, dtype, device), int(method[-1]), generation="hf")
                step = _engine_step(engine, ids, mask)
            else:
                raise ValueError(f"train method: {method!r} is not allowed; allowed: {', '.join(TRAIN_METHODS)}")
            step()  # warm-up: optimizer state allocated, kernels chosen
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            row.ms_per_step = (time.perf_counter() - t0) / steps * 1e3
            if device.type == "cuda":
                row.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            if method == "plain-amp":
                plain_ms = row.ms_per_step
            row.ratio_vs_plain = row.ms_per_step / plain_ms if plain_ms else None
            report.train_rows.append(row)
            step = engine = None  # noqa: F841 — free the model before the next method
            _free(device)
    return report


def _lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V), ids (B, L)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def _engine_step(engine, ids, mask) -> Callable[[], None]:
    """One HybridEngine optimizer step (forward, backward, step) on the batch."""
    engine.train()

    def step() -> None:
        engine.backward(_lm_loss(engine.logits(ids, mask), ids))
        engine.step()

    return step


def _plain_amp_step(model, ids, mask, device: torch.device) -> Callable[[], None]:
    """The baseline: fp32 weights, bf16 autocast forward, fp32 gradients, torch AdamW (fused on CUDA)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        _lm_loss(logits, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict:
    import transformers

    from . import __version__

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "rlhf-hybrid": __version__}


def _git_sha() -> str:
    """The commit of the checkout this package was imported from ("unknown" for an installed wheel)."""
    from pathlib import Path

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def to_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=2)
