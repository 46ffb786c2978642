"""The generation side of :class:`~rlhf_hybrid.engine.HybridEngine`: ``generate`` and what it needs.

:class:`GenerationMixin` holds the two generation paths, chosen per call by ``EngineConfig.generation``:

* ``"hf"``: transformers ``generate`` on the module itself, or under ZeRO-3 on a hook-free copy
  (:func:`_plain_copy`) holding the weights gathered for the rollout;
* ``"fast"``: :mod:`rlhf_hybrid.inference`, an inference layout (views of the training weights under
  ZeRO-0/1/2, per-layer gathered buffers under ZeRO-3), a preallocated KV cache, rlhf-kernels ops,
  CUDA graphs on CUDA and optional tensor-parallel resharding (:func:`_tp_gather_prompts`,
  :func:`_tp_own_rows`).

Under ZeRO-3 both paths take the weights from :meth:`GenerationMixin._zero3_rollout_state`:
:func:`rlhf_hybrid.gather.gather_full_params` (one collective per layer), or with LoRA DeepSpeed's
``GatheredParameters``; docs/architecture.md ("Two ZeRO-3 gather paths") says why there are two.
The training side (DeepSpeed engine, forward passes, ``backward``/``step``, checkpoints) is in
:mod:`rlhf_hybrid.engine`.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import torch
from torch import nn

from .lora import has_lora, merged_state_dict, plain_model
from .models import ValueModel

log = logging.getLogger(__name__)


class GenerationMixin:
    """``generate`` for :class:`~rlhf_hybrid.engine.HybridEngine`, which sets the attributes below
    in its ``__init__`` and provides ``export_state_dict``."""

    cfg: Any  # EngineConfig
    engine: Any  # the DeepSpeed engine, or None
    module: nn.Module
    device: torch.device
    timings: dict[str, float]
    generation_used: str | None
    _graphs: Any  # inference.DecodeGraphs or None

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
        out = self._generate_hf(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                pad_token_id=pad_token_id, return_logprobs=return_logprobs)
        if was_training:
            self.module.train()
        return out

    def _generate_hf(self, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
                     eos_token_id, pad_token_id, return_logprobs):
        """Generation through transformers ``generate``: what :meth:`generate` returns. Under ZeRO-3
        on a plain copy holding the gathered weights (collective)."""
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
            out = (seqs, generated_logprobs(out.logits, seqs[:, input_ids.shape[1]:], temperature if do_sample else 1.0,
                                            eos))
        t2 = time.perf_counter()
        self.timings["gather_s"] = t1 - t0
        self.timings["generate_s"] = t2 - t1
        self.generation_used = "hf"
        self._record_peak_memory()
        return out

    def _generate_fast(self, input_ids, attention_mask, *, max_new_tokens, do_sample, temperature, top_k, top_p,
                       eos_token_id, pad_token_id, return_logprobs=False):
        """Generation through ``rlhf_hybrid.inference``: ``(sequences, logprobs or None)``; None (after
        a warning naming the reason) when the model is not supported, so the caller falls back to HF
        ``generate``."""
        from . import inference

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
        layout = self._rollout_layout()
        group = self._tp_group()
        generator = None
        if group is not None:
            layout = inference.shard_layout(layout, group)
            ids, mask, own, generator = self._tp_prompts(input_ids, attention_mask, group, pad_token_id)
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

    def any_rank_active(self, active: bool) -> bool:
        """Multi-turn rollouts on the re-prefill path (``rlhf_algos.trajectories.RePrefillSession``): is a
        trajectory still active on this rank (``active``) or any other? Under ZeRO-3 every ``generate``
        gathers the weights (a collective), so the ranks must run the same number of turns: an
        all-reduce (MAX) over the world, once per turn (a host-device sync on NCCL). Otherwise each
        rank's generation is its own and this is just ``active``, no collective."""
        import torch.distributed as dist

        if not (self.cfg.zero_stage == 3 and self.engine is not None and dist.is_initialized()
                and dist.get_world_size() > 1):
            return active
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([int(active)], dtype=torch.long, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def turn_session(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_total_tokens: int,
                     eos_token_id: int | None, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0):
        """A multi-turn session continuing on one KV cache (:class:`~rlhf_hybrid.inference.turns.KVCacheSession`)
        when ``generation="fast"`` and the model is supported; else None, and the caller re-prefills each
        turn (``rlhf_algos.trajectories.RePrefillSession``, kept in step across ranks by
        :meth:`any_rank_active`). Under ZeRO-3 the weights are gathered once here (collective) and held by
        the session until it is dropped: its turns run no collective, so ranks may run different numbers.

        Raises:
            ValueError: ``inference_tp_size`` > 1 (tensor-parallel generation of multi-turn rollouts is not written).
        """
        from . import inference
        from .inference.turns import KVCacheSession

        if isinstance(self.module, ValueModel):
            raise TypeError("turn_session: this engine holds a value model, not a causal LM")
        if self.cfg.inference_tp_size != 1:
            # a tensor-parallel group generates its ranks' rows together, so every rank would have to bring
            # the same number of active rows and tokens every turn; not written
            raise ValueError(f"inference_tp_size={self.cfg.inference_tp_size}: multi-turn rollouts (an environment) "
                             "need inference_tp_size=1")
        length = prompt_ids.shape[1] + max_total_tokens + 1
        if self.cfg.generation != "fast" or inference.supported(plain_model(self.module), max_length=length) is not None:
            return None
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.module, "generation_config", None), "eos_token_id", None)
        self.generation_used = "fast"
        return KVCacheSession(self._rollout_layout(), prompt_ids, prompt_mask, max_total_tokens=max_total_tokens,
                              eos_token_id=eos_token_id, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p)

    def _rollout_layout(self):
        """The fast path's inference layout for one rollout, with ``timings`` of what it shares / copies.

        Under ZeRO-3 the shards are gathered once (collective, one all-gather per layer) into full
        tensors the layout uses; otherwise the layout reads the training parameters themselves.
        LoRA adapters (if any) are fused into new weight tensors for this rollout (see .lora).
        """
        from . import inference
        from .inference.storage import layout_sharing

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
        return layout

    def _tp_prompts(self, input_ids, attention_mask, group, pad_token_id):
        """The prompts of the whole tensor-parallel ``group`` and the one sampling generator its ranks
        share: ``(ids, mask, own, generator)`` (see :func:`_tp_gather_prompts`). Collective."""
        ids, mask, own = _tp_gather_prompts(input_ids.to(self.device), attention_mask.to(self.device), group,
                                            pad_token_id if pad_token_id is not None else 0)
        # the group samples in lockstep: one seed for all its ranks
        seed = torch.randint(0, 2**62, (1,), dtype=torch.long).to(self.device)
        import torch.distributed as dist

        dist.broadcast(seed, src=dist.get_global_rank(group, 0), group=group)
        return ids, mask, own, torch.Generator().manual_seed(int(seed))

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


def generated_logprobs(logits: tuple[torch.Tensor, ...], tokens: torch.Tensor, temperature: float, eos) -> torch.Tensor:
    """(B, R) float32 log-probs of the generated ``tokens`` (B, R) under ``softmax(logits / temperature)``
    from transformers' raw per-step logits (R tensors of (B, V)), 0 after each row's first EOS. Public for
    other callers of transformers ``generate`` that keep its log-probs (``rlhf chat --env``)."""
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
