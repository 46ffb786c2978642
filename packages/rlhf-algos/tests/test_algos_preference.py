"""The offline preference algorithms (DPO, IPO, cDPO, SimPO, ORPO, KTO) on pairs batches.

* The plumbing: chosen rows first, the response mask shifted by one to align with token
  log-probs, the reference scored without gradients; checked with a scorer whose log-probs are
  known by hand.
* Each algorithm, a few steps on a toy preference batch, widens the chosen-vs-rejected margin.
"""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_algos import (
    CDPO,
    DPO,
    IPO,
    KTO,
    ORPO,
    CDPOConfig,
    DPOConfig,
    IPOConfig,
    KTOConfig,
    ORPOConfig,
    SimPO,
    SimPOConfig,
)
from rlhf_algos.testing import TinyPolicy, pairs_batch
from torch import nn
from torch.testing import assert_close

V = 10
ALL = [(DPO, DPOConfig), (IPO, IPOConfig), (CDPO, CDPOConfig), (SimPO, SimPOConfig), (ORPO, ORPOConfig),
       (KTO, KTOConfig)]


class TokenIdScorer:
    """log p(token) = -w * token_id with one trainable scalar ``w`` (1.0): log-probs known by hand."""

    def __init__(self, w: float = 1.0, trainable: bool = True) -> None:
        self.w = nn.Parameter(torch.tensor(w), requires_grad=trainable)
        self.calls: list[tuple[bool, int]] = []  # (grad enabled, start) per call
        self.grads: list[torch.Tensor] = []

    def token_logprobs(self, input_ids, attention_mask, start=1, *, temperature=1.0, return_entropy=False):
        self.calls.append((torch.is_grad_enabled(), start))
        return -self.w * input_ids[:, start:].float()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.grads.append(self.w.grad.clone())

    def step(self) -> None:
        self.w.grad = None

    def train(self) -> None: ...

    def eval(self) -> None: ...


def test_pairs_batch_layout() -> None:
    b = pairs_batch([[5, 6]], [[3]], [[4, 7]])
    assert b["input_ids"].tolist() == [[5, 6, 3, 0], [5, 6, 4, 7]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]


def test_dpo_learn_uses_response_tokens_chosen_first_and_a_no_grad_reference() -> None:
    # Chosen response [3] -> sequence log-prob -3; rejected [4, 7] -> -11 (prompt and padding excluded).
    # Reference w = 0.5: -1.5 and -5.5. h = (-3 + 1.5) - (-11 + 5.5) = 4; beta 0.1 -> -log sigmoid(0.4)
    policy, reference = TokenIdScorer(1.0), TokenIdScorer(0.5, trainable=False)
    algo = DPO(DPOConfig(beta=0.1), policy=policy, reference=reference)
    m = algo.learn(pairs_batch([[5, 6]], [[3]], [[4, 7]]))
    assert m["loss"] == pytest.approx(math.log1p(math.exp(-0.4)), rel=1e-6)
    assert m["chosen_logp"] == pytest.approx(-3.0)
    assert m["rejected_logp"] == pytest.approx(-11.0)
    assert m["chosen_reward"] == pytest.approx(0.1 * -1.5)  # beta * (log pi - log pi_ref)
    assert m["rejected_reward"] == pytest.approx(0.1 * -5.5)
    assert m["reward_accuracy"] == 1.0 and m["reward_margin"] == pytest.approx(0.4)
    assert policy.calls == [(True, 1)] and reference.calls == [(False, 1)]
    # d loss / dw: h = -3w + 11w + const = 8w + const -> -0.1 * 8 * sigmoid(-0.4)
    assert policy.grads[0].item() == pytest.approx(-0.8 / (1 + math.exp(0.4)), rel=1e-5)


def test_simpo_and_orpo_need_no_reference_and_use_average_logprobs() -> None:
    # Average log-probs: chosen -3 (one token), rejected -(4 + 7) / 2 = -5.5.
    # SimPO beta 2, gamma 1: logit 2 * 2.5 - 1 = 4 -> -log sigmoid(4) = log(1 + e^-4)
    m = SimPO(SimPOConfig(), policy=TokenIdScorer()).learn(pairs_batch([[5, 6]], [[3]], [[4, 7]]))
    assert m["loss"] == pytest.approx(math.log1p(math.exp(-4.0)), rel=1e-5)
    assert m["reward_margin"] == pytest.approx(2.0 * 2.5)
    # ORPO: nll 3 (token mean over the chosen response); log odds(a) = a - log(1 - e^a)
    lo = lambda a: a - math.log1p(-math.exp(a))  # noqa: E731
    m = ORPO(ORPOConfig(lam=0.1), policy=TokenIdScorer()).learn(pairs_batch([[5, 6]], [[3]], [[4, 7]]))
    ratio = lo(-3.0) - lo(-5.5)
    assert m["nll"] == pytest.approx(3.0)
    assert m["log_odds_ratio"] == pytest.approx(ratio, rel=1e-5)
    assert m["loss"] == pytest.approx(3.0 + 0.1 * math.log1p(math.exp(-ratio)), rel=1e-5)


