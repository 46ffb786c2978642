"""rlhf_hybrid.zero_init and the offload settings, in a world of one (the two-rank checks are in
test_zero_init_two_ranks.py)."""

from __future__ import annotations

import pytest
import torch
from rlhf_hybrid import EngineConfig, HybridEngine, deepspeed_config

pytestmark = pytest.mark.usefixtures("world_of_one", "one_thread")


def _config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**(dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                tie_word_embeddings=False, pad_token_id=0, initializer_range=0.3) | kw))


def test_offload_settings_reach_the_deepspeed_config() -> None:
    conf = deepspeed_config(EngineConfig(zero_stage=3, offload_param=True, offload_optimizer=True), 2)
    assert conf["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert conf["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    # DeepSpeed refuses a client torch optimizer with ZeRO-Offload unless told; on a CPU-only machine ours is one
    assert conf["zero_force_ds_cpu_optimizer"] is False
    plain = deepspeed_config(EngineConfig(zero_stage=3), 2)
    assert "offload_param" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain
    frozen = deepspeed_config(EngineConfig(zero_stage=3, offload_param=True), 2, trainable=False)
    assert frozen["zero_optimization"]["offload_param"] == {"device": "cpu"}


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_offload_param_needs_zero3(stage: int) -> None:
    with pytest.raises(ValueError, match=rf"offload_param: needs zero_stage=3.*zero_stage={stage}"):
        EngineConfig(zero_stage=stage, offload_param=True)


def test_zero3_init_needs_zero3() -> None:
    from rlhf_hybrid.zero_init import build_causal_lm

    with pytest.raises(ValueError, match="zero_stage: partitioned construction needs zero_stage=3, got 2"):
        build_causal_lm(_config(), EngineConfig(zero_stage=2), partition=True)


def test_offloaded_optimizer_takes_the_same_step() -> None:
    """ZeRO-1 with the optimizer state on the CPU (a torch AdamW stepping the CPU partitions): the weights after
    two steps equal the non-offloaded engine's, to fp32 rounding. DeepSpeed refused this configuration with
    a client optimizer before zero_force_ds_cpu_optimizer was set."""
    from rlhf_hybrid.zero_init import build_causal_lm

    ids = torch.randint(1, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    states = []
    for offload in (False, True):
        cfg = EngineConfig(zero_stage=1, micro_batch_size=2, lr=1e-2, offload_optimizer=offload)
        engine = HybridEngine(build_causal_lm(_config(), cfg, seed=1), cfg)
        for _ in range(2):
            engine.backward(-engine.token_logprobs(ids, mask).mean())
            engine.step()
        states.append(engine.full_state_dict())
    before = build_causal_lm(_config(), EngineConfig(), seed=1).state_dict()
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=1e-5, atol=1e-6)
        assert "norm" in k or not torch.equal(v, before[k]), f"{k} did not change"


def test_partitioned_model_is_refused_by_a_non_zero3_engine_and_a_wrong_dtype() -> None:
    from rlhf_hybrid.zero_init import build_causal_lm, is_partitioned
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    model = build_causal_lm(_config(), EngineConfig(zero_stage=3), seed=0)
    assert is_partitioned(model)
    assert not is_deepspeed_zero3_enabled(), "the HfDeepSpeedConfig outlived the build (transformers reads it globally)"
    with pytest.raises(ValueError, match="zero_stage: model was built ZeRO-3 partitioned; .* got 0"):
        HybridEngine(model, EngineConfig(zero_stage=0))
    with pytest.raises(ValueError, match=r"dtype: parameter 'model.embed_tokens.weight' was partitioned in "
                                         r"torch.float32, the engine trains in torch.bfloat16"):
        HybridEngine(model, EngineConfig(zero_stage=3, dtype="bf16"))


def test_seeded_init_follows_the_models_scheme_and_leaves_the_rng_alone() -> None:
    """Independent of the partitioned path: a whole model's seeded init has transformers' Llama scheme
    (linear and embedding weights N(0, initializer_range^2), norm weights 1), differs between seeds, is the
    same for the same seed, and does not move the caller's RNG."""
    from rlhf_hybrid.zero_init import build_causal_lm

    torch.manual_seed(123)
    want_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_causal_lm(_config(hidden_size=64, intermediate_size=256), EngineConfig(), seed=5).state_dict()
    assert torch.equal(torch.rand(3), want_next)
    b = build_causal_lm(_config(hidden_size=64, intermediate_size=256), EngineConfig(), seed=5).state_dict()
    c = build_causal_lm(_config(hidden_size=64, intermediate_size=256), EngineConfig(), seed=6).state_dict()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
        if "norm" in k:
            assert torch.equal(v, torch.ones_like(v)), k
            continue
        assert not torch.equal(v, c[k]), k
        w = v[1:] if "embed" in k else v  # the padding row (id 0) of the embedding is zero
        assert abs(float(w.std()) - 0.3) < 0.03 and abs(float(w.mean())) < 0.02, (k, float(w.std()))
    assert torch.equal(a["model.embed_tokens.weight"][0], torch.zeros(64))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_global_rng_build_equals_transformers_whole_build(dtype: str) -> None:
    """``seed=None`` (the CLI's demo model): built partitioned, the weights equal transformers' own
    ``from_config`` build from the same global RNG state, exactly, and the RNG is left where that build
    leaves it (the CLI draws from it afterwards); the attention implementation reaches the config."""
    from rlhf_hybrid.zero_init import build_causal_lm, is_partitioned
    from transformers import AutoModelForCausalLM

    cfg = EngineConfig(zero_stage=3, dtype=dtype)
    config = _config(tie_word_embeddings=True)  # as the demo's tiny Llama
    torch.manual_seed(31)
    want = AutoModelForCausalLM.from_config(config, dtype=cfg.torch_dtype).state_dict()
    want_next = torch.rand(4)
    torch.manual_seed(31)
    part = build_causal_lm(config, cfg, seed=None, attn_implementation="eager")
    assert torch.equal(torch.rand(4), want_next), "the partitioned build drew another amount of random numbers"
    assert is_partitioned(part) and part.config._attn_implementation == "eager"
    got = HybridEngine(part, cfg, trainable=False).full_state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert float(want["model.layers.0.mlp.up_proj.weight"].float().std()) > 0.1  # drawn, not zeros


def test_older_format_value_model_loads_partitioned(tmp_path) -> None:
    """A causal LM + value_head.safetensors checkpoint under ZeRO-3: built partitioned (head included), the
    gathered weights equal the files' tensors exactly, and the scores equal transformers' backbone with that
    head and the whole-loaded model's."""
    from rlhf_hybrid import ValueModel
    from rlhf_hybrid.zero_init import build_value_model, is_partitioned
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, LlamaForCausalLM

    torch.manual_seed(7)
    LlamaForCausalLM(_config()).save_pretrained(tmp_path / "old")
    w = torch.randn(1, 32)
    save_file({"v_head.weight": w}, str(tmp_path / "old" / "value_head.safetensors"))
    cfg = EngineConfig(zero_stage=3, micro_batch_size=3)
    vm = build_value_model(tmp_path / "old", cfg, trainable=False)
    assert is_partitioned(vm) and hasattr(vm.head.weight, "ds_id")
    engine = HybridEngine(vm, cfg, trainable=False)
    got = engine.full_state_dict()
    files = {f"model.{k}": v for k, v in load_file(str(tmp_path / "old" / "model.safetensors")).items()
             if not k.startswith("lm_head")} | {"model.score.weight": w}
    assert got.keys() == files.keys()
    for k, v in files.items():
        assert torch.equal(got[k], v), k
    ids = torch.randint(2, 61, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        scores = engine.score(ids, mask)
        backbone = AutoModel.from_pretrained(tmp_path / "old").eval()
        torch.testing.assert_close(scores, backbone(ids).last_hidden_state[:, -1] @ w[0], atol=1e-5, rtol=1e-5)
        whole = HybridEngine(ValueModel.from_pretrained(str(tmp_path / "old")), EngineConfig(), trainable=False)
        assert torch.equal(scores, whole.score(ids, mask))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["causal_lm", "value"])
def test_gradient_checkpointing_on_a_partitioned_build(kind: str, optimizer: str) -> None:
    """A model built ZeRO-3 partitioned, with and without gradient checkpointing: the same loss (exactly: the
    same forward) and, after one step, the same weights (atol 1e-6, rtol 1e-5: recomputed activations
    give the same gradients up to fp32 summation order)."""
    from rlhf_hybrid.zero_init import build_causal_lm, build_value_model

    ids = torch.randint(1, 61, (3, 9), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    results = []
    for ckpt in (False, True):
        cfg = EngineConfig(zero_stage=3, optimizer=optimizer, lr=0.5 if optimizer == "sgd" else 1e-2,
                           micro_batch_size=3, max_grad_norm=0, gradient_checkpointing=ckpt,
                           extra={"zero_allow_untested_optimizer": True})
        build = build_value_model if kind == "value" else build_causal_lm
        model = build(_config(), cfg, seed=3)
        if kind == "value":  # a zero head would send no gradient into the backbone (this head is still whole)
            with torch.no_grad():
                model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(1)))
        engine = HybridEngine(model, cfg)
        layers = [m for m in engine.module.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing == ckpt for m in layers)
        before = engine.full_state_dict()
        engine.train()
        if kind == "value":
            loss = (engine.values(ids, mask) * mask - 1).pow(2).mean()
        else:
            loss = -(engine.token_logprobs(ids, mask) * mask[:, 1:]).mean()
        engine.backward(loss)
        engine.step()
        results.append((loss.detach(), engine.full_state_dict()))
    (loss0, w0), (loss1, w1) = results
    assert torch.equal(loss1, loss0)
    moved = [k for k in w0 if not torch.equal(w0[k], before[k])]
    assert len(moved) > len(w0) // 2, moved
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], atol=1e-6, rtol=1e-5, msg=k)
