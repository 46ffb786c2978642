"""LoRA adapters in the hybrid engine, against independent references: a plain HF model holding
W + (alpha/r) B A built here by hand (never the module's own merge)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from rlhf_hybrid import EngineConfig, HybridEngine
from rlhf_hybrid.lora import LoRALinear, apply_lora, merged_state_dict

PAD, EOS, VOCAB = 0, 1, 97


pytestmark = pytest.mark.usefixtures("world_of_one")  # conftest.py


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS,
                                        bos_token_id=None)).eval()


def lora_model_and_reference(rank: int = 4, alpha: float = 8.0):
    """A LoRA model with non-zero adapters, and a plain copy whose weights are W + (alpha/r) B A."""
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = copy.deepcopy(base)
    apply_lora(model, rank=rank, alpha=alpha, targets=("q_proj", "v_proj", "down_proj"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.5 * torch.randn(m.lora_B.shape, generator=g))
                ref = reference.get_submodule(name)
                ref.weight += (alpha / rank) * (m.lora_B @ m.lora_A)  # by hand, in the reference
    return model, reference


def test_apply_lora_freezes_the_base_and_starts_as_the_identity() -> None:
    base = tiny_llama()
    model = copy.deepcopy(base)
    names = apply_lora(model, rank=2, targets=("q_proj", "o_proj"))
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    ids = torch.randint(2, VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits)  # B = 0: nothing changes yet
    with pytest.raises(ValueError, match="match no linear layer; the model's are: .*q_proj"):
        apply_lora(tiny_llama(), targets=("nosuch",))


def test_merged_state_dict_is_the_plain_models() -> None:
    model, reference = lora_model_and_reference()
    merged = merged_state_dict(model)
    want = reference.state_dict()
    assert set(merged) == set(want)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.parametrize("generation", ["hf", "fast"])
def test_generation_with_adapters_matches_the_fused_reference(zero_stage: int, generation: str) -> None:
    from rlhf_hybrid.testing import ragged_prompts

    model, reference = lora_model_and_reference()
    engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, micro_batch_size=3, generation=generation))
    ids, mask = ragged_prompts(VOCAB, pad=PAD, low=2)
    got = engine.generate(ids, mask, max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert engine.generation_used == generation
    with torch.no_grad():
        want = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                  eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got.cpu(), want)


def test_training_moves_only_the_adapters_and_the_checkpoint_is_plain(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model, _ = lora_model_and_reference()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".base." in n}
    engine = HybridEngine(model, EngineConfig(zero_stage=0, micro_batch_size=2, lr=1e-2))
    ids = torch.randint(2, VOCAB, (2, 8))
    lp = engine.token_logprobs(ids, torch.ones_like(ids), 1)
    engine.backward(-lp.mean())
    engine.step()
    after = dict(engine.module.named_parameters())
    for n, p in base_before.items():
        assert torch.equal(after[n], p), f"{n} changed"
    engine.save_pretrained(str(tmp_path / "ckpt"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert not any(isinstance(m, LoRALinear) for m in loaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, engine.module(ids).logits, atol=1e-5, rtol=1e-5)


def test_quantized_gather_is_refused_with_lora() -> None:
    model = tiny_llama()
    apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="gather_quantization: 'int8' is not supported with LoRA"):
        HybridEngine(model, EngineConfig(zero_stage=3, generation="fast", gather_quantization="int8"))
