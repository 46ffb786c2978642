"""The ptx term of the online algorithms (``ptx_coef``: InstructGPT's PPO-ptx, DeepSpeed-Chat's unsupervised
loss): the actor's loss is the policy loss plus ``ptx_coef`` times the SFT loss of one batch of
demonstrations per actor step.

The reference is written here by hand on the bigram test double: the PPO surrogate at the rollout's own
weights (ratio 1, so the clip is inactive: ``-sum(ratio * A * m) / sum(m)``) and the token-mean NLL of the
demonstration's unmasked targets from ``log_softmax`` of the module's logits.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from rlhf_algos import PPO, GRPOConfig, PPOConfig
from rlhf_algos.testing import FirstTokenReward, TinyCritic, TinyPolicy
from torch.testing import assert_close

V, PAD, EOS = 10, 0, 1
IGNORE = -100


class RecordingPolicy(TinyPolicy):
    """A TinyPolicy that keeps the loss given to ``backward`` and the gradients just before ``step``."""

    def backward(self, loss: torch.Tensor) -> None:
        self.losses = [*getattr(self, "losses", []), loss.detach().clone()]
        super().backward(loss)

    def step(self) -> None:
        self.grads = {n: p.grad.clone() for n, p in self.module.named_parameters()}
        super().step()


def _demo_batch() -> dict[str, torch.Tensor]:
    """Two right-padded demonstrations: prompt tokens masked (-100), then the response and EOS; row 2 padded."""
    ids = torch.tensor([[5, 6, 7, 8, EOS], [4, 9, EOS, PAD, PAD]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, EOS], [IGNORE, 9, EOS, IGNORE, IGNORE]])
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _hand_sft(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean NLL of the targets whose label is not -100 (each position predicts the next token)."""
    logp = torch.log_softmax(module(batch["input_ids"])[:, :-1].float(), -1)  # (B, L - 1, V)
    nll = -logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)  # (B, L - 1)
    m = (batch["labels"][:, 1:] != IGNORE).float()  # 3 + 2 = 5 targets
    return (nll * m).sum() / m.sum()


def _ppo(coef: float, batches) -> tuple[PPO, RecordingPolicy]:
    actor = RecordingPolicy(V, lr=1e-2, seed=0)
    cfg = PPOConfig(max_new_tokens=3, micro_batch_size=64, ptx_coef=coef)
    algo = PPO(cfg, actor=actor, reference=actor.frozen_copy(), critic=TinyCritic(V), reward_fn=FirstTokenReward(3),
               eos_token_id=EOS, pad_token_id=PAD, ptx_batches=batches)
    return algo, actor


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([[2, 3], [4, 5], [6, 7], [8, 9]]), torch.ones(4, 2, dtype=torch.long)


@pytest.mark.parametrize("coef", [0.5, 2.0])
def test_actor_loss_is_the_ppo_loss_plus_coef_times_the_sft_loss(coef: float) -> None:
    torch.manual_seed(0)
    batch = _demo_batch()
    algo, actor = _ppo(coef, iter([batch]))
    exp = algo.generate_experience(*_prompts())
    before = copy.deepcopy(actor.module)  # the weights train_step sees (it steps afterwards)
    step = algo.train_step(exp)

    # the reference, by hand, with gradients, on the same weights
    P, m = exp.prompt_len, exp.response_mask
    logits = before(exp.sequences)[:, P - 1 : -1].float()  # (N, R, V)
    lp = torch.log_softmax(logits, -1).gather(-1, exp.sequences[:, P:, None]).squeeze(-1)  # (N, R)
    ratio = torch.exp(lp - exp.logprobs)  # 1 at these weights: the clip range does not bind
    ppo = -(ratio * exp.advantages * m).sum() / m.sum()
    sft = _hand_sft(before, batch)
    expected = ppo + coef * sft
    expected.backward()

    assert_close(actor.losses[-1], expected.detach(), rtol=1e-6, atol=1e-6)
    assert_close(step["ptx_loss"], sft.detach(), rtol=1e-6, atol=1e-6)
    assert_close(step["policy_loss"], ppo.detach(), rtol=1e-6, atol=1e-6)
    assert sft.item() > 0.5  # a real term: an untrained bigram model is far from the demonstrations
    for name, p in before.named_parameters():
        assert_close(actor.grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_off_by_default_draws_nothing_and_leaves_the_loss_alone() -> None:
    class Untouchable:
        def __iter__(self):
            return self

        def __next__(self):
            raise AssertionError("a ptx batch was drawn with ptx_coef=0")

    torch.manual_seed(0)
    assert PPOConfig().ptx_coef == 0.0
    algo, actor = _ppo(0.0, Untouchable())
    exp = algo.generate_experience(*_prompts())
    step = algo.train_step(exp)
    assert "ptx_loss" not in step
    assert_close(actor.losses[-1], step["policy_loss"])


def test_one_ptx_batch_per_actor_step() -> None:
    """10 rows, micro-batches of 4, 2 epochs: 2 x ceil(10 / 4) = 6 actor steps, 6 batches drawn."""
    drawn = []

    def stream():
        while True:
            drawn.append(1)
            yield _demo_batch()

    torch.manual_seed(0)
    actor = TinyPolicy(V, seed=0)
    cfg = GRPOConfig(max_new_tokens=3, micro_batch_size=4, ppo_epochs=2, samples_per_prompt=2, ptx_coef=0.1)
    from rlhf_algos import GRPO

    algo = GRPO(cfg, actor=actor, reference=actor.frozen_copy(), reward_fn=FirstTokenReward(3), eos_token_id=EOS,
                pad_token_id=PAD, ptx_batches=stream())
    ids = torch.randint(2, V, (5, 2))
    metrics = algo.learn(algo.generate_experience(ids, torch.ones_like(ids)))
    assert algo.actor_steps(10) == 6 == len(drawn) == actor.steps
    assert math.isfinite(metrics["ptx_loss"]) and metrics["ptx_loss"] > 0


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_bad_ptx_coef_is_rejected_by_name(value: float) -> None:
    with pytest.raises(ValueError, match=r"ppo\.ptx_coef: .* is not allowed; allowed: >= 0.0"):
        PPOConfig(ptx_coef=value)


def test_ptx_coef_without_batches_is_an_error() -> None:
    with pytest.raises(ValueError, match="ptx_coef=0.5 needs ptx_batches"):
        _ppo(0.5, None)
