"""The non-finite guard of HybridEngine (rlhf_hybrid/guards.py), in a world of one (gloo on CPU).

* a step whose loss is nan/inf, or whose gradients are, changes no weight and no optimizer state,
  and counts as skipped; the next finite step is applied normally;
* ``max_nonfinite_steps`` skipped steps in a row raise ``NonFiniteError`` naming the engine and step;
* on finite steps the guarded engine gives bitwise the same weights as an unguarded reference loop;
* a state with a nan is never written by ``save_hf_checkpoint``.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import pytest
import torch
from rlhf_hybrid import EngineConfig, HybridEngine, NonFiniteError, NonFiniteWeightsError, save_hf_checkpoint

pytestmark = pytest.mark.usefixtures("world_of_one")  # conftest.py


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def batch(seed: int) -> torch.Tensor:
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))


def loss_of(engine: HybridEngine, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return (engine.module(x).pow(2).mean()) * scale


def weights(engine: HybridEngine) -> dict[str, torch.Tensor]:
    return engine.full_state_dict()  # a copy (gathered under ZeRO-3)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("bad", ["nan_loss", "inf_loss", "inf_grad"])
def test_a_nonfinite_step_is_skipped_and_counted(grad_accum: int, bad: str, zero_stage: int) -> None:
    engine = HybridEngine(tiny_model(), EngineConfig(lr=0.1, micro_batch_size=3, grad_accum=grad_accum,
                                                     max_nonfinite_steps=3, zero_stage=zero_stage))
    before = weights(engine)
    for micro in range(grad_accum):  # one optimizer step; its last micro-batch is the bad one
        x = batch(micro)
        if micro == grad_accum - 1 and bad == "inf_grad":
            x = x.clone()
            x[0, 0] = float("inf")  # the loss stays finite (tanh saturates) but a gradient is 0 * inf = nan
        scale = {"nan_loss": float("nan"), "inf_loss": float("inf")}.get(bad, 1.0) if micro == grad_accum - 1 else 1.0
        engine.backward(loss_of(engine, x, scale))
        engine.step()
    after = weights(engine)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert engine.nonfinite_skipped == 1 and engine.guard.consecutive == 1
    # the next finite step is applied
    for micro in range(grad_accum):
        engine.backward(loss_of(engine, batch(10 + micro)))
        engine.step()
    assert engine.guard.consecutive == 0 and engine.nonfinite_skipped == 1
    assert any(not torch.equal(before[k], v) for k, v in weights(engine).items())
    assert all(torch.isfinite(v).all() for v in weights(engine).values())


def test_k_in_a_row_raise_naming_the_engine_and_step() -> None:
    engine = HybridEngine(tiny_model(), EngineConfig(lr=0.1, micro_batch_size=3, max_nonfinite_steps=2), name="critic")
    engine.backward(loss_of(engine, batch(0)))
    engine.step()  # step 1: fine
    engine.backward(loss_of(engine, batch(1), float("nan")))
    engine.step()  # step 2: skipped, 1 in a row
    with pytest.raises(NonFiniteError) as info:
        engine.backward(loss_of(engine, batch(2), float("inf")))
        engine.step()  # step 3: skipped, 2 in a row -> stop
    e = info.value
    assert (e.name, e.step, e.consecutive, e.skipped) == ("critic", 3, 2, 2)
    assert e.loss == float("inf")
    assert "critic" in str(e) and "step 3" in str(e)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_finite_steps_are_bitwise_those_of_an_unguarded_loop(optimizer: str) -> None:
    """The reference: the same module, optimizer and clipping in plain PyTorch (DeepSpeed's ZeRO-0 fp32
    step is clip + optimizer.step, both done here by hand)."""
    engine = HybridEngine(tiny_model(), EngineConfig(lr=0.05, micro_batch_size=3, optimizer=optimizer,
                                                     max_grad_norm=1.0))
    ref = tiny_model()
    opt = (torch.optim.SGD(ref.parameters(), lr=0.05) if optimizer == "sgd"
           else torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.0, betas=(0.9, 0.95)))
    for i in range(4):
        x = batch(i)
        engine.backward(loss_of(engine, x))
        engine.step()
        ref(x).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for k, v in ref.state_dict().items():
        assert torch.equal(weights(engine)[k], v), k
    assert engine.nonfinite_skipped == 0


def test_a_nonfinite_weight_is_never_saved(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(iter(state))
    state[name][0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=rf"{name}.*non-finite"):
        save_hf_checkpoint(model, state, str(tmp_path / "ckpt"))
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []  # no temp directory left either


def test_max_nonfinite_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        EngineConfig(max_nonfinite_steps=0)
