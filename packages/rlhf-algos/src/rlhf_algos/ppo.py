"""PPO for RLHF (Ouyang et al. 2022; Schulman et al. 2017), as in DeepSpeed-Chat step 3.

The recipe of one iteration, top to bottom:

1. generate responses to a batch of prompts with the actor (sampling);
2. score them: actor and reference log-probs, critic values, the sequence reward;
3. shape per-token rewards: -beta * KL(actor || ref) on every token, clipped score on the last;
4. estimate advantages and returns with GAE (optionally whiten the advantages);
5. for ``ppo_epochs`` passes over micro-batches: clipped policy loss -> actor step, clipped value
   loss -> critic step.

The math lives in :mod:`rlhf_algos.functional`; this class only does the plumbing.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from . import functional as F
from .protocols import RewardFunction, ScoringPolicy, TrainablePolicy, ValueFunction


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (defaults follow DeepSpeed-Chat / InstructGPT where they exist).

    Attributes:
        kl_coef: beta of the per-token KL penalty in the reward.
        kl_estimator: KL estimator in the reward: ``k1`` (log-ratio), ``k2`` or ``k3``.
        clip_reward: the sequence score is clipped to [-clip_reward, clip_reward].
        gamma: GAE discount.
        lam: GAE lambda.
        clip_eps: policy-ratio clip range.
        value_clip_eps: value clip range around the rollout-time values.
        ppo_epochs: passes over each rollout batch.
        micro_batch_size: rows per forward/backward in the learning phase.
        whiten_advantages: normalise advantages to mean 0 / std 1 over the batch's valid tokens.
        max_new_tokens: response length limit.
        temperature: sampling temperature (log-probs use the same temperature).
        top_k: top-k sampling (0 = off).
        top_p: nucleus sampling (1.0 = off).
    """

    kl_coef: float = 0.1
    kl_estimator: str = "k1"
    clip_reward: float = 5.0
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip_eps: float = 0.2
    ppo_epochs: int = 1
    micro_batch_size: int = 32
    whiten_advantages: bool = True
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"ppo.kl_estimator: {self.kl_estimator!r} is not allowed; allowed: 'k1', 'k2', 'k3'")
        for name in ("kl_coef", "clip_reward", "clip_eps", "value_clip_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"ppo.{name}: must be >= 0, got {getattr(self, name)!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ppo.{name}: must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("ppo_epochs", "micro_batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.temperature <= 0:
            raise ValueError(f"ppo.temperature: must be > 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"ppo.top_p: must be in (0, 1], got {self.top_p!r}")


@dataclass
class Experience:
    """One rollout batch. Response-aligned tensors are (B, R); ``sequences`` is (B, P + R)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def rows(self, idx: list[int]) -> Experience:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, torch.Tensor) else v
        return Experience(**out)


def response_mask_from(sequences: torch.Tensor, prompt_len: int, eos_token_id: int | None) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after. (B, R) float."""
    resp = sequences[:, prompt_len:]
    if eos_token_id is None:
        return torch.ones_like(resp, dtype=torch.float32)
    is_eos = (resp == eos_token_id).long()
    before_or_at_first_eos = (is_eos.cumsum(dim=1) - is_eos) == 0
    return before_or_at_first_eos.float()


class PPO:
    """PPO with a critic. See the module docstring for the recipe."""

    name = "ppo"
    data_kind = "prompts"
    required_models = ("actor", "reference", "critic", "reward")
    config_class = PPOConfig

    def __init__(self, config: PPOConfig, actor: TrainablePolicy, reference: ScoringPolicy,
                 critic: ValueFunction, reward_fn: RewardFunction, *, eos_token_id: int | None,
                 pad_token_id: int, reduce_metrics: Callable[[dict], dict] | None = None,
                 seed: int = 0) -> None:
        self.config = config
        self.actor, self.reference, self.critic, self.reward_fn = actor, reference, critic, reward_fn
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.reduce_metrics = reduce_metrics or (lambda m: m)
        self._rng = random.Random(seed)

    # 1-4: rollout and scoring --------------------------------------------------------------
    @torch.no_grad()
    def generate_experience(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            meta: list[dict] | None = None) -> Experience:
        """Sample responses to left-padded prompts (B, P) and score them into an :class:`Experience`."""
        c = self.config
        self.actor.eval()
        self.critic.eval()
        # 1. generate
        seqs = self.actor.generate(prompt_ids, prompt_mask, max_new_tokens=c.max_new_tokens, do_sample=True,
                                   temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                   eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id).cpu()
        P = prompt_ids.shape[1]
        resp_mask = response_mask_from(seqs, P, self.eos_token_id)  # (B, R)
        attn = torch.cat([prompt_mask.cpu().long(), resp_mask.long()], dim=1)  # (B, P + R)
        # 2. score
        logprobs = self.actor.token_logprobs(seqs, attn, P, temperature=c.temperature).float().cpu()
        ref_logprobs = self.reference.token_logprobs(seqs, attn, P, temperature=c.temperature).float().cpu()
        values = self.critic.values(seqs, attn)[:, P - 1 : -1].float().cpu()  # V(s_t) before token t
        scores = self.reward_fn(seqs, attn, P, meta or [{} for _ in range(len(seqs))]).float().cpu()
        # 3. per-token reward with the KL penalty
        shaped = F.kl_shaped_rewards(scores, logprobs, ref_logprobs, resp_mask, kl_coef=c.kl_coef,
                                     clip_reward=c.clip_reward, estimator=c.kl_estimator)
        # 4. advantages
        adv = F.gae(shaped.rewards, values * resp_mask, resp_mask, gamma=c.gamma, lam=c.lam)
        advantages = F.whiten(adv.advantages, resp_mask) if c.whiten_advantages else adv.advantages
        return Experience(seqs, attn, P, resp_mask, logprobs * resp_mask, ref_logprobs * resp_mask,
                          values * resp_mask, scores, shaped.rewards, shaped.kl, advantages, adv.returns)

    # 5: learning ---------------------------------------------------------------------------
    def learn(self, exp: Experience) -> dict[str, float]:
        """PPO epochs over micro-batches of ``exp``; returns averaged metrics."""
        c = self.config
        self.actor.train()
        self.critic.train()
        B = exp.sequences.shape[0]
        # Metrics stay tensors until the end: one host-device sync per learn() call, not per step.
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for _ in range(c.ppo_epochs):
            order = list(range(B))
            self._rng.shuffle(order)
            for i in range(0, B, c.micro_batch_size):
                mb = exp.rows(order[i : i + c.micro_batch_size])
                P = mb.prompt_len
                logprobs, entropy = self.actor.token_logprobs(mb.sequences, mb.attention_mask, P,
                                                              temperature=c.temperature, return_entropy=True)
                mask = mb.response_mask.to(logprobs.device)
                pl = F.ppo_policy_loss(logprobs, mb.logprobs.to(logprobs.device), mb.advantages.to(logprobs.device),
                                       mask, clip_eps=c.clip_eps)
                self.actor.backward(pl.loss)
                self.actor.step()
                values = self.critic.values(mb.sequences, mb.attention_mask)[:, P - 1 : -1]
                vmask = mask.to(values.device)
                vl = F.ppo_value_loss(values, mb.values.to(values.device), mb.returns.to(values.device), vmask,
                                      clip_eps=c.value_clip_eps)
                self.critic.backward(vl.loss)
                self.critic.step()
                step = {
                    "policy_loss": pl.loss.detach().float(),
                    "value_loss": vl.loss.detach().float(),
                    "clip_frac": pl.clip_frac.float(),
                    "approx_kl": pl.approx_kl.float(),
                    "value_clip_frac": vl.clip_frac.float(),
                    "entropy": F.masked_mean(entropy.detach().float(), mask),
                }
                for k, v in step.items():
                    sums[k] = sums[k] + v if k in sums else v
                n += 1
        metrics = {k: float(v) / max(n, 1) for k, v in sums.items()}
        metrics.update(self.rollout_metrics(exp))
        return self.reduce_metrics(metrics)

    @staticmethod
    def rollout_metrics(exp: Experience) -> dict[str, float]:
        m = exp.response_mask
        return {
            "reward_mean": exp.scores.mean().item(),
            "reward_std": exp.scores.std().item() if exp.scores.numel() > 1 else 0.0,
            "kl_to_ref": (exp.kl * m).sum(dim=1).mean().item(),  # per sequence, estimator of the config
            "response_length": m.sum(dim=1).mean().item(),
            "advantage_mean": F.masked_mean(exp.advantages, m).item(),
            "advantage_std": F.masked_var(exp.advantages, m).sqrt().item(),
            "return_mean": F.masked_mean(exp.returns, m).item(),
            "value_mean": F.masked_mean(exp.values, m).item(),
            "explained_variance": float(F.explained_variance(exp.values, exp.returns, m)),
        }
