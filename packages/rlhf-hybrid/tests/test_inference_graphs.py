"""The static decode path (batch-size buckets, static buffers, DecodeGraphs) against HF and the eager path.

On CPU the static path runs the very step function a CUDA graph captures, eagerly, so these tests
check everything but the capture and replay themselves:

* greedy tokens == HF ``generate`` == the eager path, for batches that are not bucket sizes (3 and
  5 rows: padding rows in the bucket), with an EOS that rows emit at different steps, and with EOS
  ids that end every row early while the stop check runs only every few steps;
* sampled tokens and log-probs == the eager path's for the same generator seed;
* :class:`DecodeGraphs` reuses a bucket's "graph" while the layout's tensors and the cache are the
  same and recaptures otherwise, through a CPU stand-in for the capture that, like a graph, keeps
  running the step it was given (the layout, cache views and buffers of the capturing call): a
  wrongly reused graph would compute with stale weights or buffers and differ from eager;
* on a CUDA GPU only: graph replay == eager, tokens and log-probs; the static step runs with CUDA's
  sync debug mode set to "error" (no host sync inside what a graph captures).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rlhf_hybrid.inference import BATCH_BUCKETS, DecodeGraphs, bucket_size, build_layout, generate
from rlhf_hybrid.testing import ragged_prompts
from rlhf_hybrid.testing import tiny_model as make_model

PAD, VOCAB, NEW = 0, 97, 24


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


FAMILIES = ("llama-gqa", "opt", "gpt2")  # of rlhf_hybrid.testing.TINY_FAMILIES
LENGTHS = {3: (5, 2, 7), 5: (5, 2, 7, 1, 4)}  # 3 rows run in bucket 4, 5 rows in bucket 8


def hf_greedy(model, ids, mask, eos):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                          eos_token_id=eos, pad_token_id=PAD)


def test_bucket_size():
    assert [bucket_size(b) for b in (1, 2, 3, 5, 8, 9, 17, 25, 33, 49, 65, 97, 128)] == \
        [1, 2, 4, 8, 8, 16, 24, 32, 48, 64, 96, 128, 128]
    assert [bucket_size(b) for b in (129, 192, 193, 1000)] == [192, 192, 256, 1024]  # multiples of 64
    assert all(bucket_size(b) == b for b in BATCH_BUCKETS)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="batch"):
            bucket_size(bad)


@pytest.mark.parametrize("batch", [3, 5])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_static_greedy_matches_hf_and_eager(name, batch):
    model = make_model(name)
    layout = build_layout(model)
    ids, mask = ragged_prompts(VOCAB, LENGTHS[batch], pad=PAD, low=1)
    P = ids.shape[1]
    graphs = DecodeGraphs()

    def both(**kw):
        eager = generate(layout, ids, mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, **kw).sequences
        static = generate(layout, ids, mask, max_new_tokens=NEW, do_sample=False, pad_token_id=PAD,
                          graphs=graphs, stop_check_every=5, **kw).sequences
        return eager, static

    # 1. No EOS: every row runs all NEW steps; padding rows of the bucket change nothing.
    ref = hf_greedy(model, ids, mask, None)
    eager, static = both()
    torch.testing.assert_close(eager, ref, rtol=0, atol=0)
    torch.testing.assert_close(static, ref, rtol=0, atol=0)

    # 2. An EOS that row 0 emits by its 4th token: rows finish at different steps (or never).
    eos = int(ref[0, P + 3])
    ref_eos = hf_greedy(model, ids, mask, eos)
    eager, static = both(eos_token_id=eos)
    torch.testing.assert_close(eager, ref_eos, rtol=0, atol=0)
    torch.testing.assert_close(static, ref_eos, rtol=0, atol=0)

    # 3. EOS ids that every row emits within 4 tokens: all rows finish by step 4, HF stops there;
    # the static path checks only at step 5 and must trim the extra step(s) away.
    eos_ids = [int(ref[r, P + 3]) for r in range(batch)]
    ref_stop = hf_greedy(model, ids, mask, eos_ids)
    assert ref_stop.shape[1] <= P + 4
    eager, static = both(eos_token_id=eos_ids)
    torch.testing.assert_close(eager, ref_stop, rtol=0, atol=0)
    torch.testing.assert_close(static, ref_stop, rtol=0, atol=0)


def test_late_stop_check_on_the_eager_path_changes_nothing():
    model = make_model("opt")
    layout = build_layout(model)
    ids, mask = ragged_prompts(VOCAB, LENGTHS[5], pad=PAD, low=1)
    ref = generate(layout, ids, mask, max_new_tokens=NEW, do_sample=False).sequences
    eos_ids = [int(ref[r, ids.shape[1] + 2]) for r in range(5)]  # every row ends by step 3
    want = generate(layout, ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos_ids)
    for k in (2, 7, NEW + 5):
        got = generate(layout, ids, mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos_ids,
                       stop_check_every=k)
        torch.testing.assert_close(got.sequences, want.sequences, rtol=0, atol=0)


def test_static_sampled_tokens_and_logprobs_match_eager():
    model = make_model("llama-gqa", seed=1)
    layout = build_layout(model)
    ids, mask = ragged_prompts(VOCAB, LENGTHS[5], pad=PAD, low=1)
    kw = dict(max_new_tokens=NEW, do_sample=True, temperature=0.7, top_k=40, top_p=0.95, eos_token_id=5,
              pad_token_id=PAD, return_logprobs=True)
    eager = generate(layout, ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    static = generate(layout, ids, mask, generator=torch.Generator().manual_seed(0), graphs=DecodeGraphs(),
                      stop_check_every=4, **kw)
    # Same seeds step by step, the sampler's noise keyed by (seed, row, token): the same draws. The
    # logits come from an (8, H) instead of a (5, H) matmul, which may round differently in the
    # last bit; here that never flips a draw.
    torch.testing.assert_close(static.sequences, eager.sequences, rtol=0, atol=0)
    torch.testing.assert_close(static.logprobs, eager.logprobs, rtol=0, atol=1e-5)


class FakeCapture:
    """A CPU stand-in for CUDA-graph capture with a graph's semantics where they matter here.

    Like the real capture it runs one warm-up step (which writes into the cache and buffers before
    prefill), and the "graph" keeps running the step closure it was given, i.e. the layout, cache
    views, buffers and rotary tables of the call that captured it, writing into one static output.
    """

    def __init__(self):
        self.count = 0
        self.rows: list[int] = []  # the batch each captured step runs at

    def __call__(self, step):
        self.count += 1
        out = step().clone()  # the warm-up step; its result only sizes the static output
        self.rows.append(out.shape[0])

        def replay():
            out.copy_(step())
            return out

        return replay


def test_decode_graphs_reuse_and_recapture():
    model = make_model("llama-gqa")
    layout = build_layout(model)
    capture = FakeCapture()
    graphs = DecodeGraphs(capture=capture)
    ids3, mask3 = ragged_prompts(VOCAB, LENGTHS[3], pad=PAD, low=1)
    ids5, mask5 = ragged_prompts(VOCAB, LENGTHS[5], pad=PAD, low=1, seed=2)

    def check(lay, ids, mask, captures, new=NEW):
        kw = dict(max_new_tokens=new, do_sample=False, return_logprobs=True)
        want = generate(lay, ids, mask, **kw)
        got = generate(lay, ids, mask, cuda_graphs=True, graphs=graphs, **kw)
        torch.testing.assert_close(got.sequences, want.sequences, rtol=0, atol=0)
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)
        assert capture.count == captures

    check(layout, ids3, mask3, 1)  # bucket 4: captured
    check(layout, ids3, mask3, 1)  # replayed
    check(layout, ids3[:, 3:], mask3[:, 3:], 1)  # another prompt width, same cache: replayed
    check(layout, ids5, mask5, 2)  # bucket 8: the cache grows to 8 rows, so every graph is dropped
    check(layout, ids3, mask3, 3)  # bucket 4 again, recaptured against the new cache
    assert capture.rows == [4, 8, 4]
    check(layout, ids5, mask5, 3)
    check(dataclasses.replace(layout), ids5, mask5, 3)  # a new layout object, the same tensors: replayed

    # Training updates shared weights in place (ZeRO-0/1/2): the graph reads the new values.
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)
    assert layout.lm_head.data_ptr() == model.lm_head.weight.data_ptr()
    check(layout, ids5, mask5, 3)

    # A rebuilt layout (new fused QKV tensors, as ZeRO-3's gathered weights): recaptured.
    rebuilt = build_layout(model)
    check(rebuilt, ids5, mask5, 4)
    check(rebuilt, ids5, mask5, 4)
    # A longer generation than the cache holds (128 slots): reallocated, recaptured.
    check(rebuilt, ids5, mask5, 5, new=200)
    check(rebuilt, ids5, mask5, 5)
    # Another model's weights (same shapes): recaptured; wrongly replaying would give its old tokens.
    check(build_layout(make_model("llama-gqa", seed=3)), ids5, mask5, 6)

    graphs.clear()
    check(rebuilt, ids5, mask5, 7)


def test_cuda_graphs_on_cpu_and_bad_options_raise():
    layout = build_layout(make_model("gpt2"))
    ids, mask = ragged_prompts(VOCAB, LENGTHS[3], pad=PAD, low=1)
    with pytest.raises(RuntimeError, match="CUDA device"):
        generate(layout, ids, mask, max_new_tokens=4, do_sample=False, cuda_graphs=True)
    with pytest.raises(RuntimeError, match="CUDA device"):
        generate(layout, ids, mask, max_new_tokens=4, do_sample=False, cuda_graphs=True, graphs=DecodeGraphs())
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="stop_check_every"):
            generate(layout, ids, mask, max_new_tokens=4, do_sample=False, stop_check_every=bad)
    with pytest.raises(ValueError, match="length_multiple"):
        DecodeGraphs(length_multiple=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (captures and replays CUDA graphs)")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_cuda_graph_replay_matches_eager(name):
    model = make_model(name).cuda()
    layout = build_layout(model)
    graphs = DecodeGraphs()
    for batch in (3, 5, 3):  # bucket 4, bucket 8 (cache regrown), bucket 4 recaptured
        ids, mask = ragged_prompts(VOCAB, LENGTHS[batch], pad=PAD, low=1)
        ids, mask = ids.cuda(), mask.cuda()
        P = ids.shape[1]
        kw = dict(max_new_tokens=NEW, do_sample=False, return_logprobs=True, pad_token_id=PAD)
        eager = generate(layout, ids, mask, cuda_graphs=False, **kw)
        eos = int(eager.sequences[0, P + 3])
        for extra in ({}, {"eos_token_id": eos}):
            want = generate(layout, ids, mask, cuda_graphs=False, stop_check_every=1, **kw, **extra)
            got = generate(layout, ids, mask, cuda_graphs=True, graphs=graphs, stop_check_every=8, **kw, **extra)
            torch.testing.assert_close(got.sequences, want.sequences, rtol=0, atol=0)
            # Greedy log-probs are log_softmax of the logits at each chosen token.
            torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-4)
    assert graphs.captures == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA's sync debug mode)")
@pytest.mark.parametrize("name", list(FAMILIES))
def test_static_decode_step_never_syncs_with_the_host(name):
    # What a graph captures must not sync: run the static step eagerly with syncs made errors.
    from rlhf_hybrid.inference.model import prefill

    layout = build_layout(make_model(name).cuda())
    ids, mask = ragged_prompts(VOCAB, LENGTHS[5], pad=PAD, low=1)
    ids, mask = ids.cuda(), mask.cuda()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    static = DecodeGraphs().prepare(layout, 5, ids.shape[1] + NEW, capture=False)
    prefill(layout, static.prefill_cache(5), ids, mask, positions, static.rope)
    static.start(positions[:, -1] + 1)
    static.run()  # first calls: backend choice, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            static.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
