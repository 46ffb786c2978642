"""Pairwise accuracy and ranking agreement: the one home of the tie rule.

Part of :mod:`rlhf_algos.functional` (import from there).
"""

from __future__ import annotations

import torch

from ._stats import masked_mean


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, mask: torch.Tensor | None = None, *,
                  tie: float = 0.5) -> torch.Tensor:
    """Fraction of pairs whose ``chosen`` score beats the ``rejected`` one; a tie counts ``tie``.

    ``mean(1[chosen > rejected] + tie * 1[chosen == rejected])`` over the valid pairs. With the
    default ``tie=0.5`` a constant scorer (an untrained reward model) scores 0.5, not 0, and the
    value is the Mann-Whitney / ROC-AUC estimate of ``P(chosen > rejected)``. ``tie=0.0`` is the
    convention of DPO-style ``reward_accuracy`` metrics (TRL's): ties count as wrong.

    Args:
        chosen: Scores of the preferred items, ``(B,)`` (or any shape broadcastable with ``rejected``).
        rejected: Scores of the other items, same or broadcastable shape.
        mask: Which pairs count, broadcastable to the pair shape; None: all of them.
        tie: Credit for ``chosen == rejected``, in [0, 1].

    Returns:
        0-dim, no graph; 0 when no pair counts (the masked-mean convention of this module).
    """
    dtype = chosen.dtype if chosen.is_floating_point() else torch.float32
    with torch.no_grad():
        wins = (chosen > rejected).to(dtype) + tie * (chosen == rejected).to(dtype)
        return masked_mean(wins, torch.ones_like(wins) if mask is None else mask)


def ranked_pairs(truth: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` bool: ``[i, j]`` is True when ``truth[i] > truth[j]`` (item i should rank above j).

    For a 0/1 verifier these are exactly the (correct, incorrect) pairs.
    """
    return truth[:, None] > truth[None, :]


def ranking_agreement(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """How often ``scores`` order two items the way ``truth`` does: :func:`pair_accuracy` over all
    :func:`ranked_pairs` of ``truth`` (ties in ``scores`` count 0.5, pairs tied in ``truth`` are skipped).

    With a 0/1 ``truth`` (a verifier) it is the ROC AUC of ``scores`` as a detector of correct
    items: 1 = every correct item scores above every incorrect one, 0.5 = no better than chance,
    below 0.5 = ranked against the truth (a reward model being hacked). Example: scores
    ``[1, 2, 3, 3]``, truth ``[1, 0, 0, 1]``: pairs (0, 1), (0, 2), (3, 1), (3, 2) score
    0 + 0 + 1 + 0.5 = 1.5 of 4 = 0.375.

    Args:
        scores: ``(N,)`` the scores being judged (e.g. a reward model's).
        truth: ``(N,)`` the ground truth (e.g. a verifier's scores).

    Returns:
        0-dim; 0 when ``truth`` has no ranked pair (check ``ranked_pairs(truth).any()``).
    """
    return pair_accuracy(scores[:, None], scores[None, :], ranked_pairs(truth))

