"""The interface every algorithm implements, and the shared online plumbing.

An algorithm is one class registered under the entry-point group ``rlhf.algorithms`` (the
built-ins register exactly like a third-party plugin). The class declares, as class variables,
what the CLI needs to build everything for it:

* ``name``: the registered name (``rlhf run --stage <name>``);
* ``kind``: ``"online"`` (samples from the policy, learns from rewards), ``"offline"`` (learns
  from a fixed preference data set), ``"supervised"`` (SFT on demonstrations) or
  ``"reward_model"`` (trains a reward model on preference pairs);
* ``data_kind``: ``"prompts"`` (left-padded prompts), ``"pairs"`` (chosen/rejected pairs) or
  ``"demonstrations"`` (prompt + response);
* ``required_models``: a subset of ``("actor", "reference", "critic", "reward")``;
* ``config_class``: a frozen dataclass of hyper-parameters; each field carries its help text in
  ``field.metadata["help"]`` and ``__post_init__`` raises ``ValueError`` naming
  ``<name>.<field>``, the value and what is allowed;
* ``description``: one line for ``rlhf algos list``.

Base classes do the plumbing, so that a variant only writes its math:

* :class:`OnlineAlgorithm` (here): one rollout path for every online algorithm (repeat prompts
  ``samples_per_prompt`` times, generate, score, estimate advantages) and one learning loop
  (clipped policy loss with the configured aggregation, optional KL in the loss, micro-batches,
  epochs). An algorithm declares its ``advantage_estimator`` (:mod:`rlhf_algos.advantages`):
  composed, not inherited; a user can pass another to the constructor.
* :class:`~rlhf_algos.offline.OfflineAlgorithm`: forward the chosen and rejected rows, compute a
  loss from sequence log-probs, step. Subclasses override ``compute_loss``.

SFT (:class:`~rlhf_algos.sft.SFT`) and reward-model training (:class:`~rlhf_algos.reward_model.RM`)
are algorithms of the same interface, so every stage of the pipeline runs from Python.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from . import functional as F
from ._padding_free import learn_logprobs, learn_values
from ._stats import _zero_invalid
from .advantages import AdvantageEstimator

# Configs (config.py), rollout records (rollout.py) and the offline base (offline.py, imported at the
# end of this module) live in their own modules; they are re-exported here (see __all__), so
# `from rlhf_algos.base import OnlineConfig, Experience, OfflineAlgorithm, ...` keeps working.
from .config import KL_PLACEMENTS, REWARD_NORMS, AlgorithmConfig, OfflineConfig, OnlineConfig, option
from .health import monitor_metrics, pool_agreement, sampling_mismatch
from .protocols import RewardFunction, ScoringPolicy, TrainablePolicy, ValueFunction
from .rollout import AdvantageEstimate, Experience, generate_responses, response_mask_from

__all__ = [
    "KL_PLACEMENTS",
    "MODEL_ROLES",
    "REWARD_NORMS",
    "AdvantageEstimate",
    "Algorithm",
    "AlgorithmConfig",
    "Experience",
    "OfflineAlgorithm",
    "OfflineConfig",
    "OnlineAlgorithm",
    "OnlineConfig",
    "option",
    "response_mask_from",
]

MODEL_ROLES: tuple[str, ...] = ("actor", "reference", "critic", "reward")


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Algorithm:
    """What every registered algorithm declares. See the module docstring for each field."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "online" | "offline" | "supervised" | "reward_model"
    data_kind: ClassVar[str]  # "prompts" | "pairs" | "demonstrations"
    required_models: ClassVar[tuple[str, ...]]
    config_class: ClassVar[type]
    description: ClassVar[str]

    config: Any

    def _check_config(self, config: Any) -> None:
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__}: config must be a {self.config_class.__name__}, "
                            f"got {type(config).__name__}")

    def _init_config(self, config: Any, reduce_metrics: Callable[[dict], dict] | None) -> None:
        """What every built-in ``__init__`` starts with: check ``config`` (``TypeError``), keep it, and keep
        ``reduce_metrics`` (the identity when None)."""
        self._check_config(config)
        self.config = config
        self.reduce_metrics = reduce_metrics or (lambda m: m)

    def learn(self, batch: Any) -> dict[str, float]:
        """One learning step (offline, supervised, reward model) or phase (online); returns metrics as plain floats."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The algorithm's own state beyond its engines' (which save themselves), for an exact resume; {} here."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _class_estimator(cls: type) -> AdvantageEstimator:
    """The ``advantage_estimator`` declared by ``cls`` or its nearest base.

    Read from the class ``__dict__`` so that a plain function declared as the class variable is
    not bound as a method.
    """
    for klass in cls.__mro__:
        if "advantage_estimator" in klass.__dict__:
            return klass.__dict__["advantage_estimator"]
    raise TypeError(f"{cls.__name__}: an online algorithm must declare advantage_estimator "
                    "(see rlhf_algos.advantages) or be given one")


def _to_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Detached 0-dim tensors -> floats with one host-device sync per device (usually one)."""
    by_device: dict[torch.device, list[str]] = {}
    for k, v in metrics.items():
        by_device.setdefault(v.device, []).append(k)
    out: dict[str, float] = {}
    for keys in by_device.values():
        # This is the sync point: everything before it stayed on the device.
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()
        out.update(zip(keys, values, strict=True))
    return {k: out[k] for k in metrics}


