"""Reward models / critics in transformers' sequence-classification format, the older format, and the
model-loading settings (dtype, attn_implementation, trust_remote_code, revision, gradient checkpointing).

References are transformers' own classes (``AutoModelForSequenceClassification``, ``AutoModel``), never
this package's code.
"""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports deepspeed

import pytest
import torch
from rlhf_hybrid import EngineConfig, HybridEngine, ValueModel, hf_kwargs, load_causal_lm, load_tokenizer
from torch.testing import assert_close

pytestmark = pytest.mark.usefixtures("world_of_one", "one_thread")  # conftest.py

PAD, EOS, VOCAB = 0, 1, 64


def llama_config(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=PAD, eos_token_id=EOS, tie_word_embeddings=False, **kw)


def sequences(seed: int = 0) -> list[torch.Tensor]:
    """Three token sequences of different lengths, without pad or EOS tokens (ids 2..VOCAB-1)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in (7, 4, 6)]


def padded(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids padded with PAD on ``side`` and their attention mask."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), PAD)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(L - len(s), L) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def hf_scores(model, seqs: list[torch.Tensor]) -> torch.Tensor:
    """transformers' score of each sequence alone (batch of one, no padding): (B,)."""
    with torch.no_grad():
        return torch.cat([model(s[None]).logits[:, 0] for s in seqs])


@pytest.fixture()
def foreign_rm(tmp_path):
    """A tiny random LlamaForSequenceClassification (num_labels=1) saved by transformers, as TRL would."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(3)
    model = LlamaForSequenceClassification(llama_config(num_labels=1)).eval()
    model.save_pretrained(tmp_path / "foreign")
    return tmp_path / "foreign", model


@pytest.mark.parametrize("side", ["right", "left"])
def test_foreign_sequence_classifier_scores_like_transformers(foreign_rm, side: str) -> None:
    path, hf = foreign_rm
    vm = ValueModel.from_pretrained(str(path))
    assert_close(vm.head.weight, hf.score.weight)  # the trained head, not a fresh one
    engine = HybridEngine(vm, EngineConfig(), trainable=False)
    ids, mask = padded(sequences(), side)
    with torch.no_grad():
        ours = engine.score(ids, mask)
    # positions over real tokens: left padding gives the unpadded sequence's score (fp32, same ops)
    assert_close(ours, hf_scores(hf, sequences()), atol=1e-5, rtol=1e-5)
    if side == "right":  # transformers' own batched forward (last non-pad token) agrees on right padding
        with torch.no_grad():
            assert_close(ours, hf(ids, attention_mask=mask).logits[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_saved_value_model_loads_in_transformers_with_its_head(tmp_path, zero_stage: int) -> None:
    from transformers import AutoModelForSequenceClassification, LlamaForCausalLM

    torch.manual_seed(5)
    vm = ValueModel(LlamaForCausalLM(llama_config()))
    with torch.no_grad():
        vm.head.weight.normal_()
    engine = HybridEngine(vm, EngineConfig(zero_stage=zero_stage, micro_batch_size=3))
    ids, mask = padded(sequences(1), "right")
    with torch.no_grad():
        ours = engine.score(ids, mask).cpu()
    tok = type("Tok", (), {"pad_token_id": PAD, "save_pretrained": lambda self, d: None})()
    engine.save_pretrained(str(tmp_path / "rm"), tokenizer=tok)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.architectures == ["LlamaForSequenceClassification"]
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == PAD
    with torch.no_grad():
        assert_close(hf(ids, attention_mask=mask).logits[:, 0], ours, atol=1e-5, rtol=1e-5)


def test_older_format_causal_lm_plus_value_head_still_loads(tmp_path) -> None:
    """A causal LM directory with value_head.safetensors (v_head.weight), as this project saved it before:
    the score is the head applied to transformers' last hidden state at the last token."""
    from safetensors.torch import save_file
    from transformers import AutoModel, LlamaForCausalLM

    torch.manual_seed(7)
    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "old")
    w = torch.randn(1, 32)
    save_file({"v_head.weight": w}, str(tmp_path / "old" / "value_head.safetensors"))
    vm = ValueModel.from_pretrained(str(tmp_path / "old"))
    backbone = AutoModel.from_pretrained(tmp_path / "old").eval()
    seqs = sequences(2)
    with torch.no_grad():
        want = torch.stack([backbone(s[None]).last_hidden_state[0, -1] @ w[0] for s in seqs])
        ids, mask = padded(seqs, "right")
        got = HybridEngine(vm, EngineConfig(), trainable=False).score(ids, mask)
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_older_format_with_a_bias_is_rejected_by_name(tmp_path) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "old")
    save_file({"v_head.weight": torch.zeros(1, 32), "v_head.bias": torch.ones(1)},
              str(tmp_path / "old" / "value_head.safetensors"))
    with pytest.raises(ValueError, match=r"value_head\.safetensors.*v_head\.bias"):
        ValueModel.from_pretrained(str(tmp_path / "old"))


