"""The small interfaces rlhf-algos talks to. rlhf-hybrid implements them with DeepSpeed engines;
``rlhf_algos.testing`` implements them with plain torch modules for unit tests.

Shapes: ``B`` rows, ``P`` prompt columns (left-padded), ``L`` total columns.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ScoringPolicy(Protocol):
    """A causal LM that scores tokens (the frozen reference policy)."""

    def token_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int = 1, *,
                       temperature: float = 1.0, return_entropy: bool = False):
        """Log-probs (B, L - start) of ``input_ids[:, start:]``; with entropy, a (logprobs, entropy) pair."""
        ...

    def train(self) -> None: ...

    def eval(self) -> None: ...


@runtime_checkable
class TrainablePolicy(ScoringPolicy, Protocol):
    """A policy that also generates and learns (the actor).

    With a packed ``batch_layout`` (SFT, or an online algorithm's learn step), ``token_logprobs`` is also
    called on packed rows as ``token_logprobs(input_ids, None, 1, ..., position_ids=...)``, position ids
    restarting at 0 per sequence (``rlhf_data.packing``).
    """

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 return_logprobs: bool = False):
        """(B, P + R) sequences; rows that stopped early are padded after their EOS.

        With ``return_logprobs``, a ``(sequences, logprobs)`` pair: ``logprobs`` (B, R) float32, the
        generator's log-prob of each generated token under ``softmax(logits / temperature)``
        (temperature 1 when greedy), before top-k / top-p filtering, i.e. what ``token_logprobs``
        at that temperature gives when generation and training agree; 0 after a row's EOS.
        """
        ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...


@runtime_checkable
class ValueFunction(Protocol):
    """A trainable critic: per-position values (B, L).

    With a packed ``OnlineConfig.batch_layout``, ``values`` is also called on packed rows as
    ``values(input_ids, None, position_ids=...)`` (``rlhf_data.pack_padded_batch``).
    """

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...


@runtime_checkable
class RewardFunction(Protocol):
    """Sequence-level reward: a reward model's score or a verifier. Returns (B,) float."""

    def __call__(self, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                 meta: list[dict]) -> torch.Tensor: ...


@runtime_checkable
class SequenceScorer(Protocol):
    """A reward model: one score per sequence (B,), read at each row's last real token."""

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class TrainableScorer(SequenceScorer, Protocol):
    """A reward model being trained (:class:`~rlhf_algos.reward_model.RM`): ``score`` keeps the graph.

    With a packed ``RMConfig.batch_layout``, ``score`` is also called on packed rows as
    ``score(input_ids, None, position_ids=..., last_index=...)`` (``rlhf_data.collate_pairs_padding_free``)
    and returns one score per packed sequence (N,).
    """

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def train(self) -> None: ...

    def eval(self) -> None: ...