# --------------------------------------------------------------------------------------------
# Online: one rollout path, one learning loop
# --------------------------------------------------------------------------------------------


class OnlineAlgorithm(Algorithm):
    """Shared plumbing of the online algorithms; each declares its ``advantage_estimator``.

    One iteration, top to bottom:

    1. repeat each prompt ``samples_per_prompt`` times (``repeat_interleave``: the samples of one
       prompt are contiguous rows, which is the layout the group estimators expect);
    2. generate responses with the actor (sampling);
    3. score them: actor and reference log-probs, critic values (PPO), the sequence score;
       clip the score and optionally whiten it over the batch (``reward_norm``);
    4. estimate advantages (the one step the algorithms differ in);
    5. ``ppo_epochs`` passes over shuffled micro-batches: clipped policy loss (+ ``kl_coef`` *
       KL when ``kl_placement == "loss"``, + ``ptx_coef`` * the SFT loss of the next batch of
       ``ptx_batches`` when ``ptx_coef > 0``) -> actor step; the critic step, for PPO. The actor's and
       the critic's forwards run on the rollout's padded rows or, with a packed ``batch_layout``, on
       the same tokens packed padding-free (:meth:`learn_logprobs`, :meth:`learn_values`).

    Args:
        config: An instance of ``config_class``.
        actor: The policy being trained.
        reference: The frozen reference policy.
        reward_fn: Sequence-level reward (a reward model's score or a verifier).
        monitor_fn: Optional second sequence-level scorer with ``reward_fn``'s signature (e.g. a
            verifier while training on a reward model), called on every rollout and only logged:
            ``verifier_score_rollout`` and ``rm_verifier_agreement`` (see :meth:`learn`).
        critic: The value model; required exactly when ``"critic" in required_models``.
        eos_token_id: Ends a response (its token is part of the response); None: no EOS.
        pad_token_id: Pads finished rows.
        reduce_metrics: Applied to the metrics dict before it is returned (e.g. an all-reduce
            mean over ranks).
        seed: Seeds the micro-batch shuffling.
        advantage_estimator: Replaces the class's ``advantage_estimator`` for this instance: any
            ``(experience, config) -> AdvantageEstimate`` (:mod:`rlhf_algos.advantages`).
        ptx_batches: With ``ptx_coef > 0``, an endless iterator of collated SFT batches
            (``rlhf_data.collate_sft``): one is drawn per actor step (:meth:`actor_steps` per
            :meth:`learn`, so a resumed run can replay the position). Unused with ``ptx_coef == 0``.

    Raises:
        TypeError: If ``config`` is not a ``config_class``.
        ValueError: If a critic is required and missing, or given and not used; if ``ptx_coef > 0``
            without ``ptx_batches``.
    """

    # Step 4, declared by each algorithm (e.g. PPO: advantages.GAEEstimator(); GRPO: advantages.GROUP_NORMALIZED).
    advantage_estimator: ClassVar[AdvantageEstimator]
    kind: ClassVar[str] = "online"
    data_kind: ClassVar[str] = "prompts"
    required_models: ClassVar[tuple[str, ...]] = ("actor", "reference", "reward")
    config_class: ClassVar[type] = OnlineConfig
    # Multi-turn rollouts against an environment (rlhf_algos.multiturn.EnvRollout); None: one generation.
    env_rollout: Any = None
    # Whether baseline_scores handles multi-turn experiences (env_rollout set); if not, an environment is refused.
    env_baseline: ClassVar[bool] = False

    def __init__(self, config: OnlineConfig, *, actor: TrainablePolicy, reference: ScoringPolicy,
                 reward_fn: RewardFunction, critic: ValueFunction | None = None, eos_token_id: int | None,
                 pad_token_id: int, reduce_metrics: Callable[[dict], dict] | None = None,
                 seed: int = 0, monitor_fn: RewardFunction | None = None,
                 advantage_estimator: AdvantageEstimator | None = None,
                 ptx_batches: Iterator[dict[str, torch.Tensor]] | None = None) -> None:
        self._init_config(config, reduce_metrics)
        if config.ptx_coef > 0 and ptx_batches is None:
            raise ValueError(f"{self.name}: ptx_coef={config.ptx_coef} needs ptx_batches (SFT batches to mix in)")
        self.ptx_batches = ptx_batches
        self.advantage_estimator: AdvantageEstimator = advantage_estimator or _class_estimator(type(self))
        needs_critic = "critic" in self.required_models
        if needs_critic and critic is None:
            raise ValueError(f"{self.name}: a critic is required (required_models={self.required_models})")
        if not needs_critic and critic is not None:
            raise ValueError(f"{self.name}: takes no critic (required_models={self.required_models})")
        self.actor, self.reference, self.critic, self.reward_fn = actor, reference, critic, reward_fn
        self.monitor_fn = monitor_fn
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self._rng = random.Random(seed)

    def state_dict(self) -> dict[str, Any]:
        """The micro-batch shuffling RNG's state (the engines and the global RNGs are saved by the caller)."""
        return {"rng": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(state["rng"])

    # 1-4: rollout and scoring --------------------------------------------------------------
    @torch.no_grad()
    def generate_experience(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                            meta: list[dict] | None = None) -> Experience:
        """Sample ``samples_per_prompt`` responses to each left-padded prompt ``(B, P)`` and score them.

        Returns:
            An :class:`Experience` of ``B * samples_per_prompt`` rows, groups contiguous.
        """
        c = self.config
        meta = meta or [{} for _ in range(len(prompt_ids))]
        # 1. one row per sample; groups contiguous
        k = c.samples_per_prompt
        if k > 1:
            prompt_ids = prompt_ids.repeat_interleave(k, dim=0)  # (B * k, P)
            prompt_mask = prompt_mask.repeat_interleave(k, dim=0)
            meta = [m for m in meta for _ in range(k)]
        self.actor.eval()
        if self.critic is not None:
            self.critic.eval()
        if self.env_rollout is not None:  # 2-4 on episodes against an environment (rlhf_algos.multiturn)
            return self.env_rollout.experience(self, prompt_ids, prompt_mask, meta)
        # 2. generate, keeping the generator's own log-probs (to check them against the recomputation)
        gen = generate_responses(self.actor, prompt_ids, prompt_mask, max_new_tokens=c.max_new_tokens,
                                 do_sample=True, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p,
                                 eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
                                 return_logprobs=True)
        seqs, sample_logprobs, P = gen.sequences, gen.logprobs, gen.prompt_len
        resp_mask, attn = gen.response_mask, gen.attention_mask  # (N, R), (N, P + R)
        # 3. score (eval mode, the weights that sampled: the recomputation must match the sampler)
        logprobs, ref_logprobs, values = self.score_tokens(seqs, attn, P)
        scores = self.reward_fn(seqs, attn, P, meta).float().cpu()  # (N,)
        monitor = None if self.monitor_fn is None else self.monitor_fn(seqs, attn, P, meta).float().cpu()  # (N,)
        exp = Experience(prompt_ids=prompt_ids.cpu(), prompt_mask=prompt_mask.cpu(), meta=meta, sequences=seqs,
                         attention_mask=attn, prompt_len=P, response_mask=resp_mask, logprobs=logprobs * resp_mask,
                         ref_logprobs=ref_logprobs * resp_mask, values=values * resp_mask,
                         scores=scores, train_scores=self.process_scores(scores), sample_logprobs=sample_logprobs * resp_mask,
                         monitor_scores=monitor)
        exp.baseline_scores = self.baseline_scores(exp)
        # 4. advantages: the one step the algorithms differ in
        return exp.with_estimate(self.advantage_estimator(exp, c))

    def score_tokens(self, seqs: torch.Tensor, attn: torch.Tensor, P: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per response token (N, R), on the CPU in fp32: the actor's and the reference's log-probs at the
        sampling temperature, and the critic's V(s_t) before each token (zeros without a critic). Call in eval
        mode with the weights that sampled: the recomputation must match the sampler."""
        t = self.config.temperature
        logprobs = self.actor.token_logprobs(seqs, attn, P, temperature=t).float().cpu()
        ref_logprobs = self.reference.token_logprobs(seqs, attn, P, temperature=t).float().cpu()
        if self.critic is not None:
            values = self.critic.values(seqs, attn)[:, P - 1 : -1].float().cpu()  # V(s_t) before token t
        else:
            values = torch.zeros_like(logprobs)
        return logprobs, ref_logprobs, values

    def process_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Clip the sequence scores ``(N,)`` to ``±clip_reward``, then whiten them if ``reward_norm == "batch"``."""
        c = self.config
        if c.clip_reward is not None:
            scores = scores.clamp(-c.clip_reward, c.clip_reward)
        if c.reward_norm == "batch":
            scores = F.whiten(scores, torch.ones_like(scores))
        return scores

    def baseline_scores(self, exp: Experience) -> torch.Tensor | None:
        """A per-row baseline ``(N,)`` scored during the rollout (``exp.baseline_scores``); None here.

        Runs inside :meth:`generate_experience` (no grad, actor in eval mode), after the scores and
        before the advantage estimator. ReMax overrides it with its greedy response's score.
        """
        return None

    # 5: learning ---------------------------------------------------------------------------
    def actor_steps(self, rows: int) -> int:
        """Actor steps (micro-batches) one :meth:`learn` takes on a rollout of ``rows`` rows:
        ``ppo_epochs * ceil(rows / micro_batch_size)``; with ``ptx_coef > 0``, ptx batches drawn."""
        return self.config.ppo_epochs * math.ceil(rows / self.config.micro_batch_size)

    def learn(self, exp: Experience) -> dict[str, float | None]:
        """``ppo_epochs`` passes over shuffled micro-batches of ``exp``; returns averaged metrics.

        With a ``monitor_fn``, ``rm_verifier_agreement`` is the pooled fraction over every rank's
        (monitor-correct, monitor-incorrect) pairs (each rank's pairs, not pairs across ranks), None
        when no rank has such a pair.
        """
        c = self.config
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        N = exp.sequences.shape[0]
        # Metrics stay tensors until the end: one host-device sync per learn() call, not per step.
        sums: dict[str, torch.Tensor] = {}
        n = 0
        for _ in range(c.ppo_epochs):
            order = list(range(N))
            self._rng.shuffle(order)
            for i in range(0, N, c.micro_batch_size):
                step = self.train_step(exp.rows(order[i : i + c.micro_batch_size]))
                for k, v in step.items():
                    sums[k] = sums[k] + v if k in sums else v
                n += 1
        rollout = self.rollout_metrics(exp)
        floats = _to_floats({**sums, **rollout})  # the one host-device sync
        metrics = {k: floats[k] / max(n, 1) for k in sums}
        metrics.update({k: floats[k] for k in rollout})
        return pool_agreement(self.reduce_metrics(metrics))

    def train_step(self, mb: Experience) -> dict[str, torch.Tensor]:
        """One micro-batch: policy loss (+ KL in the loss) -> actor step, then :meth:`critic_step`."""
        c = self.config
        logprobs, entropy = self.learn_logprobs(mb)  # (n, R) each
        dev = logprobs.device
        mask = mb.response_mask.to(dev)
        pl = F.ppo_policy_loss(logprobs, mb.logprobs.to(dev), mb.advantages.to(dev), mask, clip_eps=c.clip_eps,
                               loss_agg=c.loss_agg, norm_len=c.max_new_tokens)
        loss = pl.loss
        step = {
            "policy_loss": pl.loss.detach().float(),
            "clip_frac": pl.clip_frac.float(),
            "approx_kl": pl.approx_kl.float(),
        }
        if c.kl_placement == "loss":
            kl_loss = self.kl_loss(logprobs, mb.ref_logprobs.to(dev), mask)
            loss = loss + c.kl_coef * kl_loss
            step["kl_loss"] = kl_loss.detach().float()
        if c.ptx_coef > 0:  # InstructGPT's PPO-ptx: the SFT loss on demonstrations, in the same step
            ptx = self.ptx_loss(next(self.ptx_batches))
            loss = loss + c.ptx_coef * ptx
            step["ptx_loss"] = ptx.detach().float()
        self.actor.backward(loss)
        self.actor.step()
        step.update(self.critic_step(mb, mask))
        step["entropy"] = F.masked_mean(entropy.detach().float(), mask)
        return step

    def learn_logprobs(self, mb: Experience) -> tuple[torch.Tensor, torch.Tensor]:
        """The actor's log-probs and entropies ``(n, R)`` of the micro-batch's responses, with grad, at the
        sampling temperature: on the padded rows or packed padding-free (``batch_layout``, :mod:`._padding_free`)."""
        return learn_logprobs(self.actor, mb.sequences, mb.attention_mask, mb.prompt_len,
                              layout=self.config.batch_layout, pad_id=self.pad_token_id,
                              temperature=self.config.temperature)

    def learn_values(self, mb: Experience) -> torch.Tensor:
        """The critic's ``V(s_t)`` before each response token ``(n, R)``, with grad (``batch_layout`` as
        :meth:`learn_logprobs`)."""
        values = learn_values(self.critic, mb.sequences, mb.attention_mask, layout=self.config.batch_layout,
                              pad_id=self.pad_token_id)  # (n, P + R)
        return values[:, mb.prompt_len - 1 : -1]

    def ptx_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The SFT loss (:func:`rlhf_algos.sft.sft_batch_loss`, token-mean NLL) of the actor on one collated
        batch of demonstrations: the ptx term, weighted by ``ptx_coef`` in :meth:`train_step`."""
        from .sft import sft_batch_loss  # sft.py imports this module

        return sft_batch_loss(self.actor, batch).loss

    def kl_loss(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """KL(actor || reference) of the current log-probs ``(n, R)``, aggregated like the policy loss.

        With k3 this is GRPO's in-loss KL (Shao et al. 2024, eq. 4).
        """
        c = self.config
        # Zero padding before the non-linear estimator: garbage there must not reach a gradient.
        valid = mask != 0
        kl = F.kl_penalty(_zero_invalid(logprobs, valid), _zero_invalid(ref_logprobs.detach(), valid), c.kl_estimator)
        return F.aggregate_loss(kl, mask, c.loss_agg, norm_len=c.max_new_tokens)

    def critic_step(self, mb: Experience, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Value-model update on the micro-batch; no-op (no metrics) without a critic."""
        return {}

    def rollout_metrics(self, exp: Experience) -> dict[str, torch.Tensor]:
        """Statistics of the rollout batch, as detached 0-dim tensors (``reward_mean`` is of the raw scores)."""
        m = exp.response_mask
        out = {
            "reward_mean": exp.scores.mean(),
            "reward_std": exp.scores.std() if exp.scores.numel() > 1 else torch.zeros(()),
            # per sequence: the k3 estimate (never negative; the one every logged "kl_to_ref" uses) and the
            # estimate the algorithm penalises with (algo.kl_estimator: k1 for PPO, which can be negative)
            "kl_to_ref": (F.kl_penalty(_zero_invalid(exp.logprobs, m != 0), _zero_invalid(exp.ref_logprobs, m != 0), "k3")
                          * m).sum(1).mean(),
            "kl_penalty": (exp.kl * m).sum(dim=1).mean(),
            "response_length": m.sum(dim=1).mean(),
            "advantage_mean": F.masked_mean(exp.advantages, m),
            "advantage_std": F.masked_var(exp.advantages, m).sqrt(),
            "return_mean": F.masked_mean(exp.returns, m),
        }
        if self.critic is not None:
            out["value_mean"] = F.masked_mean(exp.values, m)
            out["explained_variance"] = F.explained_variance(exp.values, exp.returns, m)
        if exp.sample_logprobs is not None:
            mismatch = sampling_mismatch(exp.sample_logprobs, exp.logprobs, m)
            out["gen_kl_error"] = mismatch.gen_kl_error
            out["gen_logprob_gap_max"] = mismatch.gen_logprob_gap_max
        if exp.monitor_scores is not None:
            out.update(monitor_metrics(exp.scores, exp.monitor_scores))
        if exp.end_reasons is not None:
            from .multiturn import env_metrics

            out.update(env_metrics(exp))
        return out


# Re-export (see __all__). offline.py imports Algorithm and _to_floats from this module, so it is
# imported last, once they exist.
from .offline import OfflineAlgorithm  # noqa: E402
