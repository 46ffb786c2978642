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
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .lora import has_lora, merged_state_dict, plain_model
from .models import ValueModel, last_token_index, position_ids_from_mask

log = logging.getLogger(__name__)


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
        offload_optimizer: keep optimizer state on the CPU (ZeRO-Offload; stage >= 1).
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
    """

    zero_stage: int = 0
    dtype: str = "fp32"
    lr: float = 1e-4
    weight_decay: float = 0.0
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    offload_optimizer: bool = False
    warmup_steps: int = 0
    decay_steps: int = 0
    optimizer: str = "adamw"
    generation: str = "hf"
    inference_tp_size: int = 1
    cuda_graphs: bool = True
    keep_decode_cache: bool = False
    gather_quantization: str = "none"
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
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer: {self.optimizer!r} is not allowed; allowed: 'adamw', 'sgd'")
        if self.generation not in ("hf", "fast"):
            raise ValueError(f"generation: {self.generation!r} is not allowed; allowed: 'hf', 'fast'")
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
    conf.update(cfg.extra)
    return conf


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


class HybridEngine:
    """A model wrapped for training (DeepSpeed) and for generation / scoring.

    Trainable engines own an AdamW optimizer; frozen ones (reference policy, reward model) are
    sharded too under ZeRO-3 and plain modules otherwise.

    Implements the rlhf-algos protocols: ``token_logprobs``, ``generate``, ``values``,
    ``backward``, ``step``.
    """

    def __init__(self, module: nn.Module, cfg: EngineConfig, *, trainable: bool = True,
                 total_steps: int | None = None) -> None:
        import torch.distributed as dist

        self.cfg = cfg
        self.trainable = trainable
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else (
            torch.device("cpu"))
        self.timings: dict[str, float] = {"gather_s": 0.0, "generate_s": 0.0, "train_s": 0.0}
        self.generation_used: str | None = None  # "fast" or "hf": the path the last generate() took
        self._graphs = None  # inference.DecodeGraphs of the fast path on CUDA (see _generate_fast)
        plain_model(module)  # a peft model whose adapters cannot be fused raises now, not at the first rollout
        if cfg.gather_quantization != "none" and has_lora(module):
            raise ValueError(f"gather_quantization: {cfg.gather_quantization!r} is not supported with LoRA "
                             "(the adapters are fused into exactly gathered weights); use 'none'")
        module = module.to(cfg.torch_dtype)
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
                else:
                    kwargs["optimizer"] = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                                            betas=(0.9, 0.95))
                if cfg.warmup_steps > 0 or cfg.decay_steps > 0:
                    kwargs["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(
                        opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.decay_steps))
            self.engine, *_ = ds.initialize(model=module, config=conf, **kwargs)
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
            if position_ids is None:
                raise ValueError("logits: give attention_mask, or position_ids for packed rows")
            mask = None
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
        see :meth:`logits`.
        """
        from rlhf_kernels import fused_logprobs

        logits = self.logits(input_ids, attention_mask, position_ids)[:, start - 1 : -1]  # (B, L-start, V)
        targets = input_ids[:, start:].to(logits.device)
        return fused_logprobs(logits, targets, temperature=temperature, return_entropy=return_entropy)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-position values (B, L) of a value model."""
        return self._forward(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device))

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward-model score: the value at each row's last real token. (B,).

        Differentiable (reward-model training uses it); wrap scoring-only calls in ``no_grad``.
        """
        v = self.values(input_ids, attention_mask)
        idx = last_token_index(attention_mask.to(v.device))
        return v.gather(1, idx[:, None]).squeeze(1).float()

    # -- training ----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor) -> None:
        if not self.trainable:
            raise RuntimeError("backward: this engine was built frozen (trainable=False)")
        t0 = time.perf_counter()
        self.engine.backward(loss)
        self.timings["train_s"] += time.perf_counter() - t0

    def step(self) -> None:
        t0 = time.perf_counter()
        self.engine.step()
        self.timings["train_s"] += time.perf_counter() - t0

    # -- generation --------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, return_logprobs: bool = False):
        """Generate continuations of left-padded prompts: returns (B, P + R) token ids.

        Rows that finished early are padded with ``pad_token_id`` after their EOS. Under ZeRO-3 the
        weights are gathered once (collective: every rank must call this together) into a plain
        model, so the per-token loop runs without any collective and ranks may stop at
        different lengths.

        With ``return_logprobs``, returns ``(sequences, logprobs)``: (B, R) float32 log-probs of
        the generated tokens under ``softmax(logits / temperature)`` (temperature 1 when greedy)
        of the logits the generator computed, before top-k/top-p filtering (the distribution
        ``token_logprobs`` recomputes, so any difference is a generation/training mismatch), 0
        after a row's EOS. The fast path computes them step by step; the ``hf`` path asks
        transformers for the raw logits (``output_logits``), which it keeps, (B, V) float32 per
        step, until the call returns.
        """
        if isinstance(self.module, ValueModel):
            raise TypeError("generate: this engine holds a value model, not a causal LM")
        was_training = self.module.training
        if self.cfg.generation == "fast":
            out = self._generate_fast(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                      temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                      pad_token_id=pad_token_id, return_logprobs=return_logprobs)
            if out is not None:
                self._record_peak_memory()
                self.generation_used = "fast"
                if was_training:
                    self.module.train()
                return out if return_logprobs else out[0]
        t0 = time.perf_counter()
        if self.cfg.zero_stage == 3 and self.engine is not None:
            model = _plain_copy(plain_model(self.module), self._zero3_rollout_state(), self.device)
        else:
            model = self.module
        t1 = time.perf_counter()
        model.eval()
        out = model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            return_dict_in_generate=return_logprobs,
            output_logits=return_logprobs,
        )
        if return_logprobs:
            eos = eos_token_id if eos_token_id is not None else model.generation_config.eos_token_id
            seqs = out.sequences
            out = (seqs, _hf_logprobs(out.logits, seqs[:, input_ids.shape[1]:], temperature if do_sample else 1.0, eos))
        t2 = time.perf_counter()
        self.timings["gather_s"] = t1 - t0
        self.timings["generate_s"] = t2 - t1
        self.generation_used = "hf"
        self._record_peak_memory()
        if was_training:
            self.module.train()
        return out

    def _generate_fast(self, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
                       eos_token_id, pad_token_id, return_logprobs=False):
        """Generation through ``rlhf_hybrid.inference``: ``(sequences, logprobs or None)``; None (after
        a warning naming the reason) when the model is not supported, so the caller falls back to HF
        ``generate``."""
        from . import inference
        from .inference.storage import layout_sharing

        reason = inference.supported(plain_model(self.module), max_length=input_ids.shape[1] + max_new_tokens)
        if reason is not None:
            if not getattr(self, "_warned_fast", False):
                log.warning("generation='fast' is not available for this model (%s); using transformers generate",
                            reason)
                self._warned_fast = True
            return None
        if eos_token_id is None:  # HF falls back to the model's own EOS; do the same
            eos_token_id = getattr(getattr(self.module, "generation_config", None), "eos_token_id", None)
        t0 = time.perf_counter()
        # Under ZeRO-3 the shards are gathered once (collective, one all-gather per layer) into full
        # tensors the layout uses; otherwise the layout reads the training parameters themselves.
        # LoRA adapters (if any) are fused into new weight tensors for this rollout (see .lora).
        state = None
        if self.cfg.zero_stage == 3 and self.engine is not None:
            state = self._zero3_rollout_state(fused=inference.fused_groups(self.module),
                                              quantization=self.cfg.gather_quantization)
        elif has_lora(self.module):
            state = merged_state_dict(self.module)
        layout = inference.build_layout(plain_model(self.module), state, device=self.device)
        state = None  # the layout holds what generation needs (a tensor-parallel shard keeps only its slices)
        shared, copied = layout_sharing(layout, self.module.parameters())
        self.timings["layout_shared_mib"] = shared / 2**20  # views of the training weights
        self.timings["layout_copied_mib"] = copied / 2**20  # gathered (ZeRO-3), fused copies, LoRA-fused
        group = self._tp_group()
        generator = None
        if group is not None:
            layout = inference.shard_layout(layout, group)
            ids, mask, own = _tp_gather_prompts(input_ids.to(self.device), attention_mask.to(self.device), group,
                                                pad_token_id if pad_token_id is not None else 0)
            # the group samples in lockstep: one seed for all its ranks
            seed = torch.randint(0, 2**62, (1,), dtype=torch.long).to(self.device)
            import torch.distributed as dist

            dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
            generator = torch.Generator().manual_seed(int(seed))
        else:
            ids, mask, own = input_ids.to(self.device), attention_mask.to(self.device), None
        t1 = time.perf_counter()
        # CUDA graphs of the decode step (one per batch bucket); with keep_decode_cache they survive
        # across rollouts, as under ZeRO-0/1/2 the layout's tensors are the training weights themselves.
        use_graphs = self.cfg.cuda_graphs and self.device.type == "cuda" and group is None
        if use_graphs and self._graphs is None:
            self._graphs = inference.DecodeGraphs()
        with torch.no_grad():
            out = inference.generate(layout, ids, mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                     pad_token_id=pad_token_id, generator=generator, cuda_graphs=use_graphs,
                                     graphs=self._graphs if use_graphs else None, return_logprobs=return_logprobs)
        if self._graphs is not None and not (self.cfg.keep_decode_cache and self.cfg.zero_stage < 3):
            # Back to training: the graphs, their KV cache and (ZeRO-3) the gathered weights they
            # reference are freed, so training gets the memory back; the next rollout recaptures.
            self._graphs.clear()
        seqs, logprobs = out.sequences, out.logprobs
        if own is not None:
            seqs, logprobs = _tp_own_rows(seqs, own, eos_token_id, logprobs)
        t2 = time.perf_counter()
        self.timings["gather_s"] = t1 - t0
        self.timings["generate_s"] = t2 - t1
        return seqs, logprobs

    def _zero3_rollout_state(self, *, fused=(), quantization: str = "none") -> dict[str, torch.Tensor]:
        """The whole weights for one rollout under ZeRO-3, under the plain model's names. Collective.

        Without LoRA: one all-gather per layer onto the device (``rlhf_hybrid.gather``; ``fused``
        groups adjacent, ``quantization`` on the wire), counted in ``timings``. With LoRA: the
        adapters fused while DeepSpeed gathers every parameter (peft reads its sharded adapter
        modules), as ``export_state_dict``.
        """
        if has_lora(self.module):
            return self.export_state_dict()
        from .gather import gather_full_params

        state, stats = gather_full_params(self.module, fused=fused, quantization=quantization, device=self.device)
        self.timings["gather_collectives"] = stats.collectives
        self.timings["gather_sent_mib"] = stats.bytes_sent / 2**20
        return state

    def _record_peak_memory(self) -> None:
        """``timings["peak_mem_gib"]``: the device's peak allocated memory so far (CUDA only)."""
        if self.device.type == "cuda":
            self.timings["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30

    def _tp_group(self):
        """This rank's tensor-parallel generation group (consecutive ranks), created once (collective)."""
        tp = self.cfg.inference_tp_size
        if tp == 1:
            return None
        if getattr(self, "_tp", None) is None:
            import torch.distributed as dist

            world = dist.get_world_size() if dist.is_initialized() else 1
            if world % tp:
                raise ValueError(f"inference_tp_size={tp} must divide the world size {world}")
            rank = dist.get_rank()
            for start in range(0, world, tp):  # every rank creates every group (new_group is collective)
                g = dist.new_group(list(range(start, start + tp)))
                if start <= rank < start + tp:
                    self._tp = g
        return self._tp

    # -- checkpoints -------------------------------------------------------------------------
    def save_pretrained(self, out_dir: str, tokenizer=None, is_main: bool = True) -> None:
        """Write a loadable HF checkpoint (and the value head of a value model) atomically.

        Collective under ZeRO-3 (every rank calls it); only ``is_main`` writes.
        """
        from .checkpoint import save_hf_checkpoint

        state = self.export_state_dict()
        if is_main:
            save_hf_checkpoint(plain_model(self.module), state, out_dir, tokenizer)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The full state dict as a plain HF model has it: LoRA adapters (if any) fused into the
        weights. Collective under ZeRO-3."""
        if not has_lora(self.module):
            return self.full_state_dict()
        with self.gathered():  # peft computes each delta from the adapter modules, which ZeRO-3 shards
            return {k: v.detach().to("cpu", copy=True) for k, v in merged_state_dict(self.module).items()}


def _tp_gather_prompts(ids: torch.Tensor, mask: torch.Tensor, group, pad: int):
    """The prompts of every rank of ``group`` as one left-padded batch, identical on every rank.

    Returns ``(ids, mask, own)``: (tp*B, P_max) each, and ``(row slice, prompt width P)`` of this rank.
    """
    import torch.distributed as dist

    tp, r = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.tensor([ids.shape[0], ids.shape[1]], dtype=torch.long, device=ids.device)
    all_sizes = [torch.empty_like(sizes) for _ in range(tp)]
    dist.all_gather(all_sizes, sizes, group=group)
    batches = {int(s[0]) for s in all_sizes}
    if len(batches) != 1:
        raise ValueError(f"inference_tp_size: the ranks of a generation group must bring the same number of "
                         f"prompts; got {sorted(int(s[0]) for s in all_sizes)}")
    B, P = ids.shape
    width = max(int(s[1]) for s in all_sizes)
    left = width - P  # left padding keeps every prompt's last token in the last column
    ids = torch.nn.functional.pad(ids, (left, 0), value=pad)
    mask = torch.nn.functional.pad(mask, (left, 0), value=0)
    all_ids = [torch.empty_like(ids) for _ in range(tp)]
    all_mask = [torch.empty_like(mask) for _ in range(tp)]
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    dist.all_gather(all_mask, mask.contiguous(), group=group)
    return torch.cat(all_ids), torch.cat(all_mask), (slice(r * B, (r + 1) * B), P, left)


def _tp_own_rows(seqs: torch.Tensor, own, eos_token_id, logprobs: torch.Tensor | None = None):
    """This rank's rows of a group's generation, cut to what generating them alone would give:
    its own prompt width, and no trailing columns after all its rows have finished.

    Returns ``(sequences (B, P + R), logprobs (B, R) or None)``; the group's ``logprobs``
    (tp*B, R_group) are cut the same way.
    """
    rows, P, left = own
    mine = seqs[rows, left:]  # (B, P + R_group)
    width = mine.shape[1] - P
    if eos_token_id is not None:
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=mine.device)
        hit = torch.isin(mine[:, P:], eos)  # (B, R_group)
        if bool(hit.any(dim=1).all()):  # else some row of this rank ran to the end
            width = int((hit.int().argmax(dim=1) + 1).max())  # the step at which its last row emitted EOS
    return mine[:, : P + width], None if logprobs is None else logprobs[rows, :width]


def _hf_logprobs(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, temperature: float, eos) -> torch.Tensor:
    """(B, R) float32 log-probs of the generated ``tokens`` (B, R) under ``softmax(logits / temperature)``
    from transformers' raw per-step logits (R tensors of (B, V)), 0 after each row's first EOS."""
    from rlhf_kernels import fused_logprobs

    lp = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    for t, step_logits in enumerate(logits):
        lp[:, t] = fused_logprobs(step_logits, tokens[:, t].to(step_logits.device), temperature=temperature,
                                  ignore_index=None).float().to(lp.device)
    if eos is not None:
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=tokens.device)
        is_eos = torch.isin(tokens, eos_ids).long()
        lp = lp.masked_fill(is_eos.cumsum(dim=1) - is_eos > 0, 0.0)  # after the first EOS: padding
    return lp


def _plain_copy(module: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A hook-free HF model of ``module``'s class holding ``state`` (used for ZeRO-3 generation).

    Built on the meta device and given ``state``'s tensors themselves (no random init, no second copy
    of the weights); its buffers (rotary tables, ...) are copied from ``module``, whose buffers ZeRO-3
    does not partition.
    """
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(module.config)
    dtype = next(iter(state.values())).dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(device) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    sources = dict(module.named_buffers())
    missing = [k for k in missing if k not in sources]  # persistent buffers: set below
    # only a tied output embedding may be absent from the state; anything else is a bug, not a warning
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise KeyError(f"generation copy: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    for name, _ in list(model.named_buffers()):
        if name not in sources:
            raise KeyError(f"generation copy: buffer {name!r} has no counterpart in the trained model")
        owner, _, attr = name.rpartition(".")
        target = model.get_submodule(owner) if owner else model
        persistent = attr not in target._non_persistent_buffers_set
        target.register_buffer(attr, sources[name].detach().to(device).clone(), persistent=persistent)
    model.tie_weights()
    if hasattr(module, "generation_config"):
        model.generation_config = copy.deepcopy(module.generation_config)
    return model
