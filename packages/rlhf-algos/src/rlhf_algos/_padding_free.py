"""The RL learn step's forwards, padded or padding-free (``OnlineConfig.batch_layout``).

A rollout micro-batch is ``(n, P + R)`` rows: a left-padded prompt, then a response right-padded after
its EOS. With ``batch_layout="padded"`` the actor and the critic run on those rows as they are. With a
packed layout (``"rows"``, ``"one_row"``) each row's real tokens are packed into rows first
(:func:`rlhf_data.pack_padded_batch`: positions restarting at 0 per sequence, ``attention_mask=None``),
the model runs on the packed rows, and the per-token outputs are scattered back to the padded
``(n, R)`` / ``(n, P + R)`` layout (:func:`rlhf_data.unpack_to_padded`), so every loss is computed
exactly as before. A padded position holds 0 there (the padded forward's value at a pad is never read:
every loss masks it).

Each sequence's positions and attention are those of the padded forward (positions counted over real
tokens from 0; attention over the sequence's own real tokens), so the log-probs, entropies and values
equal the padded ones up to float rounding (``tests/test_padding_free_rl.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnF

from .protocols import ScoringPolicy, ValueFunction

__all__ = ["learn_logprobs", "learn_values"]


def _check_scored_tokens_have_a_prefix(attention_mask: torch.Tensor, start: int) -> None:
    """A scored token (real, column >= ``start``) needs a real token before it in its row: the packed
    forward scores a sequence's first token from nothing (the padded one from a pad's logits)."""
    mask = attention_mask != 0
    scored = mask[:, start:].any(1)
    orphan = (scored & ~mask[:, start - 1]).nonzero().flatten()
    if len(orphan):
        raise ValueError(f"padding-free learn step: row {orphan[0].item()} has response tokens but no real token "
                         f"at column {start - 1} (an empty prompt); a scored token needs the token before it")


def learn_logprobs(policy: ScoringPolicy, sequences: torch.Tensor, attention_mask: torch.Tensor, start: int, *,
                   layout: str, pad_id: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of ``sequences[:, start:]`` (with grad), in the padded layout.

    Args:
        policy: ``token_logprobs`` (taking ``position_ids`` for a packed ``layout``).
        sequences: ``(n, L)`` prompt + response rows.
        attention_mask: ``(n, L)``, 1 on real tokens (one contiguous run per row).
        start: First scored column (``P``, the prompt width); >= 1.
        layout: ``"padded"``, or a packed layout of ``rlhf_data.PADDING_FREE_LAYOUTS``.
        pad_id: Fills the end of short packed rows (never scored).
        temperature: As ``token_logprobs``.

    Returns:
        ``(logprobs, entropy)``, each ``(n, L - start)``; padded layout: what ``token_logprobs`` returns
        (anything on padding), packed: 0 on padding.

    Raises:
        ValueError: A packed layout and a row with scored tokens but no real token before ``start``.
    """
    if layout == "padded":
        return policy.token_logprobs(sequences, attention_mask, start, temperature=temperature, return_entropy=True)
    from rlhf_data import pack_padded_batch, unpack_to_padded

    _check_scored_tokens_have_a_prefix(attention_mask, start)
    packed = pack_padded_batch(sequences, attention_mask, pad_id, layout)
    lp, ent = policy.token_logprobs(packed["input_ids"], None, 1, temperature=temperature, return_entropy=True,
                                    position_ids=packed["position_ids"])  # (Rows, W - 1): column c scores c + 1
    # Shift right by one column so that column c holds token c's log-prob (column 0 is a sequence's first
    # token, never scored: the check above).
    index = packed["index"][:, start:]  # (n, L - start)
    return unpack_to_padded(nnF.pad(lp, (1, 0)), index), unpack_to_padded(nnF.pad(ent, (1, 0)), index)


def learn_values(critic: ValueFunction, sequences: torch.Tensor, attention_mask: torch.Tensor, *, layout: str,
                 pad_id: int) -> torch.Tensor:
    """The critic's per-position values ``(n, L)`` (with grad), in the padded layout (0 on padding when packed).

    Args as :func:`learn_logprobs`; ``critic.values`` takes ``position_ids`` for a packed ``layout``.
    """
    if layout == "padded":
        return critic.values(sequences, attention_mask)
    from rlhf_data import pack_padded_batch, unpack_to_padded

    packed = pack_padded_batch(sequences, attention_mask, pad_id, layout)
    values = critic.values(packed["input_ids"], None, position_ids=packed["position_ids"])  # (Rows, W)
    return unpack_to_padded(values, packed["index"])
