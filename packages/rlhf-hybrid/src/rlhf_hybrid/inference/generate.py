"""The decode loop: left-padded prompts in, HF ``generate``-compatible sequences out.

Conventions matched to Hugging Face ``generate`` (transformers 5), for every supported family:

* positions are counted over real tokens: ``position_ids = cumsum(mask) - 1``, 0 on padding
  (``GenerationMixin._prepare_position_ids_for_generation``; Llama, OPT and GPT-2 all accept
  ``position_ids``, so ``generate`` passes these to all three), and each new token's position is
  the previous one + 1;
* greedy is argmax of the float32 logits (first index on ties); sampling applies temperature,
  then top-k, then top-p;
* once a row emits an EOS token every later token of that row is ``pad_token_id`` (EOS itself when
  no pad is given); the loop stops when every row has finished, so the output may be shorter than
  ``P + max_new_tokens``.

Sampled tokens differ from HF's (different random streams); greedy tokens are the same.

Two ways to run the decode steps (the results are the same):

* eager (the default on CPU): :func:`~.model.decode_step` on the B rows, a cache sized to the call;
* static (the default on CUDA, or with ``graphs=DecodeGraphs()``): the step runs at a batch-size
  bucket >= B on static buffers and a cache kept in a :class:`~.graphs.DecodeGraphs`, replayed from
  a captured CUDA graph (``cuda_graphs``) or run eagerly on the same buffers (see :mod:`.graphs`).

Host syncs: one per call on the inputs (left padding; the longest position when near the model's
limit), then one every ``stop_check_every`` steps to stop once every row has finished (and one at
the end to trim the extra steps). Steps run after the last row finished only emit padding, which
is trimmed: the output does not depend on ``stop_check_every``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rlhf_kernels import fused_logprobs, rotary_cos_sin, sample

from .graphs import DecodeGraphs
from .layout import InferenceLayout, KVCache
from .model import decode_step, prefill

Tensor = torch.Tensor


@dataclass(frozen=True)
class GenerationOutput:
    """What :func:`generate` returns.

    Attributes:
        sequences: (B, P + R) prompts followed by R <= max_new_tokens generated tokens; rows that
            finished early are padded with ``pad_token_id`` after their EOS.
        logprobs: (B, R) float32 log-probability of each generated token under
            ``softmax(logits / temperature)`` (temperature 1 for greedy), before top-k/top-p
            filtering, i.e. what a training-mode recomputation at that temperature gives; 0 after
            a row's EOS. None unless ``return_logprobs``.
    """

    sequences: Tensor
    logprobs: Tensor | None = None


@torch.no_grad()
def generate(
    layout: InferenceLayout,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    cuda_graphs: bool | None = None,
    graphs: DecodeGraphs | None = None,
    stop_check_every: int | None = None,
) -> GenerationOutput:
    """Generates continuations of left-padded prompts with a preallocated KV cache.

    Args:
        layout: From :func:`rlhf_hybrid.inference.build_layout`.
        input_ids: (B, P) left-padded prompt ids.
        attention_mask: (B, P) 1 on real tokens, 0 on padding; every row's last column is real.
        max_new_tokens: R, the most tokens to generate per row.
        do_sample: Sample (temperature/top-k/top-p) or greedy argmax.
        temperature: Sampling temperature, > 0 (ignored when greedy).
        top_k: Keep the k most likely tokens; 0 disables (ignored when greedy).
        top_p: Nucleus mass in (0, 1]; 1 disables (ignored when greedy).
        eos_token_id: Token id(s) that end a row; None: rows never end early.
        pad_token_id: Fills a row after its EOS; default the (first) EOS id, as HF does.
        generator: CPU generator the per-step sampling seeds are drawn from (default: torch's).
        return_logprobs: Also return the generated tokens' log-probs (see :class:`GenerationOutput`).
        cuda_graphs: Replay each decode step from a CUDA graph captured per batch-size bucket.
            None: on when the layout is on CUDA and not tensor-parallel. True on CPU raises.
        graphs: The static decode state to use and keep (cache, buffers, graphs): pass the same
            :class:`~.graphs.DecodeGraphs` to every call to reuse them. Given with
            ``cuda_graphs=False`` (or on CPU), the static bucketed steps run eagerly. None: a
            fresh one for this call when graphs are on, else the eager path.
        stop_check_every: Check every k steps (a host sync) whether every row has finished.
            None: 1 on CPU, 8 elsewhere. The output does not depend on it; the state ``generator``
            is left in does (the extra steps draw their sampling seeds too).

    Returns:
        A :class:`GenerationOutput` on the layout's device.

    Raises:
        ValueError: On mismatched shapes, prompts that are not left-padded, a bad option, or a
            length beyond the model's learned position table.
        NotImplementedError: If the length exceeds the model's sliding window.
        RuntimeError: If ``cuda_graphs=True`` and the layout is not on a CUDA device.
    """
    device = layout.device
    stop_check_every = _check_options(input_ids, attention_mask, max_new_tokens, do_sample, temperature,
                                      stop_check_every, device)
    if cuda_graphs is None:
        # All-reduces inside a captured step (tensor parallelism) have never been run: opt-in only.
        cuda_graphs = device.type == "cuda" and layout.tp_group is None
    if cuda_graphs:
        graphs = DecodeGraphs() if graphs is None else graphs
        if (reason := graphs.capture_unavailable(layout)) is not None:
            raise RuntimeError(f"cuda_graphs=True: {reason}")
    ids = input_ids.to(device)
    mask = attention_mask.to(device=device, dtype=torch.long)
    B, P = ids.shape
    R = max_new_tokens
    _check_prompts(layout, mask, R)
    positions, next_position = _positions(layout, mask, R)
    eos, fill = _eos_and_fill(eos_token_id, pad_token_id, device)

    out = torch.full((B, P + R), fill, dtype=torch.long, device=device)
    out[:, :P] = ids
    logprobs = torch.zeros(B, R, dtype=torch.float32, device=device) if return_logprobs else None
    if R == 0:
        return GenerationOutput(out, logprobs)

    logits, cache, rope, static = _start(layout, graphs, cuda_graphs, ids, mask, positions, next_position, R)
    steps = _decode(layout, cache, rope, static, logits, out, logprobs, P=P, next_position=next_position, eos=eos,
                    fill=fill, stop_check_every=stop_check_every, do_sample=do_sample, temperature=temperature,
                    top_k=top_k, top_p=top_p, generator=generator)
    return GenerationOutput(out[:, : P + steps], None if logprobs is None else logprobs[:, :steps])


def _check_options(input_ids: Tensor, attention_mask: Tensor, max_new_tokens, do_sample: bool, temperature: float,
                   stop_check_every, device: torch.device) -> int:
    """Raise ``ValueError`` on bad shapes or options; returns ``stop_check_every`` with its default."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be (B, P); got {tuple(input_ids.shape)} "
                         f"and {tuple(attention_mask.shape)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature!r}")
    if stop_check_every is None:
        stop_check_every = 1 if device.type == "cpu" else 8
    if isinstance(stop_check_every, bool) or not isinstance(stop_check_every, int) or stop_check_every < 1:
        raise ValueError(f"stop_check_every must be an int >= 1; got {stop_check_every!r}")
    return stop_check_every


