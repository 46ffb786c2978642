"""Token fidelity of multi-turn rollouts (rlhf_algos.trajectories) on a HybridEngine, hf and fast paths.

For every trajectory of a ragged, left-padded batch whose episodes end at different turns:

* the trained ids are exactly the model's sampled ids and the environment's reply ids, in turn order,
  as the environment itself saw and sent them (it parses each action back to ids and logs its replies);
* the loss mask is 1 exactly on the model's ids;
* the sampling log-probs equal ``token_logprobs`` of the final sequences in train mode (fp32, <= 1e-4);
* the fast path continues on one KV cache (a KVCacheSession), the hf path re-prefills, and greedy
  trajectories of the two paths are the same tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from rlhf_algos.environments import EpisodeBudget, StepResult
from rlhf_algos.trajectories import RePrefillSession, make_session, run_episodes

PAD, EOS, VOCAB = 0, 1, 97


def tiny_llama(seed: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make EOS likely enough that some turns end early
        model.lm_head.weight[EOS] = 1.05 * model.lm_head.weight[65]
    return model


def decode(ids: list[int]) -> str:
    return " ".join(str(t) for t in ids)


def encode(text: str) -> list[int]:
    return [int(t) for t in text.split()]


class LoggingEnv:
    """Replies ``reply_len + turn`` token ids (as text on even turns, as ids on odd ones) and ends after
    ``turns`` turns; logs the model ids it was given and the reply ids it sent."""

    name, description = "logging", "test"

    def reset(self, record: dict) -> None:
        self.turns, self.reply_len, self.log = record["turns"], record["reply_len"], []

    def step(self, action: str) -> StepResult:
        self.log.append(("model", encode(action)))
        k = sum(1 for who, _ in self.log if who == "model")
        if k == self.turns:
            return StepResult(reward=float(k), done=True)
        reply = [2 + (7 * k + j) % 90 for j in range(self.reply_len + k)]
        self.log.append(("env", reply))
        return StepResult(reply=decode(reply) if k % 2 == 0 else reply, reward=0.5 * k)


def _prompts():
    from rlhf_hybrid.testing import ragged_prompts

    return ragged_prompts(VOCAB, (5, 2, 7, 3), pad=PAD, low=2)


RECORDS = [{"turns": 3, "reply_len": 2}, {"turns": 1, "reply_len": 1}, {"turns": 2, "reply_len": 4},
           {"turns": 3, "reply_len": 0}]


def _rollout(engine, do_sample: bool, seed: int = 0):
    ids, mask = _prompts()
    envs = [LoggingEnv() for _ in RECORDS]
    budget = EpisodeBudget(max_turns=4, max_turn_tokens=6, max_total_tokens=40)
    torch.manual_seed(seed)
    session = make_session(engine, ids, mask, max_total_tokens=budget.max_total_tokens, eos_token_id=EOS,
                           pad_token_id=PAD, do_sample=do_sample, temperature=0.7 if do_sample else 1.0)
    batch = run_episodes(session, envs, RECORDS, budget=budget, decode=decode, encode=encode, prompt_ids=ids,
                         prompt_mask=mask, pad_token_id=PAD, vocab_size=VOCAB)
    return session, envs, batch


@pytest.mark.usefixtures("in_process_world")
@pytest.mark.parametrize("generation", ["hf", "fast"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_trajectory_tokens_masks_and_logprobs_are_the_sampled_ones(generation: str, do_sample: bool) -> None:
    from rlhf_hybrid import EngineConfig, HybridEngine
    from rlhf_hybrid.inference.turns import KVCacheSession

    engine = HybridEngine(tiny_llama(), EngineConfig(zero_stage=0, micro_batch_size=4, generation=generation))
    engine.eval()
    session, envs, batch = _rollout(engine, do_sample)
    assert isinstance(session, KVCacheSession if generation == "fast" else RePrefillSession)
    P = batch.prompt_len
    assert batch.num_turns.tolist() == [3, 1, 2, 3]
    assert batch.end_reasons == ["done"] * 4 and batch.scores.tolist() == [3.0, 1.0, 2.0, 3.0]
    for i, env in enumerate(envs):
        want_ids = [t for _, part in env.log for t in part]
        want_model = [who == "model" for who, part in env.log for _ in part]
        n = len(want_ids)
        assert batch.sequences[i, P:P + n].tolist() == want_ids
        assert batch.loss_mask[i, :n].bool().tolist() == want_model
        assert batch.loss_mask[i, n:].sum() == 0 and batch.attention_mask[i, P + n:].sum() == 0
        assert batch.attention_mask[i, P:P + n].sum() == n
        # per-turn rewards at the last model token of each non-final turn
        ends = [k for k in range(n) if want_model[k] and (k + 1 == n or not want_model[k + 1])]
        assert [batch.turn_rewards[i, k].item() for k in ends[:-1]] == [0.5 * (j + 1) for j in range(len(ends) - 1)]
        assert batch.turn_rewards[i].abs().sum().item() == pytest.approx(sum(0.5 * (j + 1) for j in range(len(ends) - 1)))
    engine.train()  # the training-mode recomputation on the trained sequences
    with torch.no_grad():
        lp = engine.token_logprobs(batch.sequences, batch.attention_mask, P,
                                   temperature=0.7 if do_sample else 1.0).float().cpu()
    m = batch.loss_mask.bool()
    assert (batch.sample_logprobs[m] < 0).all()
    assert (lp[m] - batch.sample_logprobs[m]).abs().max().item() <= 1e-4
    assert (batch.sample_logprobs[~m] == 0).all()


@pytest.mark.usefixtures("in_process_world")
def test_fast_and_hf_greedy_trajectories_are_the_same_tokens() -> None:
    from rlhf_hybrid import EngineConfig, HybridEngine

    model = tiny_llama()
    out = {}
    for generation in ("hf", "fast"):
        engine = HybridEngine(model, EngineConfig(zero_stage=0, micro_batch_size=4, generation=generation))
        engine.eval()
        out[generation] = _rollout(engine, do_sample=False)[2]
    assert torch.equal(out["hf"].sequences, out["fast"].sequences)
    assert torch.equal(out["hf"].loss_mask, out["fast"].loss_mask)
    # some model turn ended at EOS before its cap, some at the cap: both turn ends are exercised
    seqs, m = out["fast"].sequences[:, out["fast"].prompt_len:], out["fast"].loss_mask.bool()
    assert bool(((seqs == EOS) & m).any())


@pytest.mark.usefixtures("in_process_world")
def test_tensor_parallel_generation_of_turns_is_refused_by_name() -> None:
    from rlhf_hybrid import EngineConfig, HybridEngine

    engine = HybridEngine(tiny_llama(), EngineConfig(zero_stage=0, micro_batch_size=4, generation="fast",
                                                     inference_tp_size=2))
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="inference_tp_size=2: multi-turn rollouts .* need inference_tp_size=1"):
        make_session(engine, ids, mask, max_total_tokens=40, eos_token_id=EOS, pad_token_id=PAD)
