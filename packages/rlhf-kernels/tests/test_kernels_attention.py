"""decode_attention against an oracle written here: per sequence, per head, softmax(q K^T / sqrt(D)) V
over the filled prefix in fp64 (GQA by repeating kv heads), on both backends."""

from __future__ import annotations

import pytest
import torch
from rlhf_kernels import decode_attention

# (atol, rtol): fp32 softmax and accumulation (the Triton kernel in blocks, with an online
# softmax), then one rounding of the output to the dtype.
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2e-3, 2**-8), torch.float16: (2e-4, 2**-10)}
DTYPES = list(TOL)


def oracle(q, k_cache, v_cache, lengths, scale):
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        if n == 0:
            continue
        k = k_cache[b, :, :n].double().repeat_interleave(group, dim=0)  # (Hq, n, D)
        v = v_cache[b, :, :n].double().repeat_interleave(group, dim=0)
        scores = torch.einsum("hd,hnd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,hnd->hd", scores.softmax(-1), v)
    return out


# (B, Hq, Hkv, S_max, D, lengths): batch 1 and 7, GQA 4:1 and 8:1, MHA, odd head dim, ragged
# lengths including 0 (an empty slot), 1 and the full cache, lengths that are not block multiples.
CASES = [
    (1, 4, 4, 40, 64, [40]),
    (7, 8, 2, 70, 32, [1, 70, 17, 0, 33, 64, 2]),
    (3, 8, 1, 50, 24, [50, 3, 49]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, Hq, Hkv, S, D, lengths", CASES)
def test_decode_attention_matches_oracle(backend, device, dtype, B, Hq, Hkv, S, D, lengths):
    gen = torch.Generator().manual_seed(B * 10 + Hkv)
    q = torch.randn(B, Hq, D, generator=gen).to(dtype)
    k_cache = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    v_cache = torch.randn(B, Hkv, S, D, generator=gen).to(dtype)
    lengths_t = torch.tensor(lengths)
    # Garbage past each sequence's length must not leak into its output.
    for b, n in enumerate(lengths):
        k_cache[b, :, n:] = 1e4
        v_cache[b, :, n:] = float("nan")
    out = decode_attention(q.to(device), k_cache.to(device), v_cache.to(device), lengths_t.to(device))
    want = oracle(q, k_cache, v_cache, lengths_t, D**-0.5)
    assert out.dtype == dtype and out.shape == (B, Hq, D)
    torch.testing.assert_close(out.cpu().double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_sequence_major_cache_layout_and_custom_scale(backend, device):
    # A (B, S_max, Hkv, D) buffer (flash-attn layout) passed as its (B, Hkv, S_max, D) transpose.
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 16, generator=gen)
    k_bshd = torch.randn(2, 20, 2, 16, generator=gen)
    v_bshd = torch.randn(2, 20, 2, 16, generator=gen)
    lengths = torch.tensor([20, 9])
    out = decode_attention(
        q.to(device), k_bshd.to(device).transpose(1, 2), v_bshd.to(device).transpose(1, 2), lengths.to(device), scale=0.3
    )
    want = oracle(q, k_bshd.transpose(1, 2), v_bshd.transpose(1, 2), lengths, 0.3)
    torch.testing.assert_close(out.cpu().double(), want, atol=2e-5, rtol=1e-4)


def test_hand_computed_two_slots():
    # One head, D = 1, keys 0 and ln 3 (scale 1): weights 1/4, 3/4 -> 0.25 * 4 + 0.75 * 8 = 7.
    q = torch.ones(1, 1, 1)
    k = torch.tensor([0.0, torch.log(torch.tensor(3.0)).item(), 99.0]).view(1, 1, 3, 1)
    v = torch.tensor([4.0, 8.0, -1.0]).view(1, 1, 3, 1)
    out = decode_attention(q, k, v, torch.tensor([2]), scale=1.0)
    torch.testing.assert_close(out, torch.tensor([[[7.0]]]))


def test_invalid_inputs_raise():
    q, kv = torch.randn(2, 6, 8), torch.randn(2, 4, 10, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention(q, kv, kv, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="cache_seqlens"):
        decode_attention(torch.randn(2, 4, 8), kv, kv, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="dtype"):
        decode_attention(torch.randn(2, 4, 8).double(), kv, kv, torch.tensor([1, 2]))


def test_reference_over_the_whole_cache_equals_the_prefix():
    # With lengths on an accelerator the reference attends over all S_max slots (reading the longest
    # length would be a host sync, impossible inside a CUDA graph). Same inputs as the oracle test,
    # the whole-cache branch forced on CPU, against the same fp64 oracle.
    from rlhf_kernels.attention import _decode_attention_reference

    B, Hq, Hkv, S, D, lengths = CASES[1]
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, Hq, D, generator=gen)
    k_cache = torch.randn(B, Hkv, S, D, generator=gen)
    v_cache = torch.randn(B, Hkv, S, D, generator=gen)
    lengths_t = torch.tensor(lengths)
    for b, n in enumerate(lengths):
        k_cache[b, :, n:] = 1e4
        v_cache[b, :, n:] = float("nan")
    out = _decode_attention_reference(q, k_cache, v_cache, lengths_t, scale=D**-0.5, longest=S)
    torch.testing.assert_close(out.double(), oracle(q, k_cache, v_cache, lengths_t, D**-0.5), atol=2e-5, rtol=1e-4)
