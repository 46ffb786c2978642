"""Multi-turn rollouts: a batch of episodes against environments, built as token sequences.

Each trajectory is ONE token sequence after its prompt: the model's tokens exactly as sampled,
then the environment's reply appended as token ids (text is tokenized once, for that turn only:
the conversation is never re-tokenized from text), then the model's next turn, and so on. The
loss mask is 1 on the model's tokens only; the sampling log-probs are kept per model token.
docs/environments.md draws the layout with a worked example.

Generation turn by turn goes through a :class:`TurnSession`:

* :class:`RePrefillSession` (here, any :class:`~rlhf_algos.protocols.TrainablePolicy`): every turn
  re-prefills each active row's growing token sequence (left-padded) with ``policy.generate``;
* ``rlhf_hybrid.inference.KVCacheSession`` (the engine's fast path): continues on the same KV cache.

Shapes: ``N`` rows, ``P`` prompt columns (left-padded), ``T`` trajectory columns (right-padded).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch

from .environments import END_REASONS, Environment, EpisodeBudget, StepResult, check_step
from .protocols import TrainablePolicy

__all__ = ["Episode", "RePrefillSession", "TrajectoryBatch", "TurnOutput", "TurnSession", "end_reason_counts",
           "make_session", "run_episodes"]

log = logging.getLogger(__name__)


class TurnOutput(NamedTuple):
    """One row's model turn: the sampled tokens (up to and including EOS, or the cap) and their log-probs.

    A plain ``(tokens, logprobs)`` pair is one too (rlhf-hybrid's session returns those)."""

    tokens: list[int]
    logprobs: list[float]


class TurnSession(Protocol):
    """Generates one model turn for some rows of a batch, keeping each row's token sequence."""

    def turn(self, rows: Sequence[int], appended: Sequence[list[int]], caps: Sequence[int]) -> list[TurnOutput]:
        """For each ``rows[i]``: append ``appended[i]`` (environment token ids, [] on the first turn) to
        that row's sequence, then sample at most ``caps[i]`` tokens (a turn ends at EOS)."""
        ...

    # Optional, for a session whose ``turn`` is a collective across ranks (see :class:`RePrefillSession`):
    # ``any_active(active: bool) -> bool`` (True when some rank still has an active row; a collective)
    # and ``idle()`` (this rank has no active row: run the collectives of one turn, generating nothing
    # that is kept). A session without them runs a rank's turns independently of the other ranks.


def _cut(tokens: list[int], logprobs: list[float], eos: int | None, cap: int) -> TurnOutput:
    """The turn's tokens up to and including the first EOS, at most ``cap``."""
    n = min(cap, len(tokens))
    if eos is not None and eos in tokens[:n]:
        n = tokens.index(eos) + 1
    return TurnOutput(tokens[:n], logprobs[:n])


class RePrefillSession:
    """A :class:`TurnSession` over ``policy.generate``: each turn re-prefills the rows' token sequences.

    The sequences are kept as token ids (never text); each turn's batch is left-padded with
    ``pad_token_id`` (positions are counted over real tokens, so the padding does not change them).

    Several ranks: when the policy's ``generate`` is a collective (e.g. ``rlhf_hybrid.HybridEngine``
    under ZeRO-3 gathers the weights in every call), every rank must call it the same number of
    times, but each rank's trajectories end after their own number of turns. Such a policy has
    ``any_rank_active(active: bool) -> bool`` (an all-reduce: is any rank's row still active?);
    :func:`run_episodes` asks it before every turn and goes on while any rank has an active row, and
    a rank with none runs :meth:`idle` (one throw-away ``generate`` of one token, so the collectives
    match: the ``synced_gpus`` idea of transformers ``generate``, at turn granularity).

    Args:
        policy: Generates (with ``return_logprobs``).
        prompt_ids: ``(N, P)`` left-padded prompts; prompt_mask: ``(N, P)``.
        eos_token_id: Ends a turn; pad_token_id: pads the batch of each turn.
        sampling: ``do_sample``, ``temperature``, ``top_k``, ``top_p`` for ``policy.generate``.
    """

    def __init__(self, policy: TrainablePolicy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                 eos_token_id: int | None, pad_token_id: int, **sampling) -> None:
        self.policy, self.eos, self.pad, self.sampling = policy, eos_token_id, pad_token_id, sampling
        self.context = [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        self._any_rank_active = getattr(policy, "any_rank_active", None)

    def any_active(self, active: bool) -> bool:
        """Whether this rank (``active``) or any other still has an active row: a collective when the
        policy's ``generate`` is one (``any_rank_active``), else just ``active``."""
        return active if self._any_rank_active is None else bool(self._any_rank_active(active))

    def idle(self) -> None:
        """A turn with no row of this rank: one ``generate`` of one token from a one-token context,
        thrown away, so that this rank takes part in the collectives of the other ranks' turn."""
        ids = torch.tensor([[self.context[0][-1] if self.context[0] else self.pad]], dtype=torch.long)
        self.policy.generate(ids, torch.ones_like(ids), max_new_tokens=1, eos_token_id=self.eos,
                             pad_token_id=self.pad, return_logprobs=True, **self.sampling)

    def turn(self, rows: Sequence[int], appended: Sequence[list[int]], caps: Sequence[int]) -> list[TurnOutput]:
        for r, extra in zip(rows, appended, strict=True):
            self.context[r] = self.context[r] + list(extra)
        width = max(len(self.context[r]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(self.context[r])
            ids[i, width - n:] = torch.tensor(self.context[r], dtype=torch.long)
            mask[i, width - n:] = 1
        seqs, lps = self.policy.generate(ids, mask, max_new_tokens=max(caps), eos_token_id=self.eos,
                                         pad_token_id=self.pad, return_logprobs=True, **self.sampling)
        new, lps = seqs[:, width:].cpu().tolist(), lps.float().cpu().tolist()
        out = [_cut(new[i], lps[i], self.eos, caps[i]) for i in range(len(rows))]
        for r, o in zip(rows, out, strict=True):
            self.context[r] = self.context[r] + o.tokens
        return out


def make_session(policy: TrainablePolicy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                 max_total_tokens: int, eos_token_id: int | None, pad_token_id: int, **sampling) -> TurnSession:
    """The policy's own KV-cache session when it has one for this batch (``turn_session``, e.g.
    ``rlhf_hybrid.HybridEngine`` with ``generation="fast"``), else a :class:`RePrefillSession`."""
    fast = getattr(policy, "turn_session", None)
    session = None if fast is None else fast(prompt_ids, prompt_mask, max_total_tokens=max_total_tokens,
                                             eos_token_id=eos_token_id, **sampling)
    return session or RePrefillSession(policy, prompt_ids, prompt_mask, eos_token_id=eos_token_id,
                                       pad_token_id=pad_token_id, **sampling)


@dataclass
class Episode:
    """One trajectory as it is built: tokens after the prompt, whose they are, rewards, how it ended."""

    tokens: list[int] = field(default_factory=list)
    is_model: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # 0 on environment tokens
    turn_rewards: dict[int, float] = field(default_factory=dict)  # index of a turn's last token -> reward
    score: float = 0.0  # the reward of the step that ended the episode
    end_reason: str | None = None
    detail: str = ""  # the exception or the bad step, for the log
    num_turns: int = 0
    info: dict = field(default_factory=dict)  # the last step's StepResult.info

    def add(self, tokens: list[int], model: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += tokens
        self.is_model += [model] * len(tokens)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(tokens)

    def end(self, reason: str, score: float, detail: str = "") -> None:
        assert reason in END_REASONS, reason
        self.end_reason, self.score, self.detail = reason, float(score), detail


@dataclass(frozen=True, eq=False)
class TrajectoryBatch:
    """A batch of finished episodes as tensors (all on the CPU).

    Attributes:
        sequences: ``(N, P + T)`` the prompts, then each trajectory's tokens, right-padded with the pad id.
        attention_mask: ``(N, P + T)`` int64, the prompt's mask then 1 on every trajectory token.
        loss_mask: ``(N, T)`` float32, 1 on the model's tokens only.
        sample_logprobs: ``(N, T)`` float32, the sampler's log-prob of each model token, 0 elsewhere.
        turn_rewards: ``(N, T)`` float32, each non-final turn's reward at that turn's last model token.
        scores: ``(N,)`` float32, the final reward (of the step that ended the episode).
        num_turns: ``(N,)`` int64 model turns.
        end_reasons: ``N`` strings from :data:`~rlhf_algos.environments.END_REASONS`.
        prompt_len: ``P``.
        final_info: ``N`` dicts, the ``info`` of each trajectory's last step ({} when it failed).
        end_details: ``N`` strings: why a trajectory ended for ``env_error``, ``bad_step`` or
            ``reply_over_budget`` (the exception, the problem, the reply's length), else "".
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    sample_logprobs: torch.Tensor
    turn_rewards: torch.Tensor
    scores: torch.Tensor
    num_turns: torch.Tensor
    end_reasons: list[str]
    prompt_len: int
    final_info: list[dict] = field(default_factory=list)
    end_details: list[str] = field(default_factory=list)


def _to_batch(episodes: list[Episode], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pad: int) -> TrajectoryBatch:
    N, T = len(episodes), max(1, max(len(e.tokens) for e in episodes))
    traj = torch.full((N, T), pad, dtype=torch.long)
    real, loss, lps, turn = (torch.zeros(N, T) for _ in range(4))
    for i, e in enumerate(episodes):
        n = len(e.tokens)
        traj[i, :n] = torch.tensor(e.tokens, dtype=torch.long)
        real[i, :n] = 1
        loss[i, :n] = torch.tensor(e.is_model, dtype=torch.float32)
        lps[i, :n] = torch.tensor(e.logprobs, dtype=torch.float32)
        for pos, r in e.turn_rewards.items():
            turn[i, pos] = r
    return TrajectoryBatch(
        sequences=torch.cat([prompt_ids.cpu().long(), traj], dim=1),
        attention_mask=torch.cat([prompt_mask.cpu().long(), real.long()], dim=1),
        loss_mask=loss, sample_logprobs=lps * loss, turn_rewards=turn,
        scores=torch.tensor([e.score for e in episodes], dtype=torch.float32),
        num_turns=torch.tensor([e.num_turns for e in episodes], dtype=torch.long),
        end_reasons=[e.end_reason or "done" for e in episodes], prompt_len=prompt_ids.shape[1],
        final_info=[e.info for e in episodes], end_details=[e.detail for e in episodes])


def _safe_step(env: Environment, text: str, vocab_size: int | None) -> tuple[StepResult | None, str, str]:
    """``(result, reason, detail)``: the step's result, or None with ``env_error`` / ``bad_step`` and why."""
    try:
        result = env.step(text)
    except Exception as e:  # noqa: BLE001 - a misbehaving environment ends its trajectory, never the run
        return None, "env_error", f"{type(e).__name__}: {e}"
    problem = check_step(result, vocab_size)
    return (None, "bad_step", problem) if problem else (result, "", "")


def _reply_ids(reply: str | list[int] | None, encode: Callable[[str], list[int]]) -> list[int]:
    if reply is None:
        return []
    return list(encode(reply)) if isinstance(reply, str) else list(reply)


def run_episodes(session: TurnSession, envs: Sequence[Environment], records: Sequence[dict], *,
                 budget: EpisodeBudget, decode: Callable[[list[int]], str], encode: Callable[[str], list[int]],
                 prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, pad_token_id: int,
                 vocab_size: int | None = None) -> TrajectoryBatch:
    """Run one episode per row, turn by turn, all rows' turns batched; returns the trajectories.

    Every model turn is followed by one ``step`` of that row's environment on the turn's text
    (``decode``, special tokens dropped). An environment that raises, returns a bad step, or replies
    more tokens than the total budget has left ends its own trajectory (``end_reasons``, final
    reward 0 for a raise or a bad step), never the batch. With several ranks and a session whose turns
    are collectives (``any_active`` / ``idle``, see :class:`RePrefillSession`), every rank runs the same
    number of turn steps: as many as the rank with the longest-running trajectory needs.

    Args:
        session: Generates the turns (:class:`RePrefillSession` or the engine's KV-cache session).
        envs: One fresh environment per row; records: its prompt record (``reset``).
        budget: The per-trajectory budgets.
        decode: Token ids -> text of one model turn; encode: an environment's text reply -> ids (once per turn).
        prompt_ids: ``(N, P)`` left-padded prompts; prompt_mask: ``(N, P)``; pad_token_id: right-pads the batch.
        vocab_size: Checks an environment's token-id replies when given.
    """
    N = len(envs)
    episodes = [Episode() for _ in range(N)]
    active: list[int] = []
    for i, (env, rec) in enumerate(zip(envs, records, strict=True)):
        try:
            env.reset(rec)
            active.append(i)
        except Exception as e:  # noqa: BLE001
            episodes[i].end("env_error", 0.0, f"reset: {type(e).__name__}: {e}")
    appended: dict[int, list[int]] = {i: [] for i in active}
    any_active = getattr(session, "any_active", None)
    for t in range(budget.max_turns):
        # Several ranks with a collective generate: all go on while any rank has an active row (the
        # same number of turns everywhere); a rank with none idles through the turn.
        if not (active if any_active is None else any_active(bool(active))):
            break
        if not active:
            session.idle()
            continue
        caps = [min(budget.max_turn_tokens, budget.max_total_tokens - len(episodes[i].tokens)) for i in active]
        outs = session.turn(active, [appended[i] for i in active], caps)
        still: list[int] = []
        for i, (tokens, logprobs) in zip(active, outs, strict=True):
            ep = episodes[i]
            ep.add(list(tokens), True, list(logprobs))
            ep.num_turns += 1
            result, reason, detail = _safe_step(envs[i], decode(list(tokens)), vocab_size)
            if result is None:
                ep.info = {}  # a failed step has no info; an earlier step's would pass for the last one's
                ep.end(reason, 0.0, detail)
                continue
            ep.info = result.info
            if result.done:
                ep.end("done", result.reward)
            elif t == budget.max_turns - 1:
                ep.end("max_turns", result.reward)
            elif len(ep.tokens) >= budget.max_total_tokens:
                ep.end("max_total_tokens", result.reward)
            else:
                reply = _reply_ids(result.reply, encode)
                if len(ep.tokens) + len(reply) >= budget.max_total_tokens:
                    ep.end("reply_over_budget", result.reward, f"reply of {len(reply)} tokens")
                else:
                    ep.turn_rewards[len(ep.tokens) - 1] = float(result.reward)
                    ep.add(reply, False)
                    appended[i] = reply
                    still.append(i)
        active = still
    for i, e in enumerate(episodes):
        if e.end_reason in ("env_error", "bad_step", "reply_over_budget"):
            log.warning("trajectory %d ended (%s): %s", i, e.end_reason, e.detail)
    return _to_batch(episodes, prompt_ids, prompt_mask, pad_token_id)


def end_reason_counts(end_reasons: Sequence[str]) -> dict[str, float]:
    """``env_end_<reason>``: how many trajectories ended for each reason of :data:`END_REASONS`."""
    return {f"env_end_{r}": float(sum(1 for x in end_reasons if x == r)) for r in END_REASONS}