def test_kto_splits_pairs_into_desirable_and_undesirable_with_a_batch_reference_point() -> None:
    # policy w = 1, reference w = 0.5: log-ratios chosen -1.5, rejected -5.5; z0 = max(mean(-1.5, -5.5), 0) = 0
    # beta 0.1: desirable 1 - sigmoid(0.1 * -1.5), undesirable 1 - sigmoid(0.1 * (0 + 5.5))
    m = KTO(KTOConfig(), policy=TokenIdScorer(1.0), reference=TokenIdScorer(0.5, trainable=False)).learn(
        pairs_batch([[5, 6]], [[3]], [[4, 7]]))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert m["loss"] == pytest.approx(((1 - sig(-0.15)) + (1 - sig(0.55))) / 2, rel=1e-6)
    assert m["kl_ref"] == 0.0
    # policy w = 0.25 below the reference: log-ratios +0.75 and +2.75 -> z0 = 1.75
    m = KTO(KTOConfig(), policy=TokenIdScorer(0.25), reference=TokenIdScorer(0.5, trainable=False)).learn(
        pairs_batch([[5, 6]], [[3]], [[4, 7]]))
    assert m["kl_ref"] == pytest.approx(1.75)


def test_offline_errors() -> None:
    with pytest.raises(ValueError, match="dpo: a reference policy is required"):
        DPO(DPOConfig(), policy=TokenIdScorer())
    with pytest.raises(TypeError, match="DPOConfig"):
        DPO(IPOConfig(), policy=TokenIdScorer(), reference=TokenIdScorer())
    algo = SimPO(SimPOConfig(), policy=TokenIdScorer(), reference=TokenIdScorer())  # a reference is ignored
    assert algo.reference is None
    b = pairs_batch([[5, 6]], [[3]], [[4, 7]])
    with pytest.raises(ValueError, match="2B rows"):
        algo.learn({k: v[:1] for k, v in b.items()})


def test_equal_policy_and_reference_gives_ln2_for_dpo() -> None:
    pol = TinyPolicy(V, seed=0)
    b = pairs_batch([[2, 3], [4, 5]], [[3, 1], [6, 1]], [[7, 8, 1], [9, 1]])
    m = DPO(DPOConfig(), policy=pol, reference=pol.frozen_copy()).learn(b)
    assert m["loss"] == pytest.approx(math.log(2.0), rel=1e-6)
    assert m["reward_margin"] == 0.0 and m["reward_accuracy"] == 0.0


@pytest.mark.parametrize(("cls", "config_class"), ALL)
def test_every_preference_algorithm_widens_the_margin_on_a_toy_batch(cls, config_class) -> None:
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, V, (8, 3), generator=gen).tolist()
    batch = pairs_batch(prompts, [[3, 4, 1]] * 8, [[5, 6, 7, 1]] * 8)
    pol = TinyPolicy(V, lr=1e-2, seed=0)
    kw = {"reference": pol.frozen_copy()} if "reference" in cls.required_models else {}
    algo = cls(config_class(), policy=pol, **kw)
    ms = [algo.learn(batch) for _ in range(10)]
    for m in ms:
        assert all(math.isfinite(v) for v in m.values()), m
    assert {"loss", "chosen_reward", "rejected_reward", "reward_accuracy", "reward_margin", "chosen_logp",
            "rejected_logp"} <= set(ms[0])
    # Measured: the implicit-reward margin grows from <= 0.35 to >= 0.18 more (ORPO, whose rewards are
    # scaled by lam = 0.1) and 0.66-4.3 for the others; the loss falls.
    assert ms[-1]["reward_margin"] > ms[0]["reward_margin"] + 0.1, [m["reward_margin"] for m in ms]
    assert ms[-1]["loss"] < ms[0]["loss"]
    assert ms[-1]["reward_accuracy"] == 1.0
    assert pol.steps == 10


def test_losses_are_finite_with_extreme_logprob_gaps() -> None:
    # A policy that is sure of the chosen tokens and nearly excludes the rejected ones.
    pol = TinyPolicy(V, seed=0)
    with torch.no_grad():
        pol.module.head.bias[3] += 60.0
        pol.module.head.bias[5] -= 60.0
    b = pairs_batch([[2, 3]], [[3, 3, 3]], [[5, 5, 5]])
    for cls, config_class in ALL:
        kw = {"reference": TinyPolicy(V, seed=0).frozen_copy()} if "reference" in cls.required_models else {}
        m = cls(config_class(), policy=pol, **kw).learn(b)
        assert all(math.isfinite(v) for v in m.values()), (cls.name, m)
        for p in pol.module.parameters():
            assert torch.isfinite(p).all(), cls.name


def test_pair_metrics_are_detached_tensors_until_learn_returns_floats() -> None:
    pol = TinyPolicy(V, seed=0)
    algo = DPO(DPOConfig(), policy=pol, reference=pol.frozen_copy())
    logps = torch.randn(4, 3, requires_grad=True)
    loss, metrics = algo.compute_loss(logps, logps.detach() + 0.1, torch.ones(4, 3))
    assert loss.requires_grad
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0 for v in metrics.values())
    assert_close(metrics["reward_margin"], torch.tensor(0.0))
