"""HybridEngine in a world of one (gloo on CPU): invariants against plain HF / PyTorch references.

* greedy tokens of ``HybridEngine.generate`` == HF ``model.generate`` on the same weights, with
  ragged left-padded prompts, under ZeRO-0 and ZeRO-3 (where generation runs on gathered weights);
* ``token_logprobs`` == a log_softmax + gather reference computed here;
* checkpoints load back (causal LM and value head), are written atomically, and a failure while
  writing leaves the previous checkpoint intact;
* ``EngineConfig`` rejects bad values naming the field.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import pytest
import torch
from rlhf_hybrid import EngineConfig, HybridEngine, ValueModel, atomic_dir
from torch.testing import assert_close

PAD, EOS, VOCAB = 0, 1, 97


pytestmark = pytest.mark.usefixtures("world_of_one")  # conftest.py


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def ragged_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 5, 2 and 7. (3, 7) ids and mask."""
    from rlhf_hybrid.testing import ragged_prompts as make

    return make(VOCAB, (5, 2, 7), pad=PAD, low=2)


def reference_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, start: int, temperature: float = 1.0):
    """log_softmax(logits / T) gathered at the next tokens, positions counted over real tokens."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()  # (B, L, V)
    logp = torch.log_softmax(logits[:, start - 1 : -1] / temperature, dim=-1)  # (B, L - start, V)
    lp = logp.gather(-1, ids[:, start:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return lp, entropy


@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.parametrize("generation", ["hf", "fast"])
@pytest.mark.parametrize("trainable", [True, False])
def test_greedy_generate_matches_hf_and_logprobs_match_reference(zero_stage: int, trainable: bool,
                                                                    generation: str) -> None:
    model = tiny_llama()
    hf = copy.deepcopy(model)  # the plain HF reference; the engine's copy may be sharded in place
    engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, micro_batch_size=3, generation=generation),
                          trainable=trainable)
    ids, mask = ragged_prompts()

    got = engine.generate(ids, mask, max_new_tokens=16, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert engine.generation_used == generation  # no silent fallback
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                           eos_token_id=EOS, pad_token_id=PAD)
    assert got.shape == want.shape
    assert torch.equal(got.cpu(), want), (got, want)
    assert torch.equal(got[:, :7].cpu(), ids)  # the prompts come back unchanged

    # training-time log-probs of the generated tokens == the reference, at temperatures 1 and 0.7
    full_mask = torch.cat([mask, torch.ones_like(got[:, 7:])], dim=1)
    for temperature in (1.0, 0.7):
        want_lp, want_ent = reference_logprobs(hf, got, full_mask, 7, temperature)
        lp, ent = engine.token_logprobs(got, full_mask, 7, temperature=temperature, return_entropy=True)
        assert lp.shape == (3, got.shape[1] - 7)
        assert_close(lp.float().cpu(), want_lp, atol=1e-5, rtol=1e-5)
        assert_close(ent.float().cpu(), want_ent, atol=1e-5, rtol=1e-5)
    # from start=1 (SFT's use): every token but the first
    lp1 = engine.token_logprobs(got, full_mask, 1)
    assert_close(lp1.float().cpu(), reference_logprobs(hf, got, full_mask, 1)[0], atol=1e-5, rtol=1e-5)


def test_zero3_full_state_dict_round_trips() -> None:
    model = tiny_llama(seed=2)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    engine = HybridEngine(model, EngineConfig(zero_stage=3, micro_batch_size=2))
    got = engine.full_state_dict()
    for k, v in want.items():
        assert_close(got[k], v, msg=k)
    # overwrite with other weights and read them back
    other = tiny_llama(seed=3).state_dict()
    engine.load_full_state_dict(other)
    back = engine.full_state_dict()
    for k, v in other.items():
        assert_close(back[k], v, msg=k)


def test_training_step_changes_weights_under_zero3() -> None:
    model = tiny_llama(seed=4)
    engine = HybridEngine(model, EngineConfig(zero_stage=3, micro_batch_size=3, lr=1e-2))
    before = engine.full_state_dict()
    ids, mask = ragged_prompts()
    loss = -engine.token_logprobs(ids, mask, 1).mean()
    engine.backward(loss)
    engine.step()
    after = engine.full_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_step_stats_report_the_steps_lr_and_pre_clipping_grad_norm(zero_stage: int) -> None:
    # Independent expectation: the same loss on a plain copy of the model, its gradient's global L2 norm
    # from torch, before any clipping (max_grad_norm=1.0 clips here: the norm is far above 1).
    model = tiny_llama(seed=5)
    plain = copy.deepcopy(model).train()
    ids, mask = ragged_prompts()
    loss = -reference_logprobs_with_grad(plain, ids, mask).mean() * 100  # a norm well above the clip of 1.0
    loss.backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plain.parameters()])).item()
    assert expected > 1.0
    engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, micro_batch_size=3, lr=1e-2, warmup_steps=4))
    assert engine.step_stats() == {}  # before the first step
    engine.train()
    engine.backward(-engine.token_logprobs(ids, mask, 1).mean() * 100)
    engine.step()
    stats = engine.step_stats()
    assert stats["lr"] == pytest.approx(1e-2 * 1 / 4)  # warm-up step 1 of 4: lr_factor = 1/4 (engine.lr_factor)
    assert stats["grad_norm"] == pytest.approx(expected, rel=1e-4)
    frozen = HybridEngine(tiny_llama(seed=5), EngineConfig(zero_stage=zero_stage, micro_batch_size=3), trainable=False)
    assert frozen.step_stats() == {}


def reference_logprobs_with_grad(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-probs of tokens 1.. (B, L - 1), with gradients (positions counted over real tokens)."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()  # (B, L, V)
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def test_save_pretrained_loads_with_automodel(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_llama(seed=5)
    ref = copy.deepcopy(model)
    engine = HybridEngine(model, EngineConfig(zero_stage=3, micro_batch_size=2))
    out = tmp_path / "actor"
    engine.save_pretrained(str(out))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for k, v in ref.state_dict().items():
        assert_close(loaded.state_dict()[k], v, msg=k)
    assert not list(tmp_path.glob("*.tmp-*")), "the temporary directory was left behind"
    assert not list(tmp_path.glob("*.old-*"))


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_value_model_round_trip(tmp_path, zero_stage: int) -> None:
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    vm = ValueModel(tiny_llama(seed=6))
    with torch.no_grad():
        vm.head.weight.normal_()  # a fresh head is all zeros; make it recognisable
    ids, mask = ragged_prompts()
    with torch.no_grad():
        want = vm(ids, mask)  # (B, L)
    head = vm.head.weight.detach().clone()
    engine = HybridEngine(vm, EngineConfig(zero_stage=zero_stage, micro_batch_size=3))
    assert_close(engine.values(ids, mask).detach().cpu(), want)
    out = tmp_path / "critic"
    engine.save_pretrained(str(out))
    assert not (out / "value_head.safetensors").exists()  # the head is the sequence classifier's score.weight
    back = ValueModel.from_pretrained(str(out))
    assert_close(back.head.weight, head)
    with torch.no_grad():
        assert_close(back(ids, mask), want)
    hf = AutoModelForSequenceClassification.from_pretrained(out)  # transformers loads the trained head
    assert isinstance(hf, LlamaForSequenceClassification) and hf.config.num_labels == 1
    assert_close(hf.score.weight, head)
    # a plain causal-LM directory gives a fresh, all-zero head
    plain = tmp_path / "plain"
    tiny_llama(seed=7).save_pretrained(plain)
    assert torch.count_nonzero(ValueModel.from_pretrained(str(plain)).head.weight) == 0


def test_atomic_dir_replaces_only_on_success(tmp_path) -> None:
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "weights.txt").write_text("v1")
    assert (final / "weights.txt").read_text() == "v1"

    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(final) as tmp:
            (tmp / "weights.txt").write_text("half of v2")
            raise RuntimeError("disk full")
    assert (final / "weights.txt").read_text() == "v1"  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no *.tmp-* / *.old-* left

    with atomic_dir(final) as tmp:
        (tmp / "other.txt").write_text("v3")
    assert sorted(p.name for p in final.iterdir()) == ["other.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --------------------------------------------------------------------------------------------
# EngineConfig validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"zero_stage": 4}, ["zero_stage", "4", "0, 1, 2, 3"]),
        ({"dtype": "fp8"}, ["dtype", "'fp8'", "'fp32'"]),
        ({"micro_batch_size": 0}, ["micro_batch_size", ">= 1"]),
        ({"grad_accum": 0}, ["grad_accum", ">= 1"]),
        ({"offload_optimizer": True, "zero_stage": 0}, ["offload_optimizer", "zero_stage"]),
        ({"gather_quantization": "int2"}, ["gather_quantization", "'int2'", "'int8'"]),
        ({"gather_quantization": "int8", "zero_stage": 2, "generation": "fast"},
         ["gather_quantization", "zero_stage=3", "zero_stage=2"]),
        ({"gather_quantization": "int8", "zero_stage": 3}, ["gather_quantization", "generation='fast'"]),
    ],
)
def test_engine_config_rejects_bad_values(kwargs: dict, needles: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        EngineConfig(**kwargs)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


def test_generate_refuses_a_value_model() -> None:
    engine = HybridEngine(ValueModel(tiny_llama()), EngineConfig(), trainable=False)
    ids, mask = ragged_prompts()
    with pytest.raises(TypeError, match="value model"):
        engine.generate(ids, mask, max_new_tokens=2)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_packed_rows_score_like_separate_rows(zero_stage: int) -> None:
    """token_logprobs on packed rows (attention_mask=None, restarting position_ids) equals the HF
    model's log-probs of each example alone."""
    from rlhf_data import collate_packed, pack_sft
    from rlhf_hybrid import EngineConfig, HybridEngine

    model = tiny_llama(seed=4)
    g = torch.Generator().manual_seed(2)
    examples = [{"input_ids": torch.randint(2, VOCAB, (n,), generator=g).tolist(), "prompt_len": 1} for n in (6, 3, 5)]
    rows = pack_sft(examples, max_len=9)  # [6 + 3], [5]
    b = collate_packed(rows, PAD)
    alone = []
    for e in examples:
        ids = torch.tensor([e["input_ids"]])
        alone.append(reference_logprobs(model, ids, torch.ones_like(ids), 1)[0][0])
    engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, lr=1e-3, micro_batch_size=2))
    with torch.no_grad():
        lp = engine.token_logprobs(b["input_ids"], None, 1, position_ids=b["position_ids"]).float().cpu()  # (2, 8)
    # row 0 = example 0 (positions 0-5) then example 1 (6-8); lp[:, j] scores token j + 1
    torch.testing.assert_close(lp[0, :5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[0, 6:8], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp[1, :4], alone[2], atol=1e-5, rtol=1e-5)


def test_fast_generation_falls_back_to_hf_with_a_warning_naming_the_reason(caplog) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64,
                                             pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)).eval()
    hf = copy.deepcopy(model)
    engine = HybridEngine(model, EngineConfig(micro_batch_size=3, generation="fast"), trainable=False)
    ids, mask = ragged_prompts()
    with caplog.at_level("WARNING", logger="rlhf_hybrid.engine"):
        got = engine.generate(ids, mask, max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert engine.generation_used == "hf"
    assert any("generation='fast' is not available" in r.message and "GPTNeoX" in r.message for r in caplog.records), (
        caplog.text)
    with torch.no_grad():
        want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=EOS,
                           pad_token_id=PAD)
    assert torch.equal(got.cpu(), want)


