"""RL health: is the rollout on-policy, and is the run going somewhere?

* :func:`sampling_mismatch`: how far the log-probs the generator sampled with are from the ones the
  training forward recomputes for the same tokens with the same weights (NeMo-RL's
  ``gen_kl_error``). Both should be the same distribution; a gap means the "on-policy" rollout is
  not (a generation kernel, dtype, weight-gathering or quantization difference), and the PPO ratio
  is then measured against the wrong policy.
* :class:`HealthMonitor`: fed one metrics row per iteration, returns warnings with the numbers that
  triggered them: reward flat while the KL to the reference rises (the policy drifts without gain,
  often reward hacking), entropy collapse, and a sampling/training mismatch.

The pairwise agreement between a reward model and a verifier (``rm_verifier_agreement``) is
:func:`rlhf_algos.functional.ranking_agreement`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import functional as F

__all__ = [
    "HealthMonitor",
    "HealthThresholds",
    "SamplingMismatch",
    "fitted_rise",
    "monitor_metrics",
    "pool_agreement",
    "sampling_mismatch",
]


@dataclass(frozen=True, eq=False)
class SamplingMismatch:
    """Result of :func:`sampling_mismatch` (both 0-dim, no graph).

    Attributes:
        gen_kl_error: Masked mean over response tokens of the k3 estimate of
            ``KL(sampler || trainer)``; >= 0, exactly 0 when the log-probs are identical.
        gen_logprob_gap_max: Largest ``|sample_logprob - logprob|`` over response tokens.
    """

    gen_kl_error: torch.Tensor
    gen_logprob_gap_max: torch.Tensor


def sampling_mismatch(sample_logprobs: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> SamplingMismatch:
    """Sampling-time vs training-time log-probs of the same sampled tokens.

    The tokens were drawn from the sampler, so the k3 estimator (J. Schulman 2020, "Approximating
    KL Divergence") with ``log_ratio = sample_logprobs - logprobs`` estimates ``KL(sampler ||
    trainer)``: ``exp(-log_ratio) - 1 + log_ratio`` per token (:func:`~rlhf_algos.functional.kl_penalty`).
    Example: sampled with p = 0.5, recomputed p = 0.25 gives ``0.5 - 1 + ln 2 = 0.1931``.

    Args:
        sample_logprobs: ``(B, T)`` log-probs the generator reported for its tokens.
        logprobs: ``(B, T)`` the training forward's log-probs of the same tokens (same temperature).
        mask: ``(B, T)`` 1 on response tokens.

    Returns:
        :class:`SamplingMismatch`; 0 for both when nothing is valid.
    """
    valid = mask != 0 if mask.dtype != torch.bool else mask
    with torch.no_grad():
        # float64: in float32, exp(-x) - 1 + x for the ~1e-6 gaps of agreeing engines is rounding noise
        # (and can come out negative); clamp_min(0) drops what float64 rounding is left
        sample = torch.where(valid, sample_logprobs.double(), torch.zeros_like(sample_logprobs, dtype=torch.float64))
        train = torch.where(valid, logprobs.double(), torch.zeros_like(sample))
        kl = F.masked_mean(F.kl_penalty(sample, train, "k3").clamp_min(0.0), valid).float()
        gap = (sample - train).abs().float()  # 0 off the mask
        gap_max = gap.amax() if gap.numel() else torch.zeros((), device=gap.device)
    return SamplingMismatch(gen_kl_error=kl, gen_logprob_gap_max=gap_max)


def monitor_metrics(scores: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rollout's mean monitor (verifier) score and its agreement with the reward, as sums that
    survive an average over ranks (0-dim tensors).

    ``rm_verifier_pairs`` is the number of (monitor-correct, monitor-incorrect) pairs of the batch
    (:func:`~rlhf_algos.functional.ranked_pairs` of ``truth``) and ``rm_verifier_wins`` the credit
    the reward's ``scores`` earn on them (:func:`~rlhf_algos.functional.ranking_agreement` times the
    count; a tie earns 0.5). :func:`pool_agreement` turns them into ``rm_verifier_agreement``.

    Args:
        scores: ``(N,)`` the reward the policy is trained on (e.g. a reward model's raw scores).
        truth: ``(N,)`` the monitor's scores of the same responses (e.g. a 0/1 verifier).
    """
    pairs = F.ranked_pairs(truth).sum().float()
    return {"verifier_score_rollout": truth.float().mean(), "rm_verifier_pairs": pairs,
            "rm_verifier_wins": F.ranking_agreement(scores, truth) * pairs}


