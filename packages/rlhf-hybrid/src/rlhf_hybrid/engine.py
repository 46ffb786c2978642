"""The hybrid engine: one DeepSpeed-wrapped model with a training mode and a generation mode.

Train mode is a DeepSpeed engine (ZeRO 0-3, optional CPU offload of the optimizer). Generate mode
runs either transformers ``generate`` (``generation="hf"``; under ZeRO-3 on a plain copy holding the
weights gathered for the rollout) or the fast path (``generation="fast"``, :mod:`.inference`): an
inference layout that is views of the training weights under ZeRO-0/1/2 and of per-layer gathered
buffers under ZeRO-3 (:mod:`.gather`, optionally int8/int4 on the wire), a preallocated KV cache,
rlhf-kernels ops and, on CUDA, the decode step replayed from CUDA graphs; optional tensor-parallel
resharding for generation. Every phase is timed; :attr:`HybridEngine.timings` holds the last
rollout's ``gather_s``/``generate_s`` (and what was gathered / copied / shared, peak memory on CUDA)
and the cumulative ``train_s``.

This module holds the training side of :class:`HybridEngine` (DeepSpeed setup, modes, forward
passes, ``backward``/``step``, checkpoints); the generation side (``generate``, both paths, the
ZeRO-3 rollout gather and tensor-parallel generation) is :class:`~rlhf_hybrid.generation.GenerationMixin`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .generation import GenerationMixin
from .guards import NonFiniteGuard
from .lora import has_lora, merged_state_dict, plain_model
from .models import (  # noqa: F401 (ValueModel: re-export)
    ValueModel,
    enable_gradient_checkpointing,
    last_token_index,
    position_ids_from_mask,
)
from .packed import packed_positions_checked


@dataclass(frozen=True)
class EngineConfig:
    """DeepSpeed settings of one engine.

    Attributes:
        zero_stage: ZeRO stage 0-3 (3 shards parameters, gradients and optimizer state).
        dtype: ``fp32`` or ``bf16`` (``fp16`` on GPU only).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        micro_batch_size: per-rank micro-batch size of one forward/backward.
        grad_accum: micro-batches accumulated per optimizer step.
        max_grad_norm: gradient clipping (0 disables).
        offload_optimizer: keep optimizer state on the CPU (ZeRO-Offload; stage >= 1). The optimizer step
            runs there: DeepSpeedCPUAdam on CUDA machines (``optimizer="adamw"``), else the torch optimizer.
        offload_param: ZeRO-3 parameter offload: partitions in CPU memory, fetched to the device for each
            forward (stage 3 only; for frozen engines, their offload between uses).
        warmup_steps: linear learning-rate warm-up steps (0 = none).
        decay_steps: total optimizer steps of a cosine decay to 10% of ``lr`` after the warm-up
            (0 = constant learning rate after the warm-up).
        optimizer: "adamw" (betas 0.9/0.95) or "sgd" (plain, no momentum: an update proportional to
            the gradient, which invariance tests need; Adam's first step hides the gradient's scale).
        generation: "hf" (transformers ``generate``) or "fast" (``rlhf_hybrid.inference``: an
            inference layout with fused QKV and a preallocated KV cache over rlhf-kernels ops; a
            model it does not support falls back to "hf" with a warning naming the reason).
        inference_tp_size: with generation="fast", split the attention heads and MLP of the
            generation layout over this many consecutive ranks (tensor parallelism in generate mode
            only; training stays data-parallel ZeRO). The ranks of a group generate their prompts
            together and each gets its own rows back.
        cuda_graphs: with generation="fast" on a CUDA device, replay the decode step from CUDA graphs
            (one per batch-size bucket; ``rlhf_hybrid.inference.DecodeGraphs``), captured once per
            rollout and freed with the KV cache when it ends. Not used with inference_tp_size > 1.
        keep_decode_cache: under ZeRO-0/1/2, keep the fast path's KV cache and CUDA graphs allocated
            between rollouts instead: no recapture (the layout is the training weights themselves,
            whose addresses do not change), but training runs without that memory.
        gather_quantization: with generation="fast" and ZeRO-3, how the shards travel when they are
            gathered for a rollout (one all-gather per layer): "none" (exact), "int8" or "int4"
            (blockwise quantized on the wire, ZeRO++ qwZ style; the generation weights then differ
            from the trained ones by up to half a quantization step per 128-element block).
        max_nonfinite_steps: optimizer steps in a row with a non-finite loss or gradient (each one
            skipped, see :mod:`rlhf_hybrid.guards`) that stop training with ``NonFiniteError``.
        gradient_checkpointing: a trainable engine recomputes each layer's activations in the backward
            pass (:func:`rlhf_hybrid.models.enable_gradient_checkpointing`); frozen engines ignore it.
    """

    zero_stage: int = 0
    dtype: str = "fp32"
    lr: float = 1e-4
    weight_decay: float = 0.0
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    offload_optimizer: bool = False
    offload_param: bool = False
    warmup_steps: int = 0
    decay_steps: int = 0
    optimizer: str = "adamw"
    generation: str = "hf"
    inference_tp_size: int = 1
    cuda_graphs: bool = True
    keep_decode_cache: bool = False
    gather_quantization: str = "none"
    max_nonfinite_steps: int = 3
    gradient_checkpointing: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: {self.zero_stage!r} is not allowed; allowed: 0, 1, 2, 3")
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype: {self.dtype!r} is not allowed; allowed: 'fp32', 'bf16', 'fp16'")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError(
                f"micro_batch_size/grad_accum: must be >= 1, got {self.micro_batch_size}/{self.grad_accum}"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer: needs zero_stage >= 1, got zero_stage=0")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"offload_param: needs zero_stage=3 (only ZeRO-3 partitions parameters), got "
                             f"zero_stage={self.zero_stage}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer: {self.optimizer!r} is not allowed; allowed: 'adamw', 'sgd'")
        if self.generation not in ("hf", "fast"):
            raise ValueError(f"generation: {self.generation!r} is not allowed; allowed: 'hf', 'fast'")
        if not isinstance(self.max_nonfinite_steps, int) or self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps: must be an integer >= 1, got {self.max_nonfinite_steps!r}")
        if self.inference_tp_size < 1:
            raise ValueError(f"inference_tp_size: must be >= 1, got {self.inference_tp_size}")
        if self.inference_tp_size > 1 and self.generation != "fast":
            raise ValueError(f"inference_tp_size: {self.inference_tp_size} needs generation='fast', got "
                             f"generation={self.generation!r}")
        if self.gather_quantization not in ("none", "int8", "int4"):
            raise ValueError(f"gather_quantization: {self.gather_quantization!r} is not allowed; allowed: "
                             "'none', 'int8', 'int4'")
        if self.gather_quantization != "none" and (self.generation != "fast" or self.zero_stage != 3):
            raise ValueError(f"gather_quantization: {self.gather_quantization!r} needs generation='fast' and "
                             f"zero_stage=3 (only ZeRO-3 gathers weights for generation); got "
                             f"generation={self.generation!r}, zero_stage={self.zero_stage}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


def deepspeed_config(cfg: EngineConfig, world_size: int, trainable: bool = True) -> dict:
    """The DeepSpeed JSON config for ``cfg`` (see deepspeed.ai/docs/config-json)."""
    zero: dict = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        # Shard every parameter, however small: keeping small ones whole hides resharding bugs
        # on tiny models and costs nothing real at scale.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=0)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    conf = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "fp16": {"enabled": cfg.dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if trainable and cfg.max_grad_norm > 0:
        conf["gradient_clipping"] = cfg.max_grad_norm
    if trainable and cfg.offload_optimizer and not _cpu_adam(cfg):
        conf["zero_force_ds_cpu_optimizer"] = False  # our torch optimizer steps the CPU partitions (see _cpu_adam)
    conf.update(cfg.extra)
    return conf


def _cpu_adam(cfg: EngineConfig) -> bool:
    """Whether an offloaded engine's optimizer is DeepSpeedCPUAdam (CUDA machines, AdamW; JIT-compiled once);
    on CPU-only machines the torch optimizer steps the CPU partitions."""
    return cfg.offload_optimizer and cfg.optimizer == "adamw" and torch.cuda.is_available()


def lr_factor(step: int, warmup: int, decay: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to 0.1 at step ``decay``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (decay - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _import_deepspeed():
    # DeepSpeed builds an optional shared-memory all-reduce op (C++ JIT, 30-50 s on a fresh
    # machine) when its CPU backend starts. Gloo does our collectives, so we mark that op as
    # unavailable unless the user asks for it (RLHF_DS_SHM=1).
    import deepspeed

    if not torch.cuda.is_available() and os.environ.get("RLHF_DS_SHM", "0") != "1":
        with contextlib.suppress(Exception):
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


class HybridEngine(GenerationMixin):
    """A model wrapped for training (DeepSpeed) and for generation / scoring.

    Trainable engines own an AdamW optimizer; frozen ones (reference policy, reward model) are
    sharded too under ZeRO-3 and plain modules otherwise.

    Implements the rlhf-algos protocols: ``token_logprobs``, ``generate``, ``values``,
    ``backward``, ``step``.
    """

    def __init__(self, module: nn.Module, cfg: EngineConfig, *, trainable: bool = True,
                 total_steps: int | None = None, name: str = "model") -> None:
        import torch.distributed as dist

        self.cfg, self.name = cfg, name
        self.guard: NonFiniteGuard | None = None  # trainable engines: skips non-finite steps (guards.py)
        self.trainable = trainable
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
            torch.device("cpu"))
        self.timings: dict[str, float] = {"gather_s": 0.0, "generate_s": 0.0, "train_s": 0.0}
        self.generation_used: str | None = None  # "fast" or "hf": the path the last generate() took
        self.ema = None  # rlhf_hybrid.ema.ParamEMA once enable_ema() is called
        self._last_lr: float | None = None  # of the last optimizer step, for step_stats()
        self._last_grad_norm: float | None = None
        self._graphs = None  # inference.DecodeGraphs of the fast path on CUDA (see _generate_fast)
        plain_model(module)  # a peft model whose adapters cannot be fused raises now, not at the first rollout
        if cfg.gather_quantization != "none" and has_lora(module):
            raise ValueError(f"gather_quantization: {cfg.gather_quantization!r} is not supported with LoRA "
                             "(the adapters are fused into exactly gathered weights); use 'none'")
        from .zero_init import to_engine_dtype  # a model built partitioned stays so (zero_init)

        module = to_engine_dtype(module, cfg, name)
        if trainable and cfg.gradient_checkpointing:  # before DeepSpeed wraps it (ZeRO-3 hooks see the flag)
            enable_gradient_checkpointing(module)
        fused = self._share_storage(module)
        if trainable or cfg.zero_stage == 3:
            ds = _import_deepspeed()
            conf = deepspeed_config(cfg, self.world_size, trainable)
            kwargs = {}
            if trainable:
                # ZeRO-1/2 flatten the parameters in this order: fused groups adjacent (see _share_storage)
                from .inference.storage import order_for_fusion

                params = order_for_fusion(((n, p) for n, p in module.named_parameters() if p.requires_grad), fused)
                if cfg.optimizer == "sgd":
                    kwargs["optimizer"] = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
                elif _cpu_adam(cfg):  # not run here: no CUDA machine was available
                    from deepspeed.ops.adam import DeepSpeedCPUAdam

                    kwargs["optimizer"] = DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                           betas=(0.9, 0.95), adamw_mode=True)
                else:
                    kwargs["optimizer"] = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                            betas=(0.9, 0.95))
                if cfg.warmup_steps > 0 or cfg.decay_steps > 0:
                    kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
                        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.decay_steps))
            self.engine, *_ = ds.initialize(model=module, config=conf, **kwargs)
            if trainable:  # after initialize: the guard wraps the step its LR scheduler wrapped (guards.py)
                self.guard = NonFiniteGuard(kwargs["optimizer"], cfg.max_nonfinite_steps, name)
            self.module = self.engine.module
        else:
            self.engine = None
            self.module = module.to(self.device)  # keeps packed storage: already there when packed
        if not trainable:
            self.module.eval()
            for p in self.module.parameters():
                p.requires_grad_(False)

    def _share_storage(self, module: nn.Module) -> list[tuple[str, ...]]:
        """Lets the fast path's inference layout be views of the training weights (ZeRO-0/1/2).

        The layout fuses q/k/v and gate/up; the fused matrices are views when the parts are adjacent
        in one storage. Under ZeRO-0 the parts are packed into one buffer here (on the device, since
        moving a module re-allocates its parameters); ZeRO-1/2 flatten the parameters in the
        optimizer's order, which ``__init__`` arranges. Returns the fused groups (empty when nothing
        is to share: ZeRO-3, HF generation, LoRA or an unsupported model).
        """
        if self.cfg.generation != "fast" or self.cfg.zero_stage == 3:
            return []
        from .inference import fused_groups
        from .inference.storage import pack_fused_params

        module.to(self.device)
        groups = fused_groups(module)
        if self.cfg.zero_stage == 0:
            pack_fused_params(module, groups)
        return groups

    # -- modes -------------------------------------------------------------------------------
    def train(self) -> None:
        (self.engine or self.module).train()

    def eval(self) -> None:
        (self.engine or self.module).eval()

    @contextlib.contextmanager
    def gathered(self):
        """Full (unsharded) parameters inside the block; a no-op below ZeRO-3. Collective."""
        if self.cfg.zero_stage == 3 and self.engine is not None:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield
        else:
            yield

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """A full CPU copy of the weights on every rank (collective under ZeRO-3)."""
        with self.gathered():
            return {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the weights with a full state dict (collective under ZeRO-3)."""
        if self.cfg.zero_stage == 3 and self.engine is not None:
            import deepspeed

            params = dict(self.module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
                with torch.no_grad():
                    for name, p in params.items():
                        if name in state:
                            p.copy_(state[name].to(p.dtype))
        else:
            missing, unexpected = self.module.load_state_dict(state, strict=False)
            if unexpected:
                raise KeyError(f"load_full_state_dict: unexpected keys {unexpected[:5]}")

    # -- forward passes ----------------------------------------------------------------------
    def _forward(self, **kw):
        return (self.engine or self.module)(**kw)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Causal-LM logits (B, L, V).

        With ``attention_mask`` (B, L), positions are counted over real tokens. Packed rows (several
        samples per row, see ``rlhf_data.pack_sft``) pass ``attention_mask=None`` and their
        ``position_ids`` (B, L), which restart at 0 for each sample; transformers then keeps
        attention inside each sample.
        """
        if attention_mask is None:
            position_ids, mask = packed_positions_checked(self.module, position_ids), None
        else:
            mask = attention_mask.to(self.device)
            if position_ids is None:
                position_ids = position_ids_from_mask(attention_mask)
        out = self._forward(input_ids=input_ids.to(self.device), attention_mask=mask,
                            position_ids=position_ids.to(self.device), use_cache=False)
        return out.logits

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, start: int = 1, *,
                       temperature: float = 1.0, return_entropy: bool = False,
                       position_ids: torch.Tensor | None = None):
        """Log-probs of tokens ``input_ids[:, start:]`` given their prefixes: (B, L - start).

        Uses rlhf-kernels' fused log-prob (no full fp32 log-softmax is materialised). Packed rows:
        see :meth:`logits`. The (B, L, V) logits themselves do exist; ``logprobs_from_hidden`` would
        avoid them but was measured not to pay at the demo's size and to change the LM-head
        gradient's rounding (docs/performance.md, "Token log-probs").
        """
        from rlhf_kernels import fused_logprobs

        logits = self.logits(input_ids, attention_mask, position_ids)[:, start - 1 : -1]  # (B, L-start, V)
        targets = input_ids[:, start:].to(logits.device)
        return fused_logprobs(logits, targets, temperature=temperature, return_entropy=return_entropy)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position values (B, L) of a value model. Packed rows: see :meth:`logits`."""
        if attention_mask is None:
            return self._forward(input_ids=input_ids.to(self.device), attention_mask=None,
                                 position_ids=packed_positions_checked(self.module, position_ids).to(self.device))
        return self._forward(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
              position_ids: torch.Tensor | None = None, last_index: torch.Tensor | None = None) -> torch.Tensor:
        """Reward-model score: the value at each sequence's last token. (B,), or (N,) for packed rows.

        Padded rows: ``attention_mask`` (B, L), one sequence per row, scored at its last real token.
        Packed rows (``rlhf_data.collate_pairs_padding_free``): ``attention_mask=None``, ``position_ids``
        (R, L) restarting at 0 per sequence and ``last_index`` (N, 2), the ``(row, column)`` of each of
        the N sequences' last token. Differentiable (reward-model training uses it); wrap scoring-only
        calls in ``no_grad``.
        """
        v = self.values(input_ids, attention_mask, position_ids)
        if attention_mask is None:
            if last_index is None:
                raise ValueError("score: packed rows (attention_mask=None) need last_index")
            last_index = last_index.to(v.device)
            return v[last_index[:, 0], last_index[:, 1]].float()
        idx = last_token_index(attention_mask.to(v.device))
        return v.gather(1, idx[:, None]).squeeze(1).float()

    # -- training ----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        if not self.trainable:
            raise RuntimeError("backward: this engine was built frozen (trainable=False)")
        t0 = time.perf_counter()
        self.guard.record_loss(loss)
        self.engine.backward(loss)  # always, even for a non-finite loss: DeepSpeed's collectives run in it
        self.timings["train_s"] += time.perf_counter() - t0

    def step(self) -> None:
        """One micro-step; at an accumulation boundary the optimizer step, unless a loss or gradient of
        the window was non-finite (then nothing changes and the guard counts it; ``NonFiniteError``
        after ``cfg.max_nonfinite_steps`` in a row)."""
        t0 = time.perf_counter()
        boundary = self.engine.is_gradient_accumulation_boundary()  # before step(), which advances it
        skipped_before = self.engine.skipped_steps
        if boundary:  # this call steps the optimizer
            self._record_step_stats()
        self.engine.step()
        self.timings["train_s"] += time.perf_counter() - t0
        applied = self.guard.after_step(boundary, engine_skipped=self.engine.skipped_steps > skipped_before)
        if applied and self.ema is not None:  # a skipped (non-finite) step changes no weight, so no average either
            self.ema.update()

    @property
    def nonfinite_skipped(self) -> int:
        """Optimizer steps skipped so far for a non-finite loss or gradient (0 for a frozen engine)."""
        return self.guard.skipped if self.guard is not None else 0

    def enable_ema(self, beta: float) -> None:
        """Keep an exponential moving average of the weights, updated after every optimizer step
        (:class:`~rlhf_hybrid.ema.ParamEMA`; ``with engine.ema.swapped():`` evaluates or saves it)."""
        from .ema import ParamEMA

        if not self.trainable:
            raise RuntimeError("enable_ema: this engine was built frozen (trainable=False)")
        self.ema = ParamEMA(self.module, beta)

    def _record_step_stats(self) -> None:
        """Read (never modify) the learning rate and, where DeepSpeed will not keep it, the gradient norm of
        the optimizer step about to be taken.

        ZeRO-1/2/3 and the bf16/fp16 optimizers keep the pre-clipping global norm (``get_global_grad_norm``
        after the step); ZeRO-0 in fp32 clips with ``torch.nn.utils.clip_grad_norm_`` and drops it, so it is
        computed here from the (already all-reduced) gradients: extra reads, same training numbers.
        """
        self._last_lr = float(self.engine.get_lr()[0])
        self._last_grad_norm = None
        if self.cfg.zero_stage == 0 and not hasattr(self.engine.optimizer, "_global_grad_norm"):
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if grads:
                self._last_grad_norm = float(torch.nn.utils.get_total_norm(grads))  # a host-device sync

    def step_stats(self) -> dict[str, float]:
        """``lr`` and ``grad_norm`` (global L2 norm before clipping) of the last optimizer step, for logging.

        Read-only; empty before the first step and for a frozen engine; ``grad_norm`` absent where it is not
        known (ZeRO-1/2 with DeepSpeed's norm computation switched off).
        """
        if self.engine is None or not self.trainable or self._last_lr is None:
            return {}
        norm = self.engine.get_global_grad_norm()
        norm = self._last_grad_norm if norm is None else norm
        return {"lr": self._last_lr, **({"grad_norm": float(norm)} if norm is not None else {})}

    # -- checkpoints -------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str, tokenizer=None, is_main: bool = True) -> None:
        """Write a loadable HF checkpoint (and the value head of a value model) atomically.

        Collective under ZeRO-3 (every rank calls it); only ``is_main`` writes.
        """
        from .checkpoint import save_hf_checkpoint

        state = self.export_state_dict()
        if is_main:
            save_hf_checkpoint(plain_model(self.module), state, out_dir, tokenizer)

    def save_training_state(self, directory: str) -> None:
        """Everything training needs to continue exactly: the weights (this rank's shards under ZeRO-3),
        the optimizer and LR-scheduler state and DeepSpeed's step counters, into ``directory``
        (DeepSpeed's own checkpoint format, one tag ``state``). Collective: every rank calls it, each
        writing its own files; the caller makes the directory atomic (``rlhf_cli.resume``)."""
        if not self.trainable:
            raise RuntimeError("save_training_state: this engine was built frozen (trainable=False)")
        self.engine.save_checkpoint(directory, tag="state", save_latest=False)

    def load_training_state(self, directory: str) -> None:
        """Restore what :meth:`save_training_state` wrote (same world size and ZeRO stage). Collective."""
        if not self.trainable:
            raise RuntimeError("load_training_state: this engine was built frozen (trainable=False)")
        path, _ = self.engine.load_checkpoint(directory, tag="state", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no training state under {directory} (tag 'state')")

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict as a plain HF model has it: LoRA adapters (if any) fused into the
        weights. Collective under ZeRO-3."""
        if not has_lora(self.module):
            return self.full_state_dict()
        with self.gathered():  # peft computes each delta from the adapter modules, which ZeRO-3 shards
            return {k: v.detach().to("cpu", copy=True) for k, v in merged_state_dict(self.module).items()}

