"""Multi-turn generation on one KV cache: each turn continues where the row's sequence stopped.

A batch of trajectories (``rlhf_algos.trajectories``) alternates model turns and environment
replies. Here the prompts are prefilled once; then every turn, per row,

1. the tokens not yet in the cache are fed one by one with :func:`~.model.decode_step`: the last
   token the model sampled in its previous turn, then the environment's reply (token ids);
2. new tokens are sampled until the row's EOS or its cap.

Rows are ragged (different reply lengths, turns that end at different steps, rows whose
trajectory is over): every step runs all ``B`` rows, and a row with nothing to do this step has
its cache length and logits put back afterwards, so the key/value it wrote lands past its length
and is overwritten by its next real token (decode attention never reads past ``lengths``).

When this path applies (:meth:`rlhf_hybrid.HybridEngine.turn_session`): ``generation="fast"``, a
supported model and no tensor-parallel generation; it runs the eager decode step (no CUDA graphs).
Otherwise the caller re-prefills the growing sequence every turn (``rlhf_algos.RePrefillSession``).
Feeding a reply one token per step costs one step per reply token; a chunked extend would be
faster on a GPU and is not written.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from rlhf_kernels import fused_logprobs, rotary_cos_sin, sample

from .generate import _check_prompts, _positions, _prefill_backends
from .layout import InferenceLayout, KVCache
from .model import decode_step, prefill

Tensor = torch.Tensor

__all__ = ["KVCacheSession"]


class KVCacheSession:
    """A ``rlhf_algos.trajectories.TurnSession`` on one preallocated KV cache.

    Args:
        layout: From :func:`~.adapters.build_layout`.
        prompt_ids: ``(B, P)`` left-padded prompts; prompt_mask: ``(B, P)``.
        max_total_tokens: Tokens after the prompt at most (model and environment), per row.
        eos_token_id: Ends a turn, one id or several (None: only the cap does).
        do_sample, temperature, top_k, top_p: As :func:`~.generate.generate`.
        generator: CPU generator for the sampling seeds (default: torch's).
    """

    def __init__(self, layout: InferenceLayout, prompt_ids: Tensor, prompt_mask: Tensor, *, max_total_tokens: int,
                 eos_token_id: int | Sequence[int] | None, do_sample: bool = True, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> None:
        self.layout = layout
        self.eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) \
            else set(eos_token_id)
        self.sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = generator
        device = layout.device
        ids = prompt_ids.to(device)
        mask = prompt_mask.to(device=device, dtype=torch.long)
        B, P = ids.shape
        _check_prompts(layout, mask, max_total_tokens + 1)
        positions, self.next_position = _positions(layout, mask, max_total_tokens + 1)  # (B, P), (B,)
        S = P + max_total_tokens + 1  # + 1: the slot a resting row writes into and gives back
        self.rope = None
        if layout.rope_theta is not None:
            self.rope = rotary_cos_sin(S, layout.head_dim, base=layout.rope_theta, device=device)
        self.cache = KVCache.allocate(layout, B, S)
        with _prefill_backends(device):
            self.logits = prefill(layout, self.cache, ids, mask, positions, self.rope)  # (B, V) float32
        self.unfed: list[list[int]] = [[] for _ in range(B)]  # sampled but not yet in the cache
        self.B = B

    def _step(self, tokens: dict[int, int]) -> None:
        """Feed ``tokens`` (row -> token) to the cache; every other row rests (length and logits kept)."""
        device = self.layout.device
        consume = torch.zeros(self.B, dtype=torch.bool, device=device)
        tok = torch.zeros(self.B, dtype=torch.long, device=device)
        rows = torch.tensor(list(tokens), dtype=torch.long, device=device)
        consume[rows] = True
        tok[rows] = torch.tensor(list(tokens.values()), dtype=torch.long, device=device)
        lengths = self.cache.lengths.clone()
        pos = torch.where(consume, self.next_position, torch.zeros_like(self.next_position))
        logits = decode_step(self.layout, self.cache, tok, pos, self.rope)  # (B, V)
        self.cache.lengths.copy_(torch.where(consume, self.cache.lengths, lengths))
        self.next_position += consume.long()
        self.logits = torch.where(consume[:, None], logits, self.logits)

    def _feed(self, rows: Sequence[int], appended: Sequence[list[int]]) -> None:
        queues = {r: self.unfed[r] + list(extra) for r, extra in zip(rows, appended, strict=True)}
        for r in rows:
            self.unfed[r] = []
        for j in range(max((len(q) for q in queues.values()), default=0)):
            self._step({r: q[j] for r, q in queues.items() if len(q) > j})

    @torch.no_grad()
    def turn(self, rows: Sequence[int], appended: Sequence[list[int]], caps: Sequence[int]):
        """See ``rlhf_algos.trajectories.TurnSession.turn``: one ``(tokens, logprobs)`` pair per row."""
        self._feed(rows, appended)
        tokens: dict[int, list[int]] = {r: [] for r in rows}
        logprobs: dict[int, list[float]] = {r: [] for r in rows}
        live = dict(zip(rows, caps, strict=True))  # row -> cap, rows still sampling
        greedy = not self.sampling["do_sample"]
        lp_temperature = 1.0 if greedy else self.sampling["temperature"]
        while live:
            if greedy:
                token = sample(self.logits, temperature=0.0)  # (B,) argmax
            else:
                token = sample(self.logits, temperature=self.sampling["temperature"], top_k=self.sampling["top_k"],
                               top_p=self.sampling["top_p"], generator=self.generator)
            lp = fused_logprobs(self.logits, token, temperature=lp_temperature, ignore_index=None)  # (B,)
            token, lp = token.tolist(), lp.float().tolist()  # host sync, once per step
            feed: dict[int, int] = {}
            for r in list(live):
                tokens[r].append(token[r])
                logprobs[r].append(lp[r])
                if token[r] in self.eos or len(tokens[r]) >= live[r]:
                    self.unfed[r] = [token[r]]  # fed at the row's next turn, if it has one
                    del live[r]
                else:
                    feed[r] = token[r]
            if feed:
                self._step(feed)
        return [(tokens[r], logprobs[r]) for r in rows]
