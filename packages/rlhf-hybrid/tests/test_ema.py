"""HybridEngine.enable_ema (rlhf_hybrid.ema.ParamEMA) against an EMA computed here from weight snapshots.

After each optimizer step ema = beta * ema + (1 - beta) * w (DeepSpeed-Chat's moving_average); the
average is over each rank's own storage (ZeRO-3: its partitions), swapped in for a block and the
trained weights put back bitwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import pytest
import torch
from rlhf_hybrid import EngineConfig, HybridEngine, ParamEMA
from torch.testing import assert_close

VOCAB = 97


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))

pytestmark = pytest.mark.usefixtures("world_of_one")  # conftest.py


@pytest.mark.parametrize(("zero", "accum"), [(0, 1), (0, 2), (3, 1)])
def test_ema_equals_the_average_of_the_weight_snapshots(zero: int, accum: int) -> None:
    beta = 0.75
    engine = HybridEngine(tiny_llama(), EngineConfig(zero_stage=zero, lr=5e-2, micro_batch_size=2, grad_accum=accum))
    engine.enable_ema(beta)
    expected = engine.full_state_dict()  # the average starts at the starting weights
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # optimizer steps
        for _ in range(accum):
            ids = torch.randint(2, VOCAB, (2, 6), generator=gen)
            engine.backward(engine.logits(ids, torch.ones_like(ids)).float().logsumexp(-1).mean())
            engine.step()
        w = engine.full_state_dict()
        expected = {k: beta * expected[k] + (1 - beta) * w[k] for k in w}
    assert engine.ema.updates == 3  # once per optimizer step, not per micro-batch
    trained = engine.full_state_dict()
    with engine.ema.swapped():
        averaged = engine.full_state_dict()
    for k in expected:
        assert_close(averaged[k], expected[k], rtol=0, atol=1e-6)
    after = engine.full_state_dict()
    assert all(torch.equal(after[k], trained[k]) for k in trained)  # the trained weights are back, bitwise
    assert any(not torch.equal(averaged[k], trained[k]) for k in trained)


def test_ema_state_round_trip_and_bad_beta() -> None:
    engine = HybridEngine(tiny_llama(), EngineConfig(lr=1e-2, micro_batch_size=2))
    engine.enable_ema(0.5)
    state = engine.ema.state_dict()
    other = ParamEMA(engine.module, 0.9)
    other.load_state_dict(state)
    assert other.beta == 0.5 and all(torch.equal(a, b) for a, b in zip(other.average, engine.ema.average, strict=True))
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"ema beta: must be in \[0, 1\)"):
            ParamEMA(engine.module, bad)


@pytest.mark.parametrize("zero", [0, 3])
def test_a_skipped_nonfinite_step_leaves_the_average_alone(zero: int) -> None:
    """The guard skips a step with a nan loss (no weight changes), so the average must not move either:
    after good, nan, good steps it equals the two-snapshot average computed here."""
    beta = 0.5
    engine = HybridEngine(tiny_llama(), EngineConfig(zero_stage=zero, lr=5e-2, micro_batch_size=2,
                                                     max_nonfinite_steps=3))
    engine.enable_ema(beta)
    expected = engine.full_state_dict()
    gen = torch.Generator().manual_seed(1)
    for scale in (1.0, float("nan"), 1.0):
        ids = torch.randint(2, VOCAB, (2, 6), generator=gen)
        engine.backward(engine.logits(ids, torch.ones_like(ids)).float().logsumexp(-1).mean() * scale)
        engine.step()
        if scale == scale:  # applied: one more snapshot in the average
            w = engine.full_state_dict()
            expected = {k: beta * expected[k] + (1 - beta) * w[k] for k in w}
    assert engine.nonfinite_skipped == 1 and engine.ema.updates == 2
    with engine.ema.swapped():
        averaged = engine.full_state_dict()
    for k in expected:
        assert_close(averaged[k], expected[k], rtol=0, atol=1e-6)