def _check_prompts(layout: InferenceLayout, mask: Tensor, R: int) -> None:
    """Raise on an empty batch, prompts that are not left-padded or a length beyond the sliding window."""
    B, P = mask.shape
    if B == 0 or P == 0:
        raise ValueError(f"need at least one prompt of at least one token; got input_ids {tuple(mask.shape)}")
    if not bool(mask[:, -1].all()):  # host sync, once per call
        raise ValueError("attention_mask: prompts must be left-padded (every row's last column a real token)")
    if layout.sliding_window is not None and P + R > layout.sliding_window:
        raise NotImplementedError(f"length {P + R} exceeds the model's sliding window {layout.sliding_window}; "
                                  "windowed decode attention is not implemented")


def _positions(layout: InferenceLayout, mask: Tensor, R: int) -> tuple[Tensor, Tensor]:
    """HF's position_ids: cumsum over the mask, padding at 0; new tokens continue from the last one.

    Returns ``(positions (B, P), next_position (B,))``. Raises ``ValueError`` when a position would be
    beyond the model's learned position table (a host sync, only near that limit).
    """
    P = mask.shape[1]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, P)
    next_position = positions[:, -1] + 1  # (B,)
    if layout.max_positions is not None and P + R > layout.max_positions:
        longest = int(next_position.max()) + R - 1
        if longest >= layout.max_positions:
            raise ValueError(f"position {longest} is beyond the model's {layout.max_positions} learned positions")
    return positions, next_position


