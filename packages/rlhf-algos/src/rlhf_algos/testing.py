"""Test doubles: plain-torch implementations of the :mod:`rlhf_algos.protocols`.

A bigram language model (an embedding and a linear head: the next token depends only on the
current one) is enough to exercise every code path of an algorithm on a CPU in milliseconds, with
no DeepSpeed, no transformers and no process group. Algorithms are tested against these doubles;
``rlhf_hybrid.HybridEngine`` implements the same protocols for real models.

Shapes: ``B`` rows, ``L`` columns, ``V`` vocabulary.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = [
    "BigramLM",
    "FirstTokenReward",
    "RecordingReward",
    "ScriptedPolicy",
    "TargetTokenReward",
    "TinyCritic",
    "TinyPolicy",
    "TinyScorer",
    "pairs_batch",
]


class BigramLM(nn.Module):
    """``logits[b, i] = head(embed(input_ids[b, i]))``: next-token logits from the current token only."""

    def __init__(self, vocab_size: int, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))  # (B, L) -> (B, L, V)


class _Trainable:
    """``backward``/``step``/``train``/``eval`` over ``self.module`` with an Adam optimizer."""

    module: nn.Module

    def _init_optimizer(self, lr: float, trainable: bool) -> None:
        self.trainable = trainable
        if trainable:
            self.optimizer: torch.optim.Optimizer | None = torch.optim.Adam(self.module.parameters(), lr=lr)
        else:
            self.optimizer = None
            self.module.requires_grad_(False)
        self.steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        if not self.trainable:
            raise RuntimeError("backward: this test double was built frozen (trainable=False)")
        loss.backward()

    def step(self) -> None:
        if self.optimizer is None:
            raise RuntimeError("step: this test double was built frozen (trainable=False)")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()


class TinyPolicy(_Trainable):
    """A :class:`~rlhf_algos.protocols.TrainablePolicy` over a :class:`BigramLM`.

    Args:
        vocab_size: ``V``.
        hidden: embedding width.
        lr: Adam learning rate.
        seed: seeds the weights and the sampling generator.
        trainable: False gives a frozen policy (a reference) whose ``backward``/``step`` raise.
        module: use this module instead of a fresh :class:`BigramLM`.
    """

    def __init__(self, vocab_size: int, *, hidden: int = 16, lr: float = 1e-2, seed: int = 0,
                 trainable: bool = True, module: nn.Module | None = None) -> None:
        if module is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                module = BigramLM(vocab_size, hidden)
        self.module = module
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)
        self._init_optimizer(lr, trainable)

    def frozen_copy(self) -> TinyPolicy:
        """A frozen deep copy: the reference policy at the actor's current weights."""
        return TinyPolicy(self.vocab_size, module=copy.deepcopy(self.module), trainable=False)

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, start: int = 1, *,
                       temperature: float = 1.0, return_entropy: bool = False,
                       position_ids: torch.Tensor | None = None):
        """Log-probs (B, L - start) of ``input_ids[:, start:]``; with entropy a (logprobs, entropy) pair.

        The bigram reads neither the mask nor positions, so packed rows (``position_ids``) score each token
        as the padded rows do."""
        logits = self.module(input_ids)[:, start - 1 : -1].float() / temperature  # (B, L - start, V)
        logp = torch.log_softmax(logits, dim=-1)
        lp = logp.gather(-1, input_ids[:, start:, None]).squeeze(-1)  # (B, L - start)
        if not return_entropy:
            return lp
        entropy = -(logp.exp() * logp).sum(-1)  # (B, L - start)
        return lp, entropy

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, return_logprobs: bool = False):
        """(B, P + R) with R <= ``max_new_tokens``; rows that emitted EOS continue with padding.

        Like HF ``generate``, the loop stops early once every row has emitted EOS. With
        ``return_logprobs`` also the (B, R) log-probs of the generated tokens under
        ``softmax(logits / temperature)`` before top-k (as ``TrainablePolicy.generate``), 0 after EOS.

        Raises:
            NotImplementedError: ``top_p < 1`` (nucleus sampling is not needed by any test yet).
        """
        if top_p < 1.0:
            raise NotImplementedError("TinyPolicy.generate: top_p < 1 is not implemented by this test double")
        pad = pad_token_id if pad_token_id is not None else eos_token_id
        seqs = input_ids.clone()
        done = torch.zeros(len(seqs), dtype=torch.bool)
        lps = []
        for _ in range(max_new_tokens):
            logits = self.module(seqs[:, -1:])[:, -1].float()  # (B, V): the bigram needs only the last token
            logits = logits / (temperature if do_sample else 1.0)
            logp = torch.log_softmax(logits, -1)  # (B, V): the distribution before top-k
            if do_sample:
                if top_k > 0:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=self.generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            lp = logp.gather(-1, nxt[:, None]).squeeze(1)  # (B,)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                lp = lp.masked_fill(done, 0.0)
                done |= nxt == eos_token_id
            seqs = torch.cat([seqs, nxt[:, None]], dim=1)
            lps.append(lp)
            if eos_token_id is not None and bool(done.all()):
                break
        if not return_logprobs:
            return seqs
        return seqs, torch.stack(lps, dim=1) if lps else torch.zeros(len(seqs), 0)