def pool_agreement(metrics: dict[str, float]) -> dict[str, float | None]:
    """``rm_verifier_agreement = rm_verifier_wins / rm_verifier_pairs`` (None without a pair), the
    wins dropped. Both were averaged over ranks alike, so the ratio pools every rank's pairs."""
    if "rm_verifier_wins" not in metrics:
        return metrics
    out: dict[str, float | None] = dict(metrics)
    wins, pairs = out.pop("rm_verifier_wins"), metrics["rm_verifier_pairs"]
    out["rm_verifier_agreement"] = wins / pairs if pairs > 0 else None
    return out


@dataclass(frozen=True)
class HealthThresholds:
    """When :class:`HealthMonitor` warns (see its docstring for the rules).

    Attributes:
        window: Iterations the flat-reward rule waits for before its first verdict (>= 2); from
            then on it judges every iteration since the run's first.
        flat_reward_tol: The reward counts as flat when its fitted rise since the first iteration
            is at most this fraction of the mean ``reward_std`` over those iterations.
        kl_rise_tol: The KL counts as rising when its fitted rise since the first iteration
            exceeds this fraction of its mean over those iterations ...
        kl_rise_min: ... and this many nats (per sequence).
        entropy_floor: Entropy collapse below this mean entropy (nats/token).
        entropy_drop: ... or when the entropy fell by more than this fraction of the first
            iteration's, in (0, 1].
        gen_kl_threshold: Warn when ``gen_kl_error`` exceeds this.
    """

    window: int = 15
    flat_reward_tol: float = 0.1
    kl_rise_tol: float = 0.25
    kl_rise_min: float = 0.01
    entropy_floor: float = 0.05
    entropy_drop: float = 0.8
    gen_kl_threshold: float = 1e-3

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"window: {self.window!r} is not allowed; allowed: >= 2")
        for name in ("flat_reward_tol", "kl_rise_tol", "kl_rise_min", "entropy_floor", "gen_kl_threshold"):
            if not getattr(self, name) >= 0 or getattr(self, name) == float("inf"):  # nan fails >= too
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; allowed: finite, >= 0")
        if not 0.0 < self.entropy_drop <= 1.0:
            raise ValueError(f"entropy_drop: {self.entropy_drop!r} is not allowed; allowed: (0, 1]")


def fitted_rise(values: list[float]) -> float:
    """The least-squares line through ``values`` (one per iteration): its rise from first to last point.

    ``slope * (n - 1)``; less noisy than ``last - first`` or the range. Needs ``n >= 2``.
    """
    n = len(values)
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    slope = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(values)) / sxx
    return slope * (n - 1)


class _RunningFit:
    """:func:`fitted_rise` and the mean of a growing series in O(1) memory and time per point.

    With ``x = 0 .. n-1``: ``slope = (sum(x*y) - x_mean * sum(y)) / sxx``, ``sxx = n (n^2 - 1) / 12``
    (the same least-squares line as :func:`fitted_rise`, summed in float64 as it goes).
    """

    def __init__(self) -> None:
        self.n, self.sum_y, self.sum_xy = 0, 0.0, 0.0
        self.first = self.last = float("nan")

    def add(self, y: float) -> None:
        if self.n == 0:
            self.first = y
        self.sum_xy += self.n * y
        self.sum_y += y
        self.n += 1
        self.last = y

    @property
    def mean(self) -> float:
        return self.sum_y / self.n

    def rise(self) -> float:
        n = self.n
        sxx = n * (n * n - 1) / 12
        return (self.sum_xy - (n - 1) / 2 * self.sum_y) / sxx * (n - 1)