def test_classifier_with_two_labels_is_rejected(tmp_path) -> None:
    from transformers import LlamaForSequenceClassification

    LlamaForSequenceClassification(llama_config(num_labels=2)).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="num_labels=2"):
        ValueModel.from_pretrained(str(tmp_path / "two"))


def test_dtype_and_attn_implementation_reach_the_model(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(llama_config()).save_pretrained(tmp_path / "m")
    lm = load_causal_lm(str(tmp_path / "m"), torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in lm.parameters()} == {torch.bfloat16}
    assert lm.config._attn_implementation == "eager"
    assert load_causal_lm(str(tmp_path / "m"), attn_implementation="sdpa").config._attn_implementation == "sdpa"
    vm = ValueModel.from_pretrained(str(tmp_path / "m"), torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in vm.parameters()} == {torch.bfloat16}
    assert vm.config._attn_implementation == "eager"


def test_trust_remote_code_and_revision_reach_from_pretrained(tmp_path, monkeypatch) -> None:
    """No hub here: the calls into transformers are captured."""
    import transformers

    seen = []

    def capture(cls_name):
        def from_pretrained(path, *args, **kwargs):
            seen.append((cls_name, kwargs.get("trust_remote_code"), kwargs.get("revision")))
            raise OSError("captured")
        return from_pretrained

    for cls_name in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(getattr(transformers, cls_name), "from_pretrained", capture(cls_name))
    kw = {"trust_remote_code": True, "revision": "v1.2"}
    for load in (lambda: load_causal_lm("org/some-model", **kw), lambda: load_tokenizer("org/some-model", **kw),
                 lambda: ValueModel.from_pretrained("org/some-model", **kw)):
        with pytest.raises(OSError):
            load()
    assert seen == [(c, True, "v1.2") for c in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig")]
    assert "revision" not in hf_kwargs() and hf_kwargs()["trust_remote_code"] is False


@pytest.mark.parametrize("zero_stage", [0, 3])
@pytest.mark.parametrize("kind", ["causal_lm", "value"])
def test_gradient_checkpointing_gives_the_same_loss_and_update(kind: str, zero_stage: int) -> None:
    """One SGD step (update = -lr * grad) with and without checkpointing: equal loss and equal weights after."""
    from transformers import LlamaForCausalLM

    ids, mask = padded(sequences(4), "right")
    results = []
    for ckpt in (False, True):
        torch.manual_seed(11)
        model = LlamaForCausalLM(llama_config())
        if kind == "value":
            model = ValueModel(model)
            with torch.no_grad():
                model.head.weight.normal_()
        engine = HybridEngine(model, EngineConfig(zero_stage=zero_stage, optimizer="sgd", lr=0.5, micro_batch_size=3,
                                                  max_grad_norm=0, gradient_checkpointing=ckpt,
                                                  extra={"zero_allow_untested_optimizer": True}))
        layers = [m for m in engine.module.modules() if hasattr(m, "gradient_checkpointing")]
        assert layers and all(m.gradient_checkpointing == ckpt for m in layers)
        before = engine.full_state_dict()
        engine.train()
        if kind == "value":
            loss = (engine.values(ids, mask) * mask).pow(2).mean()
        else:
            loss = -(engine.token_logprobs(ids, mask) * mask[:, 1:]).mean()
        engine.backward(loss)
        engine.step()
        results.append((loss.detach(), engine.full_state_dict()))
    (loss0, w0), (loss1, w1) = results
    assert_close(loss1, loss0, atol=0, rtol=0)  # the forward is the same computation
    moved = [k for k in w0 if not torch.equal(w0[k], before[k])]
    assert len(moved) > len(w0) // 2, moved  # the step changed the weights: the comparison below means something
    for k in w0:  # recomputed activations give the same gradients, hence the same SGD update
        assert_close(w1[k], w0[k], atol=1e-6, rtol=1e-5, msg=k)