class ScriptedPolicy(TinyPolicy):
    """A :class:`TinyPolicy` whose ``generate`` returns fixed responses (to test masking exactly).

    Args:
        responses: one token list per prompt row, appended verbatim (right-padded with
            ``pad_token_id`` to the longest); everything else as in :class:`TinyPolicy`.
    """

    def __init__(self, vocab_size: int, responses: list[list[int]], **kw) -> None:
        super().__init__(vocab_size, **kw)
        self.responses = responses

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, return_logprobs: bool = False):
        """The scripted responses; with ``return_logprobs`` also their log-probs under this policy at
        ``temperature`` (as if it had sampled them), 0 after the first EOS."""
        seqs = self._scripted(input_ids, max_new_tokens, eos_token_id, pad_token_id)
        if not return_logprobs:
            return seqs
        P = input_ids.shape[1]
        lp = self.token_logprobs(seqs, torch.ones_like(seqs), P, temperature=temperature if do_sample else 1.0)
        resp = seqs[:, P:]
        if eos_token_id is not None:
            is_eos = (resp == eos_token_id).long()
            lp = lp.masked_fill(is_eos.cumsum(1) - is_eos > 0, 0.0)  # after the first EOS
        return seqs, lp

    def _scripted(self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None,
                  pad_token_id: int | None) -> torch.Tensor:
        if len(self.responses) != len(input_ids):
            raise ValueError(f"ScriptedPolicy: {len(self.responses)} scripted responses for {len(input_ids)} prompts")
        width = min(max(len(r) for r in self.responses), max_new_tokens)
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        resp = torch.full((len(input_ids), width), pad, dtype=input_ids.dtype)
        for i, r in enumerate(self.responses):
            r = r[:width]
            resp[i, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
        return torch.cat([input_ids, resp], dim=1)


class TinyCritic(_Trainable):
    """A :class:`~rlhf_algos.protocols.ValueFunction`: per-token values from an embedding and a linear head."""

    def __init__(self, vocab_size: int, *, hidden: int = 16, lr: float = 1e-2, seed: int = 0,
                 trainable: bool = True) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            self.module = nn.Sequential(nn.Embedding(vocab_size, hidden), nn.Linear(hidden, 1))
        self._init_optimizer(lr, trainable)

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, L)``; per token only, so packed rows (``position_ids``, ignored) give the padded values."""
        return self.module(input_ids).squeeze(-1).float()  # (B, L)


class TinyScorer(TinyCritic):
    """A :class:`~rlhf_algos.protocols.TrainableScorer` (a reward model): :class:`TinyCritic`'s value at each
    right-padded row's last real token."""

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = attention_mask.long().sum(-1) - 1  # (B,)
        return self.values(input_ids, attention_mask).gather(1, last[:, None]).squeeze(1)  # (B,)


class FirstTokenReward:
    """A :class:`~rlhf_algos.protocols.RewardFunction`: 1.0 when the first response token is ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 meta: list[dict]) -> torch.Tensor:
        return (sequences[:, prompt_len] == self.token).float()  # (B,)


class TargetTokenReward:
    """A :class:`~rlhf_algos.protocols.RewardFunction`: the fraction of response tokens equal to ``token``.

    Only response positions with ``attention_mask == 1`` count (tokens after the first EOS do
    not). A graded reward: samples of one prompt usually differ, so group baselines have signal.
    """

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 meta: list[dict]) -> torch.Tensor:
        resp, mask = sequences[:, prompt_len:], attention_mask[:, prompt_len:].float()  # (B, R)
        hits = ((resp == self.token).float() * mask).sum(-1)
        return hits / mask.sum(-1).clamp(min=1.0)  # (B,)


class RecordingReward:
    """Wraps a reward function and records every call's ``(sequences, prompt_len, meta)``."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, int, list[dict]]] = []

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 meta: list[dict]) -> torch.Tensor:
        self.calls.append((sequences.clone(), prompt_len, list(meta)))
        return self.inner(sequences, attention_mask, prompt_len, meta)


def pairs_batch(prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], *,
                pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """A preference micro-batch laid out as ``rlhf_data.collate_pairs`` lays it out.

    Row ``i`` is ``prompts[i] + chosen[i]``, row ``B + i`` is ``prompts[i] + rejected[i]``,
    right-padded with ``pad_token_id`` to the longest row.

    Returns:
        ``input_ids``, ``attention_mask`` and ``response_mask``, each ``(2B, L)`` int64;
        ``response_mask`` is 1 on the response tokens.
    """
    if not len(prompts) == len(chosen) == len(rejected):
        raise ValueError(f"pairs_batch: {len(prompts)} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
    rows = [(p, r) for p, r in zip(prompts, chosen, strict=True)]
    rows += [(p, r) for p, r in zip(prompts, rejected, strict=True)]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :n] = 1
        resp[i, len(p) : n] = 1
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}