class HealthMonitor:
    """Warnings from the per-iteration metrics rows of an online run (pure Python, no torch).

    :meth:`update` takes one row (``reward_mean``, ``reward_std``, ``kl_to_ref``, ``entropy``,
    ``gen_kl_error``, ``iteration``; missing or None keys switch their rule off) and returns the
    warnings that start at this row. A warning fires once when its condition sets in, not again
    while it holds; it can fire again after the condition has cleared. The rules
    (``t`` = :class:`HealthThresholds`):

    a. **Reward flat while the KL rises** (the policy drifts without gain: reward hacking, a reward
       with no signal, or too small a KL penalty), over every row since the first, once there are
       at least ``t.window`` of them:
       ``rise(reward_mean) <= t.flat_reward_tol * mean(reward_std)`` and
       ``rise(kl_to_ref) > max(t.kl_rise_tol * |mean(kl_to_ref)|, t.kl_rise_min)``, where ``rise``
       is :func:`fitted_rise` (a falling reward counts as flat). The rows since the first, not a
       sliding window: a per-iteration ``reward_mean`` is the mean of one rollout, so its noise is
       about ``reward_std / sqrt(rollout size)``, and a learning run's rise over 10 iterations is
       of that size. Measured on the demo (docs/pipeline.md): a sliding 10-iteration window
       warned in all 21 runs that learned (PPO, GRPO, RLOO, seeds 1-4 and 42), the rows since the
       first (with the default 15 rows before the first verdict) in none, while both caught every simulated run whose reward stayed flat (+0.02 over
       60 iterations, noise 0.07) as its KL rose to 0.73.
    b. **Entropy collapse**: ``entropy < t.entropy_floor``, or
       ``entropy < (1 - t.entropy_drop) * entropy of the first row``.
    c. **Sampling/training mismatch**: ``gen_kl_error > t.gen_kl_threshold``.
    """

    def __init__(self, thresholds: HealthThresholds | None = None) -> None:
        self.t = thresholds or HealthThresholds()
        # The flat-reward rule's series since the first row, as running sums (long runs stay O(1) per row).
        self._reward, self._std, self._kl = _RunningFit(), _RunningFit(), _RunningFit()
        self._first_it: int | None = None
        self._first_entropy: float | None = None
        self._active: set[str] = set()
        self._rows = 0

    def update(self, row: Mapping[str, Any]) -> list[str]:
        """Feed one iteration's metrics; returns the warnings that set in at it (usually none)."""
        self._rows += 1
        it = int(row.get("iteration", self._rows))
        checks = {"flat_reward": self._flat_reward(row, it), "entropy": self._entropy(row, it),
                  "gen_kl": self._gen_kl(row, it)}
        out = []
        for name, message in checks.items():
            if message is None:
                self._active.discard(name)
            elif name not in self._active:
                self._active.add(name)
                out.append(message)
        return out

    def _flat_reward(self, row: Mapping[str, Any], it: int) -> str | None:
        keys = ("reward_mean", "reward_std", "kl_to_ref")
        if any(row.get(k) is None for k in keys):
            return None
        for fit, k in ((self._reward, "reward_mean"), (self._std, "reward_std"), (self._kl, "kl_to_ref")):
            fit.add(float(row[k]))
        self._first_it = it if self._first_it is None else self._first_it
        if self._reward.n < self.t.window:
            return None
        reward, kl = self._reward, self._kl
        r_rise, kl_rise, std_mean = reward.rise(), kl.rise(), self._std.mean
        kl_needed = max(self.t.kl_rise_tol * abs(kl.mean), self.t.kl_rise_min)
        if r_rise > self.t.flat_reward_tol * std_mean or kl_rise <= kl_needed:
            return None
        return (f"reward flat while the KL to the reference rises, iterations {self._first_it}-{it}: reward_mean "
                f"{reward.first:.4g} -> {reward.last:.4g} (fitted rise {r_rise:.3g} <= {self.t.flat_reward_tol:g} x "
                f"reward_std {std_mean:.3g}), kl_to_ref {kl.first:.4g} -> {kl.last:.4g} (fitted rise {kl_rise:.3g} > "
                f"{kl_needed:.3g}); the policy drifts without gain: suspect the reward (hacking) or raise "
                f"algo.kl_coef")

    def _entropy(self, row: Mapping[str, Any], it: int) -> str | None:
        if row.get("entropy") is None:
            return None
        h = float(row["entropy"])
        if self._first_entropy is None:
            self._first_entropy = h
        first = self._first_entropy
        if h < self.t.entropy_floor:
            why = f"below the floor {self.t.entropy_floor:g}"
        elif h < (1.0 - self.t.entropy_drop) * first:
            why = f"{1.0 - h / first:.0%} below the first iteration's {first:.4g} (> {self.t.entropy_drop:.0%} drop)"
        else:
            return None
        return (f"entropy collapse at iteration {it}: entropy {h:.4g} nats/token, {why}; the policy samples "
                f"nearly the same answer every time and stops exploring")

    def _gen_kl(self, row: Mapping[str, Any], it: int) -> str | None:
        v = row.get("gen_kl_error")
        if v is None or float(v) <= self.t.gen_kl_threshold:
            return None
        gap = row.get("gen_logprob_gap_max")
        gap_text = f", gen_logprob_gap_max {float(gap):.3g}" if gap is not None else ""
        return (f"sampling/training mismatch at iteration {it}: gen_kl_error {float(v):.3g} > "
                f"{self.t.gen_kl_threshold:g}{gap_text}; the generator's log-probs differ from the training "
                f"forward's, so the rollout is off-policy (generation kernels, dtype, quantized weights?)")