def _family(name: str):
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    torch.manual_seed(0)
    if name == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=16,
                                        dropout=0.0, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)).eval()
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=EOS, eos_token_id=EOS)).eval()
    # GPT-NeoX: rotary buffers (inv_freq) that ZeRO-3 leaves whole, and no fast-path adapter
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, bos_token_id=EOS,
                                            eos_token_id=EOS)).eval()


@pytest.mark.parametrize("family", ["opt", "gpt2", "gpt-neox"])
def test_zero3_hf_generation_copy_matches_hf(family: str) -> None:
    """ZeRO-3 + generation='hf': the per-layer gathered weights go into a plain model built on the
    meta device (its buffers copied from the trained model); greedy tokens equal HF on the original."""
    model = _family(family)
    reference = copy.deepcopy(model)
    engine = HybridEngine(model, EngineConfig(zero_stage=3, micro_batch_size=3))
    ids, mask = ragged_prompts()
    got = engine.generate(ids, mask, max_new_tokens=12, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        want = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                  eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(got, want)
    assert engine.generation_used == "hf" and engine.timings["gather_collectives"] == 3


@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.parametrize("generation", ["hf", "fast"])
@pytest.mark.parametrize("do_sample,temperature", [(False, 1.0), (True, 0.7)])
def test_sampling_logprobs_match_the_training_recomputation(zero_stage: int, generation: str, do_sample: bool,
                                                            temperature: float) -> None:
    """generate(return_logprobs=True): the generator's log-probs of its own tokens == ``token_logprobs`` of
    the same sequences at the same temperature (fp32), 0 after a row's EOS; the default return is unchanged."""
    model = tiny_llama(seed=4)
    with torch.no_grad():  # greedy decoding of this model repeats token 65; as EOS it ends two rows early
        model.lm_head.weight[EOS] = 1.05 * model.lm_head.weight[65]
    engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, micro_batch_size=3, generation=generation))
    engine.eval()
    ids, mask = ragged_prompts()
    P = ids.shape[1]
    torch.manual_seed(0)
    seqs, lp = engine.generate(ids, mask, max_new_tokens=16, do_sample=do_sample, temperature=temperature,
                               eos_token_id=EOS, pad_token_id=PAD, return_logprobs=True)
    assert engine.generation_used == generation
    seqs, lp = seqs.cpu(), lp.cpu()
    assert lp.shape == (3, seqs.shape[1] - P) and lp.dtype == torch.float32
    is_eos = (seqs[:, P:] == EOS).long()
    valid = (is_eos.cumsum(1) - is_eos) == 0  # (3, R): up to and including the first EOS
    if not do_sample:
        assert valid.sum(1).tolist() == [16, 12, 3]  # two rows finished early: the zeros after EOS are exercised
    want = engine.token_logprobs(seqs, torch.cat([mask, valid.long()], dim=1), P, temperature=temperature)
    assert_close(lp[valid], want.float().cpu()[valid], atol=1e-5, rtol=0)
    assert (lp[~valid] == 0).all()
    assert (lp[valid] < 0).all()  # real log-probs, not a placeholder
    plain = engine.generate(ids, mask, max_new_tokens=4, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    assert isinstance(plain, torch.Tensor)


def test_tp_own_rows_cuts_logprobs_like_the_sequences() -> None:
    """A tensor-parallel group generates 2 ranks' prompts together; each rank keeps its rows, its own
    prompt width and the steps until its last row finished, for sequences and log-probs alike."""
    from rlhf_hybrid.generation import _tp_own_rows

    # group batch: rank 0's two rows, then rank 1's two rows; group prompt width 3, rank 1's prompts
    # are 2 wide (1 column of left padding); 4 generated steps
    seqs = torch.tensor([[5, 6, 7, 10, 11, 12, 13],
                         [5, 6, 7, 20, 21, 22, 23],
                         [0, 8, 9, 30, EOS, PAD, PAD],
                         [0, 8, 9, 40, 41, EOS, PAD]])
    lp = -torch.arange(1.0, 17.0).reshape(4, 4)
    own = (slice(2, 4), 2, 1)  # rank 1: rows 2-3, prompt width 2, one column of left padding
    got, got_lp = _tp_own_rows(seqs, own, EOS, lp)
    # its last row emitted EOS at step 3: three response columns, the group's fourth step dropped
    assert torch.equal(got, torch.tensor([[8, 9, 30, EOS, PAD], [8, 9, 40, 41, EOS]]))
    assert torch.equal(got_lp, torch.tensor([[-9.0, -10.0, -11.0], [-13.0, -14.0, -15.0]]))
    # rank 0's rows never finished: every step kept
    got, got_lp = _tp_own_rows(seqs, (slice(0, 2), 3, 0), EOS, lp)
    assert torch.equal(got, seqs[:2]) and torch.equal(got_lp, lp[:2])
    assert _tp_own_rows(seqs, own, EOS)[1] is None
