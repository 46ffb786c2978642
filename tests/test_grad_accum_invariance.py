"""One optimizer step with micro-batch 1 x gradient accumulation 4 == micro-batch 4 x accumulation 1.

Both setups start from the same weights, see the same data and take one plain-SGD step (Adam's
first step is about lr * sign(g) and would hide a wrong gradient scale); the parameters after the
step must agree. DeepSpeed divides each micro-batch's loss by the accumulation steps, so the
equivalence holds exactly when the full-batch loss is the mean of equally weighted micro-batch
losses:

* DPO, IPO, cDPO, SimPO (a mean over pairs): always.
* ORPO: only with equal token counts: its NLL term is a token mean over the chosen responses
  (as in the paper and TRL), like ``token-mean`` below.
* PPO's policy loss with ``seq-mean-token-mean``, ``seq-mean-token-sum`` and
  ``seq-mean-token-sum-norm`` (a mean over rows): always.
* PPO with ``token-mean`` (a mean over *tokens*): only when every micro-batch has as many valid
  tokens; with ragged responses micro-batches of 1 weight short responses' tokens more. The test
  checks that the difference is really there, so the note in docs/algorithms.md stays true.
* KTO: never exactly, its reference point z0 is estimated per micro-batch (documented there).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

PAD, EOS, VOCAB = 0, 1, 24


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    from rlhf_hybrid.testing import world_of_one

    with world_of_one():
        yield


def tiny_llama(seed: int, eos_bias: float = 0.0):
    """A tiny random Llama; ``eos_bias`` > 0 adds a bias to the EOS logit so sampled responses end
    at different lengths."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None))
    if eos_bias:
        head = torch.nn.Linear(32, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            head.bias.zero_()
            head.bias[EOS] = eos_bias
        model.lm_head = head
    return model


def engine(module, micro: int, accum: int, trainable: bool = True):
    from rlhf_hybrid import EngineConfig, HybridEngine

    cfg = EngineConfig(zero_stage=0, lr=0.5, micro_batch_size=micro, grad_accum=accum, optimizer="sgd",
                       max_grad_norm=0.0)
    return HybridEngine(copy.deepcopy(module), cfg, trainable=trainable)


def params(e) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in e.module.named_parameters()}


def assert_same_params(a: dict, b: dict, start: dict) -> None:
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3, "the step changed nothing; the comparison would be vacuous"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------------------------
# DPO
# --------------------------------------------------------------------------------------------
def pairs(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(2, VOCAB, (2 + i % 3,), generator=g).tolist()
        c = torch.randint(2, VOCAB, (1 + i,), generator=g).tolist() + [EOS]
        r = torch.randint(2, VOCAB, (3,), generator=g).tolist() + [EOS]
        out.append({"chosen_ids": p + c, "rejected_ids": p + r, "prompt_len": len(p)})
    return out


@pytest.mark.parametrize("name", ["dpo", "ipo", "cdpo", "simpo"])
def test_preference_optimisation_accumulation_invariance(name: str) -> None:
    from rlhf_algos import get_algorithm
    from rlhf_data import collate_pairs

    cls = get_algorithm(name)
    model = tiny_llama(0)
    data = pairs(4)
    results = []
    for micro, accum in ((4, 1), (1, 4)):
        policy = engine(model, micro, accum)
        reference = engine(model, micro, accum, trainable=False) if "reference" in cls.required_models else None
        algo = cls(cls.config_class(), policy=policy, reference=reference)
        start = params(policy)
        for i in range(0, 4, micro):
            algo.learn(collate_pairs(data[i : i + micro], PAD))
        results.append(params(policy))
    assert_same_params(results[0], results[1], start)


# --------------------------------------------------------------------------------------------
# PPO
# --------------------------------------------------------------------------------------------
class LengthReward:
    """Score = number of response tokens (anything deterministic will do)."""

    def __call__(self, sequences, attention_mask, prompt_len, meta):
        return attention_mask[:, prompt_len:].sum(dim=1).float()


def ppo_step(model, critic_model, exp_source, micro: int, accum: int, loss_agg: str, exp=None):
    from rlhf_algos import PPO, PPOConfig
    from rlhf_hybrid import ValueModel

    actor = engine(model, micro, accum)
    reference = engine(model, micro, accum, trainable=False)
    critic = engine(ValueModel(critic_model), micro, accum)
    cfg = PPOConfig(micro_batch_size=micro, max_new_tokens=6, loss_agg=loss_agg, whiten_advantages=False)
    algo = PPO(cfg, actor=actor, reference=reference, critic=critic, reward_fn=LengthReward(), eos_token_id=EOS,
               pad_token_id=PAD, seed=0)
    if exp is None:
        torch.manual_seed(5)
        exp = algo.generate_experience(*exp_source)
    start = params(actor)
    algo.learn(exp)
    return exp, start, params(actor)


@pytest.fixture(scope="module")
def ppo_setup():
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(2, VOCAB, (4, 3), generator=g)
    return tiny_llama(1, eos_bias=2.0), tiny_llama(2), (prompts, torch.ones_like(prompts))


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_ppo_accumulation_invariance(ppo_setup, loss_agg: str) -> None:
    model, critic_model, prompts = ppo_setup
    exp, start, full = ppo_step(model, critic_model, prompts, 4, 1, loss_agg)
    _, _, accumulated = ppo_step(model, critic_model, prompts, 1, 4, loss_agg, exp=exp)
    assert_same_params(full, accumulated, start)


def test_ppo_token_mean_is_not_invariant_with_ragged_responses(ppo_setup) -> None:
    model, critic_model, prompts = ppo_setup
    exp, start, full = ppo_step(model, critic_model, prompts, 4, 1, "token-mean")
    lengths = exp.response_mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1, f"the rollout must have ragged responses, got lengths {lengths.tolist()}"
    _, _, accumulated = ppo_step(model, critic_model, prompts, 1, 4, "token-mean", exp=exp)
    diff = max((full[k] - accumulated[k]).abs().max().item() for k in full)
    assert diff > 1e-4, "token-mean over ragged micro-batches matched the full batch; update docs/algorithms.md"
