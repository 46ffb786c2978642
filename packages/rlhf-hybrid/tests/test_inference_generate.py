"""rlhf_hybrid.inference against Hugging Face, on tiny random fp32 models of every supported family.

* greedy tokens == HF ``model.generate(do_sample=False)`` on the same weights, 64 new tokens, for
  ragged left-padded prompts (lengths 5, 2, 7); with an EOS that some rows emit (padding after it
  as HF does) and with EOS ids that every row emits (early stop: HF's shorter output length);
* sampled-token log-probs == a training-mode recomputation (HF forward over the whole sequence,
  log_softmax at the sampling temperature, gathered): max abs diff <= 1e-4;
* ``supported()`` names the reason for unsupported models and configurations, never raises.

The references are HF's own ``generate`` and forward, never this package's output. Weights are
re-drawn with std 0.3 (HF's init uses 0.02): with near-uniform logits every model repeats one token
and the greedy comparison would test little.
"""

from __future__ import annotations

import pytest
import torch
from rlhf_hybrid.inference import build_layout, generate, supported
from rlhf_hybrid.testing import TINY_FAMILIES as FAMILIES
from rlhf_hybrid.testing import tiny_family
from rlhf_hybrid.testing import tiny_model as make_model

PAD, VOCAB, NEW = 0, 97, 64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def ragged_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 5, 2 and 7. (3, 7) ids and mask."""
    from rlhf_hybrid.testing import ragged_prompts as make

    return make(VOCAB, (5, 2, 7), pad=PAD, low=1)


def hf_greedy(model, ids, mask, eos):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=PAD)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_matches_hf_generate(name):
    model = make_model(name)
    assert supported(model) is None
    ids, mask = ragged_prompts()
    P = ids.shape[1]
    layout = build_layout(model)

    # 1. No EOS: all 64 tokens of every row.
    ref = hf_greedy(model, ids, mask, None)
    assert ref.shape == (3, P + NEW)
    ours = generate(layout, ids, mask, max_new_tokens=NEW, do_sample=False).sequences
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)

    # 2. An EOS that row 0 emits by its 4th new token: row 0 is padded after it, the others go on
    # (or stop wherever they emit it too), exactly as HF does.
    eos = int(ref[0, P + 3])
    first = int((ref[0, P:] == eos).nonzero()[0])  # row 0's first emission, at step <= 3
    ref_eos = hf_greedy(model, ids, mask, eos)
    assert ref_eos[0, P + first] == eos and (ref_eos[0, P + first + 1 :] == PAD).all()
    ours_eos = generate(layout, ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                        pad_token_id=PAD).sequences
    torch.testing.assert_close(ours_eos, ref_eos, rtol=0, atol=0)

    # 3. Several EOS ids, one that each row emits within 4 tokens: every row finishes and both
    # stop early, returning the same shorter sequences.
    eos_ids = [int(ref[r, P + 3]) for r in range(3)]
    ref_stop = hf_greedy(model, ids, mask, eos_ids)
    assert ref_stop.shape[1] <= P + 4
    ours_stop = generate(layout, ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos_ids,
                         pad_token_id=PAD).sequences
    torch.testing.assert_close(ours_stop, ref_stop, rtol=0, atol=0)


def train_mode_logprobs(model, seqs: torch.Tensor, prompt_mask: torch.Tensor, eos: int,
                        temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """HF forward over whole sequences: log_softmax(logits / T) at each generated token. (B, R) x 2.

    Returns the log-probs and the mask of generated tokens up to and including each row's EOS.
    """
    P = prompt_mask.shape[1]
    gen = seqs[:, P:]  # (B, R)
    is_eos = gen == eos
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    gen_mask = (~after_eos).long()
    mask = torch.cat([prompt_mask, gen_mask], dim=1)  # (B, P + R)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=seqs, attention_mask=mask, position_ids=pos).logits.float()  # (B, P+R, V)
    logp = torch.log_softmax(logits[:, P - 1 : -1] / temperature, dim=-1)  # (B, R, V)
    return logp.gather(-1, gen[..., None])[..., 0], gen_mask.bool()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_sampled_logprobs_match_train_mode_recomputation(name):
    model = make_model(name, seed=1)
    ids, mask = ragged_prompts()
    layout = build_layout(model)
    eos, temperature = 5, 0.7
    kw = dict(max_new_tokens=32, do_sample=True, temperature=temperature, top_k=40, top_p=0.95,
              eos_token_id=eos, pad_token_id=PAD, return_logprobs=True)
    out = generate(layout, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    again = generate(layout, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    torch.testing.assert_close(again.sequences, out.sequences, rtol=0, atol=0)  # seeded: reproducible

    ref, valid = train_mode_logprobs(model, out.sequences, mask, eos, temperature)
    assert out.logprobs.shape == ref.shape and out.logprobs.dtype == torch.float32
    assert (ref[valid] > -30).all()  # top-k/top-p never let an (almost) impossible token through
    assert (out.logprobs[valid] - ref[valid]).abs().max() <= 1e-4
    assert (out.logprobs[~valid] == 0).all()  # after EOS: padding, log-prob 0


def test_layout_reads_the_given_state_dict_and_shares_storage():
    # Under ZeRO-3 the module holds shards and the weights come from a gathered state dict: the
    # layout must read the state dict only (here: another model's weights).
    shell, source = make_model("llama-gqa", seed=0), make_model("llama-gqa", seed=7)
    state = source.state_dict()
    layout = build_layout(shell, state)
    ids, mask = ragged_prompts()
    ours = generate(layout, ids, mask, max_new_tokens=16, do_sample=False).sequences
    ref = source.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    # Unfused weights are the state dict's tensors themselves; the fused QKV is built once.
    assert layout.layers[0].o_weight.data_ptr() == state["model.layers.0.self_attn.o_proj.weight"].data_ptr()
    assert layout.layers[0].qkv_weight.shape == (4 * 8 + 2 * 2 * 8, 32)


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=4, intermediate_size=64))


def _bloom():
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))


@pytest.mark.parametrize("factory, expected", [
    (_gpt_neox, "GPTNeoXForCausalLM"),
    (_bloom, "BloomForCausalLM"),
    (lambda: tiny_family("llama", rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), "'linear'"),
    (lambda: tiny_family("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1), "sliding_attention"),
    (lambda: tiny_family("gpt2", add_cross_attention=True), "cross-attention"),
])
def test_supported_names_the_reason(factory, expected):
    model = factory()
    reason = supported(model)
    assert isinstance(reason, str) and expected in reason
    with pytest.raises(NotImplementedError, match=expected.strip("'")):
        build_layout(model)


def test_lengths_beyond_the_model_limits_are_refused():
    ids, mask = ragged_prompts()
    mistral = make_model("mistral")
    mistral.config.sliding_window = 16  # the layout copies the window at build time
    assert "sliding window 16" in supported(mistral, max_length=7 + 10)
    assert supported(mistral, max_length=16) is None
    with pytest.raises(NotImplementedError, match="sliding window"):
        generate(build_layout(mistral), ids, mask, max_new_tokens=10, do_sample=False)

    opt = make_model("opt")  # 128 learned positions
    assert "max_position_embeddings" in supported(opt, max_length=7 + 200)
    with pytest.raises(ValueError, match="learned positions"):
        generate(build_layout(opt), ids, mask, max_new_tokens=200, do_sample=False)


def test_prompts_must_be_left_padded():
    layout = build_layout(make_model("gpt2"))
    ids, mask = ragged_prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate(layout, ids.flip(1), mask.flip(1), max_new_tokens=4, do_sample=False)
