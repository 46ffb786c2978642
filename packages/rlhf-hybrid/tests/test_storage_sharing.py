"""Generate mode reads the training weights themselves under ZeRO-0/1/2 (no copy).

* ``order_for_fusion`` / ``pack_fused_params`` against hand-written expectations, and a packed model
  trains exactly as an unpacked copy (same AdamW step, bit for bit);
* through HybridEngine (DeepSpeed ZeRO-0/1/2, fp32 and bf16): the layout's fused q/k/v and gate/up
  matrices are views of the training parameters' storage (0 bytes copied), greedy tokens equal HF
  ``generate`` on the same weights, and after an optimizer step the next rollout sees the new
  weights without any copy (again equal to HF ``generate``).
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import pytest
import torch
from rlhf_hybrid import EngineConfig, HybridEngine
from rlhf_hybrid.inference import build_layout, fused_groups
from rlhf_hybrid.inference.storage import order_for_fusion, pack_fused_params

PAD, EOS, VOCAB = 0, 1, 97


pytestmark = pytest.mark.usefixtures("world_of_one")  # conftest.py


def tiny(kind: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":  # with q/k/v biases (as Qwen2), so bias groups are fused too
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                          tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
        return LlamaForCausalLM(cfg).eval()
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                    pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    return OPTForCausalLM(cfg).eval()


def prompts():
    from rlhf_hybrid.testing import ragged_prompts

    return ragged_prompts(VOCAB, (5, 2, 7), pad=PAD, low=2)


def test_fused_groups_name_the_fused_parts_in_fused_order():
    llama, opt = tiny("llama"), tiny("opt")
    a = "model.layers.1.self_attn."
    assert (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight") in fused_groups(llama)
    assert (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias") in fused_groups(llama)
    assert ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight") in fused_groups(llama)
    assert len(fused_groups(llama)) == 2 * 3  # q/k/v weights, q/k/v biases, gate/up (no MLP bias)
    # OPT declares k, v, q in that order; the layout's order is q, k, v
    o = "model.decoder.layers.0.self_attn."
    assert fused_groups(opt)[0] == (o + "q_proj.weight", o + "k_proj.weight", o + "v_proj.weight")


def test_order_for_fusion_moves_each_group_to_its_first_part():
    params = {n: torch.nn.Parameter(torch.zeros(1)) for n in ("k.w", "k.b", "v.w", "v.b", "q.w", "q.b", "o.w")}
    ordered = order_for_fusion(params.items(), [("q.w", "k.w", "v.w"), ("q.b", "k.b", "v.b")])
    names = {id(p): n for n, p in params.items()}
    # the weight group sits where k.w was, the bias group where k.b was, in fused (q, k, v) order
    assert [names[id(p)] for p in ordered] == ["q.w", "k.w", "v.w", "q.b", "k.b", "v.b", "o.w"]


def test_pack_fused_params_makes_views_and_trains_like_the_unpacked_model():
    model = tiny("llama")
    plain = copy.deepcopy(model)
    packed_bytes = pack_fused_params(model, fused_groups(model))
    a = model.model.layers[0].self_attn
    q, k, v = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.storage_offset() == q.storage_offset() + q.numel() and v.storage_offset() == k.storage_offset() + k.numel()
    # 2 layers x (q 32x32 + k 16x32 + v 16x32 + biases 32+16+16 + gate/up 2x 64x32) fp32
    assert packed_bytes == 2 * (2048 + 64 + 4096) * 4
    for (n, p), (_, r) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p, r), n
    ids, mask = prompts()
    for m in (model, plain):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
        opt.step()
    for (n, p), (_, r) in zip(model.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(p, r), n
    assert a.q_proj.weight.untyped_storage().data_ptr() == a.v_proj.weight.untyped_storage().data_ptr()


def _hf_greedy(module, ids, mask, n):
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                              pad_token_id=PAD, eos_token_id=EOS)
    module.train(was)
    return out


@pytest.mark.parametrize(("kind", "stage", "dtype"), [
    ("llama", 0, "fp32"), ("llama", 1, "fp32"), ("llama", 2, "fp32"), ("llama", 0, "bf16"), ("llama", 2, "bf16"),
    ("opt", 0, "fp32"), ("opt", 2, "fp32"),
])
def test_generate_mode_reads_the_training_weights(kind, stage, dtype):
    model = tiny(kind)
    engine = HybridEngine(model, EngineConfig(zero_stage=stage, dtype=dtype, micro_batch_size=3, lr=5e-2,
                                              generation="fast"))
    ids, mask = prompts()
    n = 12
    before = engine.generate(ids, mask, max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert engine.generation_used == "fast"
    assert engine.timings["layout_copied_mib"] == 0.0
    assert engine.timings["layout_shared_mib"] > 0.0
    # the fused matrices are views of the very tensors DeepSpeed trains
    layout = build_layout(engine.module)
    a = engine.module.model.layers[0].self_attn if kind == "llama" else engine.module.model.decoder.layers[0].self_attn
    assert layout.layers[0].qkv_weight.untyped_storage().data_ptr() == a.q_proj.weight.untyped_storage().data_ptr()
    if dtype == "fp32":
        assert torch.equal(before, _hf_greedy(engine.module, ids, mask, n))

    engine.train()
    loss = engine.logits(ids, mask).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    after = engine.generate(ids, mask, max_new_tokens=n, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert engine.timings["layout_copied_mib"] == 0.0
    assert not torch.equal(before, after)  # the step changed the weights generation reads
    if dtype == "fp32":
        assert torch.equal(after, _hf_greedy(engine.module, ids, mask, n))


def test_zero3_and_hf_generation_do_not_repack():
    """ZeRO-3 shards the parameters (the layout is built from gathered copies) and generation='hf'
    never builds a layout: neither packs."""
    model = tiny("llama")
    HybridEngine(model, EngineConfig(zero_stage=0, generation="hf"))
    a = model.model.layers[0].self_attn
    assert a.q_proj.weight.untyped_storage().data_ptr() != a.k_proj.weight.untyped_storage().data_ptr()


def test_layer_buckets_group_by_decoder_layer():
    from rlhf_hybrid.gather import layer_buckets

    names = ["model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a",
             "model.layers.10.a", "model.norm.weight", "lm_head.weight"]
    assert layer_buckets(names) == [["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
                                    ["model.layers.0.a", "model.layers.0.b"], ["model.layers.1.a"],
                                    ["model.layers.10.a"]]