def _eos_and_fill(eos_token_id, pad_token_id, device: torch.device) -> tuple[Tensor | None, int]:
    """``(EOS ids (n_eos,) or None, the id that fills a row after its EOS)``; the fill is the pad id,
    by default the (first) EOS id, as HF does."""
    eos = None
    if eos_token_id is not None:
        eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        eos = torch.tensor(eos_list, dtype=torch.long, device=device)
        if pad_token_id is None:
            pad_token_id = eos_list[0]
    fill = pad_token_id if pad_token_id is not None else 0  # unused without EOS: no row ends early
    return eos, fill


def _start(layout: InferenceLayout, graphs: DecodeGraphs | None, cuda_graphs: bool, ids: Tensor, mask: Tensor,
           positions: Tensor, next_position: Tensor, R: int):
    """Allocate the cache (eager) or prepare the static decode state (``graphs``), then run the prefill.

    Returns ``(logits, cache, rope, static)``: the (B, V) float32 logits after the last prompt
    token, the KV cache, the rotary tables (None without rotary) and the static state (None on the
    eager path).
    """
    B, P = ids.shape
    device = layout.device
    static = None
    if graphs is not None:
        # Before prefill: a first capture runs a warm-up step on the cache.
        static = graphs.prepare(layout, B, P + R, capture=cuda_graphs)
        rope, cache = static.rope, static.prefill_cache(B)
    else:
        rope = None
        if layout.rope_theta is not None:
            # Positions never exceed P + R - 1 (a row's next position is its real length <= P).
            rope = rotary_cos_sin(P + R, layout.head_dim, base=layout.rope_theta, device=device)
        cache = KVCache.allocate(layout, B, P + R)
    with _prefill_backends(device):
        logits = prefill(layout, cache, ids, mask, positions, rope)  # (B, V) float32
    if static is not None:
        static.start(next_position)
    return logits, cache, rope, static


def _decode(layout: InferenceLayout, cache, rope, static, logits: Tensor, out: Tensor, logprobs: Tensor | None, *,
            P: int, next_position: Tensor, eos: Tensor | None, fill: int, stop_check_every: int, do_sample: bool,
            temperature: float, top_k: int, top_p: float, generator: torch.Generator | None) -> int:
    """The decode loop from the prefill's ``logits``: writes the tokens into ``out`` (B, P + R) and their
    log-probs into ``logprobs`` (B, R) in place; returns how many steps to keep (<= R)."""
    B, R = out.shape[0], out.shape[1] - P
    unfinished = torch.ones(B, dtype=torch.bool, device=layout.device)
    # Steps at whose start some row was unfinished: the real length when the stop check is late.
    late_check = eos is not None and stop_check_every > 1
    live_steps = torch.zeros((), dtype=torch.long, device=layout.device) if late_check else None
    lp_temperature = temperature if do_sample else 1.0
    steps = R
    for t in range(R):
        if do_sample:
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        else:
            token = sample(logits, temperature=0.0)  # argmax
        if logprobs is not None:
            logprobs[:, t] = fused_logprobs(logits, token, temperature=lp_temperature, ignore_index=None)
        if eos is not None:
            # As HF: finished rows emit padding, then a row finishes when it emits EOS.
            token = torch.where(unfinished, token, fill)
            if logprobs is not None:
                logprobs[:, t].masked_fill_(~unfinished, 0.0)
            if live_steps is not None:
                live_steps += unfinished.any()
            # Not torch.isin: with many EOS ids it sorts and calls unique (a host sync on CUDA).
            unfinished &= ~(token[:, None] == eos).any(dim=1)  # (B, n_eos) -> (B,)
        out[:, P + t] = token
        # Host sync every stop_check_every steps (every step: as HF's stopping check).
        if eos is not None and (t + 1) % stop_check_every == 0 and not bool(unfinished.any()):
            steps = t + 1
            break
        if t + 1 < R:  # the last token's logits are never needed
            if static is None:
                logits = decode_step(layout, cache, token, next_position + t, rope)
            else:
                static.tokens[:B].copy_(token)
                logits = static.run()[:B]  # (B, V); padding rows dropped
    if live_steps is not None:
        steps = int(live_steps)  # host sync, once: steps after every row finished are dropped
    return steps


def _prefill_backends(device: torch.device):
    """SDPA backends for the masked prefill on CUDA: memory-efficient attention (math as a fallback),
    not cuDNN attention, whose first call at a new shape cost 16-22 s on an H100 with torch 2.11
    (../shared/gpu/README.md); elsewhere PyTorch's own choice."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
