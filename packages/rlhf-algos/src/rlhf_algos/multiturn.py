"""Online algorithms on multi-turn trajectories: the rollout against an environment as an :class:`Experience`.

Attach an :class:`EnvRollout` to any online algorithm (PPO, GRPO, Dr. GRPO, RLOO, REINFORCE++)::

    algo.env_rollout = EnvRollout(env_factory, EpisodeBudget(...), decode=..., encode=...)

and its ``generate_experience`` runs episodes (:func:`~rlhf_algos.trajectories.run_episodes`)
instead of one generation. The experience is the one every algorithm learns from, with:

* ``sequences``: prompt, then model and environment tokens as one sequence;
* ``attention_mask``: 1 on every real token (the environment's tokens are context);
* ``response_mask``: the loss mask, 1 on the model's tokens only, so the policy loss, the KL, the
  critic loss and every advantage live on model tokens only (:mod:`rlhf_algos.advantages`);
* ``scores``: the final reward (of the step that ended the episode), trained at the last model token;
  ``turn_rewards``: each earlier turn's reward at the end of its turn;
* ``sample_logprobs``: the sampler's log-probs, checked against the recomputation
  (``gen_kl_error``, ``gen_logprob_gap_max``) as for single-turn rollouts.

An algorithm with a rollout baseline (``baseline_scores``, ReMax's greedy response) gets it here when
it declares ``env_baseline = True`` (ReMax: :meth:`EnvRollout.greedy_returns`, a greedy episode per
prompt through the same environment and budget); any other is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .environments import Environment, EpisodeBudget
from .rollout import Experience
from .trajectories import TrajectoryBatch, end_reason_counts, make_session, run_episodes

__all__ = ["EnvRollout", "env_metrics"]


@dataclass(frozen=True)
class EnvRollout:
    """How an online algorithm rolls out against an environment.

    Attributes:
        env_factory: A fresh environment per trajectory (a registered class, or a closure over its options).
        budget: Per-trajectory budgets.
        decode: Token ids of one model turn -> text (e.g. ``tokenizer.decode(ids, skip_special_tokens=True)``).
        encode: An environment's text reply -> token ids, once per turn (e.g. ``tokenizer.encode(text,
            add_special_tokens=False)``).
        vocab_size: Checks environments' token-id replies when given.
    """

    env_factory: Callable[[], Environment]
    budget: EpisodeBudget
    decode: Callable[[list[int]], str]
    encode: Callable[[str], list[int]]
    vocab_size: int | None = None

    @torch.no_grad()
    def experience(self, algo: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   meta: list[dict]) -> Experience:
        """``algo.generate_experience`` on episodes: the prompts already repeated ``samples_per_prompt`` times."""
        has_baseline = _overrides(type(algo), "baseline_scores")
        if has_baseline and not getattr(algo, "env_baseline", False):
            raise ValueError(f"{algo.name}: a rollout baseline (baseline_scores) is single-turn; "
                             "not supported with an environment")
        c = algo.config
        # 2. episodes, keeping the generator's own log-probs of the model's tokens
        batch = self._episodes(algo, prompt_ids, prompt_mask, meta, do_sample=True)
        seqs, attn, P, mask = batch.sequences, batch.attention_mask, batch.prompt_len, batch.loss_mask
        # 3. score on the model's tokens (eval mode, the weights that sampled)
        logprobs, ref_logprobs, values = algo.score_tokens(seqs, attn, P)
        exp = Experience(prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(), meta=meta, sequences=seqs,
                         attention_mask=attn, prompt_len=P, response_mask=mask, logprobs=logprobs * mask,
                         ref_logprobs=ref_logprobs * mask, values=values * mask, scores=batch.scores,
                         train_scores=algo.process_scores(batch.scores), sample_logprobs=batch.sample_logprobs,
                         turn_rewards=batch.turn_rewards * mask, end_reasons=batch.end_reasons,
                         num_turns=batch.num_turns)
        if has_baseline:  # e.g. ReMax: the greedy episode's return (greedy_returns)
            exp.baseline_scores = algo.baseline_scores(exp)
        # 4. advantages over model tokens only
        return exp.with_estimate(algo.advantage_estimator(exp, c))

    @torch.no_grad()
    def greedy_returns(self, algo: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       meta: list[dict]) -> torch.Tensor:
        """The return ``(B,)`` of one greedy episode per prompt (ReMax's baseline, multi-turn): through the
        same environment (a fresh instance per prompt) and budget as the sampled episodes; the final reward
        processed as ``train_scores`` (``algo.process_scores``: clipped), plus the turn rewards.

        Greedy decoding draws no random numbers, so the sampled episodes are the same as without it.
        """
        batch = self._episodes(algo, prompt_ids, prompt_mask, meta, do_sample=False)
        return algo.process_scores(batch.scores) + batch.turn_rewards.sum(dim=1)

    def _episodes(self, algo: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, meta: list[dict], *,
                  do_sample: bool) -> TrajectoryBatch:
        c = algo.config
        return self.episodes(algo.actor, prompt_ids, prompt_mask, meta, eos_token_id=algo.eos_token_id,
                             pad_token_id=algo.pad_token_id, do_sample=do_sample, temperature=c.temperature,
                             top_k=c.top_k, top_p=c.top_p)

    def episodes(self, policy: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, meta: list[dict], *,
                 eos_token_id: int | None, pad_token_id: int, do_sample: bool, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0) -> TrajectoryBatch:
        """One episode per prompt row of ``policy`` against a fresh environment each (the rollout's and the
        held-out evaluation's one driver); ``meta`` gets the decoded prompt as ``"prompt"``."""
        session = make_session(policy, prompt_ids, prompt_mask, max_total_tokens=self.budget.max_total_tokens,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, do_sample=do_sample,
                               temperature=temperature, top_k=top_k, top_p=top_p)
        records = [{**m, "prompt": self.decode(row[mk.bool()].tolist())}
                   for m, row, mk in zip(meta, prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        batch = run_episodes(session, [self.env_factory() for _ in meta], records, budget=self.budget,
                             decode=self.decode, encode=self.encode, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                             pad_token_id=pad_token_id, vocab_size=self.vocab_size)
        del session  # the KV cache (and ZeRO-3 gathered weights) go before scoring
        return batch


def _overrides(cls: type, method: str) -> bool:
    from .base import OnlineAlgorithm

    return getattr(cls, method) is not getattr(OnlineAlgorithm, method)


def env_metrics(exp: Experience) -> dict[str, torch.Tensor]:
    """Rollout metrics of a multi-turn experience: ``env_turns_mean``, ``env_tokens_mean`` (environment
    tokens per trajectory) and ``env_end_<reason>`` (trajectories that ended for each reason)."""
    env_tokens = exp.attention_mask[:, exp.prompt_len:].float().sum(1) - exp.response_mask.sum(1)
    out = {"env_turns_mean": exp.num_turns.float().mean(), "env_tokens_mean": env_tokens.mean()}
    out.update({k: torch.tensor(v) for k, v in end_reason_counts(exp.end_reasons).items()})
    return out
