"""peft LoRA models in the hybrid engine, against an independent reference: a plain HF model whose
weights are fused by hand here, ``W + (lora_alpha / r) B A`` (transposed for GPT-2's Conv1D), never
through peft's merge or this package's fusion.

* greedy tokens of ``HybridEngine.generate`` (generation "hf" and "fast", ZeRO-0 and ZeRO-3 in one
  process) == HF ``generate`` of the reference, fp32, 16 new tokens, ragged left-padded prompts;
  the adapter visibly matters (the base model's tokens differ) and the base weights and adapters
  are unchanged bit for bit afterwards;
* ``save_pretrained`` writes plain HF keys that load into ``AutoModelForCausalLM`` with the
  reference's weights;
* only the active adapter is fused (a second, inactive one is ignored; disabled adapters fuse
  nothing), and what cannot be fused raises, naming it.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

peft = pytest.importorskip("peft")

from rlhf_hybrid import EngineConfig, HybridEngine  # noqa: E402
from rlhf_hybrid.lora import merged_state_dict, plain_model  # noqa: E402

PAD, EOS, VOCAB, RANK, ALPHA = 0, 1, 97, 4, 8.0


pytestmark = pytest.mark.usefixtures("world_of_one", "one_thread")  # conftest.py


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        **_common())), ["q_proj", "v_proj", "down_proj"]


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=32, max_position_embeddings=64, **_common())), (
        ["q_proj", "out_proj", "fc1"])


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    # Conv1D layers: weights stored (in, out), peft needs fan_in_fan_out=True
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_common())), (
        ["c_attn", "c_proj", "c_fc"])


def _common() -> dict:
    return dict(vocab_size=VOCAB, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)


FAMILIES = {"llama": _llama, "opt": _opt, "gpt2": _gpt2}


def peft_model_and_reference(family: str, seed: int = 0):
    """(peft LoRA model with non-zero B, base model, reference = base with each adapter fused by hand)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base, targets = FAMILIES[family]()
    with torch.no_grad():  # std 0.3, not HF's 0.02: near-uniform logits would make greedy tokens say little
        for p in base.parameters():
            if p.dim() == 2:  # matrices; norms keep weight 1 and bias 0 (random ones make OPT repeat one token)
                p.normal_(0.0, 0.3)
    base.eval()
    conv1d = family == "gpt2"
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets,
                                                           fan_in_fan_out=conv1d))
    reference = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, peft.tuners.lora.Linear):
                b = m.lora_B["default"].weight  # (out, r); peft starts it at 0
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
                delta = (ALPHA / RANK) * (b @ m.lora_A["default"].weight)  # (out, in)
                ref = reference.get_submodule(name.removeprefix("base_model.model."))
                ref.weight += delta.t() if conv1d else delta  # Conv1D holds (in, out)
    return model.eval(), base, reference


def _hf_greedy(model, ids, mask, new: int = 16):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                              eos_token_id=EOS, pad_token_id=PAD)


@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.parametrize("generation", ["hf", "fast"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generation_matches_the_hand_fused_reference(family: str, generation: str, zero_stage: int) -> None:
    from rlhf_hybrid.testing import ragged_prompts

    model, base, reference = peft_model_and_reference(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # base weights and adapters
    engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, micro_batch_size=3, generation=generation))
    ids, mask = ragged_prompts(VOCAB, pad=PAD, low=2)
    got = engine.generate(ids, mask, max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert engine.generation_used == generation
    want = _hf_greedy(reference, ids, mask)
    assert torch.equal(got.cpu(), want)
    assert not torch.equal(_hf_greedy(base, ids, mask), want), "the adapter should change the greedy tokens"
    after = engine.full_state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed in generation"


@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_save_pretrained_is_the_plain_fused_model(family: str, zero_stage: int, tmp_path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model, _, reference = peft_model_and_reference(family)
    engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, micro_batch_size=2))
    engine.save_pretrained(str(tmp_path / "ckpt"))
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if "base_model" in k or "base_layer" in k or "lora_" in k], keys
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(loaded) is type(reference)
    want = reference.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=k)


def test_only_the_active_adapter_is_fused_and_disabled_adapters_fuse_nothing() -> None:
    from peft import LoraConfig

    model, base, reference = peft_model_and_reference("llama")
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4.0, target_modules=["k_proj", "up_proj"],
                                          init_lora_weights=False))  # non-zero B, but not active
    assert model.active_adapters == ["default"]
    want, state = reference.state_dict(), merged_state_dict(model)
    assert state.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(state[k], want[k], atol=1e-6, rtol=1e-6, msg=k)
    with model.disable_adapter():
        state = merged_state_dict(model)
    for k, v in base.state_dict().items():
        assert torch.equal(state[k], v), k
    assert plain_model(model) is model.base_model.model


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_training_moves_only_the_adapters(zero_stage: int) -> None:
    model, _, _ = peft_model_and_reference("gpt2")
    engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, micro_batch_size=2, lr=1e-2))
    before = engine.full_state_dict()
    ids = torch.randint(2, VOCAB, (2, 8))
    engine.backward(-engine.token_logprobs(ids, torch.ones_like(ids), 1).mean())
    engine.step()
    after = engine.full_state_dict()
    moved = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert moved and all(".lora_A." in k or ".lora_B." in k for k in moved), moved


def _dora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))


def _two_active(model):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    m.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"]))
    m.base_model.set_adapter(["default", "b"])
    return m


def _ia3(model):
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(target_modules=["q_proj"], feedforward_modules=[]))


def _prompt_tuning(model):
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def _modules_to_save(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))


def _merged(model):
    from peft import LoraConfig, get_peft_model

    m = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    m.merge_adapter()
    return m


@pytest.mark.parametrize(("build", "message"), [
    (_dora, r"peft LoRA variant DoRA \(use_dora=True\) .* is not supported"),
    (_two_active, r"several active peft adapters \['b', 'default'\] are not supported"),
    (_ia3, r"peft type IA3 \(adapter 'default'\) is not supported"),
    (_prompt_tuning, r"peft type PROMPT_TUNING \(adapter 'default'\) is not supported"),
    (_modules_to_save, r"peft ModulesToSaveWrapper at '.*lm_head' .* is not supported"),
    (_merged, r"peft adapters \['default'\] are merged into .* in place \(merge_adapter\)"),
], ids=["dora", "two-active", "ia3", "prompt-tuning", "modules-to-save", "merged"])
def test_what_cannot_be_fused_raises_naming_it(build, message: str) -> None:
    model = build(_llama()[0])
    with pytest.raises(NotImplementedError, match=message):
        HybridEngine(model, EngineConfig(zero_stage=0, micro_batch_size=2))
    with pytest.raises(NotImplementedError, match=message):
        merged_state_dict(model)
