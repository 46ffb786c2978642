"""What a rollout is made of: generated responses with their masks, and the tensors scored from them.

:func:`generate_responses` is the one home of "generate, then the response mask, then the attention
mask of prompt + response": every online algorithm's rollout, ReMax's greedy baseline and the
evaluation of a policy (``rlhf_cli.evaluation``) call it, so the masks are built one way everywhere.

Shapes: ``N`` rows, ``P`` prompt columns (left-padded), ``R`` response columns.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .protocols import TrainablePolicy

__all__ = ["AdvantageEstimate", "Experience", "GeneratedBatch", "generate_responses", "response_mask_from"]


def response_mask_from(sequences: torch.Tensor, prompt_len: int, eos_token_id: int | None) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after. (B, R) float."""
    resp = sequences[:, prompt_len:]
    if eos_token_id is None:
        return torch.ones_like(resp, dtype=torch.float32)
    is_eos = (resp == eos_token_id).long()
    before_or_at_first_eos = (is_eos.cumsum(dim=1) - is_eos) == 0
    return before_or_at_first_eos.float()


@dataclass(frozen=True, eq=False)
class GeneratedBatch:
    """Responses to a batch of left-padded prompts, with the masks every scorer needs (all on the CPU).

    Attributes:
        sequences: ``(N, P + R)`` prompts and responses; rows that stopped early are padded after their EOS.
        attention_mask: ``(N, P + R)`` int64: the prompt's mask, then ``response_mask``.
        response_mask: ``(N, R)`` float32, 1 up to and including the first EOS.
        prompt_len: ``P``.
        logprobs: ``(N, R)`` float32, the generator's own log-probs of its tokens (0 after EOS), when
            asked for with ``return_logprobs=True``; else None.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    prompt_len: int
    logprobs: torch.Tensor | None = None


def generate_responses(policy: TrainablePolicy, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                       max_new_tokens: int, eos_token_id: int | None, pad_token_id: int | None,
                       do_sample: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                       return_logprobs: bool = False) -> GeneratedBatch:
    """Generate responses to left-padded prompts ``(N, P)`` and build their masks.

    The sampling arguments go to ``policy.generate`` unchanged (their defaults are the
    :class:`~rlhf_algos.protocols.TrainablePolicy` ones). Generation draws from torch's global RNG
    when ``do_sample``; greedy decoding draws nothing.

    Args:
        policy: Generates (``rlhf_hybrid.HybridEngine`` or a ``rlhf_algos.testing`` double).
        prompt_ids: ``(N, P)`` left-padded prompt ids.
        prompt_mask: ``(N, P)`` 1 on prompt tokens.
        max_new_tokens: Response length limit.
        eos_token_id: Ends a response (its token is part of the response); None: no EOS.
        pad_token_id: Pads the rows that finished early.
        do_sample: Sample (True) or decode greedily.
        temperature: Sampling temperature.
        top_k: Top-k filter (0 = off).
        top_p: Nucleus filter (1.0 = off).
        return_logprobs: Also keep the generator's log-probs of its tokens in ``GeneratedBatch.logprobs``.

    Returns:
        A :class:`GeneratedBatch`.
    """
    out = policy.generate(prompt_ids, prompt_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, return_logprobs=return_logprobs)
    seqs, logprobs = out if return_logprobs else (out, None)
    seqs = seqs.cpu()
    if logprobs is not None:
        logprobs = logprobs.float().cpu()
    P = prompt_ids.shape[1]
    resp_mask = response_mask_from(seqs, P, eos_token_id)  # (N, R)
    attn = torch.cat([prompt_mask.cpu().long(), resp_mask.long()], dim=1)  # (N, P + R)
    return GeneratedBatch(seqs, attn, resp_mask, P, logprobs)


@dataclass
class Experience:
    """The one record of a rollout batch: what was sampled, how it scored, and its advantages.

    Built by :meth:`~rlhf_algos.base.OnlineAlgorithm.generate_experience` in two steps: the
    sampled and scored fields first, then the advantage estimator (:mod:`rlhf_algos.advantages`)
    reads it and fills ``rewards``, ``kl``, ``advantages`` and ``returns``. All on the CPU, float32;
    ``N = B * samples_per_prompt`` rows, the samples of one prompt contiguous.

    Attributes:
        prompt_ids: ``(N, P)`` left-padded prompts, already repeated ``samples_per_prompt`` times.
        prompt_mask: ``(N, P)``.
        meta: ``N`` per-row dicts for the reward function.
        sequences: ``(N, P + R)`` prompts and sampled responses.
        attention_mask: ``(N, P + R)``.
        prompt_len: ``P``.
        response_mask: ``(N, R)`` 1 up to and including the first EOS.
        logprobs: ``(N, R)`` actor log-probs at sampling time, 0 on padding.
        ref_logprobs: ``(N, R)`` reference log-probs, 0 on padding.
        values: ``(N, R)`` critic values ``V(s_t)``, 0 on padding (zeros without a critic).
        scores: ``(N,)`` sequence scores as the reward function returned them (``reward_mean``).
        train_scores: ``(N,)`` the scores the advantages are computed from: ``scores`` clipped to
            ``±clip_reward``, then whitened over the batch when ``reward_norm == "batch"``.
        sample_logprobs: ``(N, R)`` the generator's own log-probs of its tokens (0 after EOS), for
            the sampling/training mismatch metrics; None when not recorded.
        monitor_scores: ``(N,)`` scores of the algorithm's ``monitor_fn`` (logged, never trained
            on); None without one.
        baseline_scores: ``(N,)`` a per-row baseline scored during the rollout, processed like
            ``train_scores`` (ReMax: the greedy response's score; multi-turn: the greedy episode's return,
            its final reward processed plus its turn rewards); None when the algorithm has none.
        rewards: ``(N, R)`` per-token rewards (KL-shaped when ``kl_placement == "reward"``).
        kl: ``(N, R)`` per-token KL estimate with the configured estimator.
        advantages: ``(N, R)`` what the policy loss multiplies the ratio by.
        returns: ``(N, R)`` value targets (PPO) or discounted returns (critic-free).
        turn_rewards: ``(N, R)`` multi-turn only (:mod:`rlhf_algos.multiturn`): each non-final turn's
            reward at its last model token; there ``response_mask`` is the loss mask (1 on the model's
            tokens only, 0 on the environment's) and ``attention_mask`` is 1 on every real token.
        end_reasons: ``N`` multi-turn only: why each trajectory ended (``rlhf_algos.environments.END_REASONS``).
        num_turns: ``(N,)`` multi-turn only: model turns per trajectory.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    meta: list[dict]
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    train_scores: torch.Tensor
    sample_logprobs: torch.Tensor | None = None
    monitor_scores: torch.Tensor | None = None
    baseline_scores: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    turn_rewards: torch.Tensor | None = None
    end_reasons: list[str] | None = None
    num_turns: torch.Tensor | None = None

    def rows(self, idx: list[int]) -> Experience:
        """The rows ``idx`` (a micro-batch), every per-row field indexed alike."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                v = v[idx]
            elif isinstance(v, list):
                v = [v[i] for i in idx]
            out[f.name] = v
        return Experience(**out)

    def with_estimate(self, est: AdvantageEstimate) -> Experience:
        """A copy with ``rewards``, ``kl``, ``advantages`` and ``returns`` from an estimator's output."""
        return replace(self, rewards=est.rewards, kl=est.kl, advantages=est.advantages, returns=est.returns)


@dataclass(frozen=True, eq=False)
class AdvantageEstimate:
    """What an advantage estimator returns (:mod:`rlhf_algos.advantages`); all ``(N, R)``, 0 on padding.

    Attributes:
        rewards: Per-token rewards (KL-shaped when ``kl_placement == "reward"``).
        kl: Per-token KL estimate (for metrics; in the reward or the loss, depending on config).
        advantages: What the policy loss multiplies the ratio by.
        returns: Value targets (PPO) or discounted returns (critic-free).
    """

    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
