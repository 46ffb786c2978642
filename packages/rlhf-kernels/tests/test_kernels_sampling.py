"""sample: greedy against torch.argmax; kept sets worked out by hand; the reference's draws against
the filtered softmax (chi-square); the Triton kernel against the reference token for token."""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_kernels import hash_uniform, sample, use_backend

# Probabilities 0.5, 0.2, 0.15, 0.1, 0.05 (sorted, so the kept sets below are easy to read off).
PROBS = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
LOGITS5 = PROBS.log()


def draws(logits_row: torch.Tensor, n: int, seed: int, **kwargs) -> torch.Tensor:
    """n draws from one row: n identical rows, each with its own noise."""
    return sample(logits_row.expand(n, -1).contiguous(), seed=seed, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B, V", [(1, 50272), (7, 123)])
def test_greedy_is_argmax(backend, device, dtype, B, V):
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(V)).to(dtype)
    logits[0, V - 1] = 100.0  # the last column: the masked tail of the last block must not hide it
    got = sample(logits.to(device), temperature=0.0, top_k=3, top_p=0.1)  # filters ignored when greedy
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), logits.float().argmax(-1))
    assert got[0] == V - 1


KEPT_CASES = [
    ({"top_k": 1}, {0}),
    ({"top_k": 3}, {0, 1, 2}),
    ({"top_p": 0.45}, {0}),  # mass above token 1 is 0.5 >= 0.45: only token 0
    ({"top_p": 0.55}, {0, 1}),  # 0.5 < 0.55 keeps token 1; 0.7 >= 0.55 drops token 2
    ({"top_p": 0.9}, {0, 1, 2, 3}),  # 0.85 < 0.9 keeps token 3
    # top-k first, then top-p over the renormalised top 3 (0.588, 0.235, 0.176): 0.588 < 0.7
    # keeps token 1, 0.824 >= 0.7 drops token 2.
    ({"top_k": 3, "top_p": 0.7}, {0, 1}),
    # Temperature 3 flattens the top 3 to p^(1/3) renormalised = 0.416, 0.306, 0.278: the mass
    # above token 2 is 0.722 < 0.75, so it stays.
    ({"top_k": 3, "top_p": 0.75, "temperature": 3.0}, {0, 1, 2}),
]


@pytest.mark.parametrize("kwargs, kept", KEPT_CASES)
def test_reference_kept_sets_worked_out_by_hand(kwargs, kept):
    with use_backend("reference"):
        got = set(draws(LOGITS5, 64, seed=11, **kwargs).tolist())
    assert got == kept  # each kept token (p >= 0.17 after filtering) is drawn in 64 draws


@pytest.mark.parametrize("kwargs, kept", [KEPT_CASES[i] for i in (1, 3, 5, 6)])
def test_triton_kept_sets_match_reference_draw_for_draw(needs_triton, device, kwargs, kept):
    # Fewer draws than above: each row costs ~0.15 s in the interpreter (64 bisection passes).
    with use_backend("reference"):
        want = draws(LOGITS5, 16, seed=11, **kwargs)
    with use_backend("triton"):
        got = draws(LOGITS5.to(device), 16, seed=11, **kwargs).cpu()
    assert torch.equal(got, want) and set(got.tolist()) <= kept


def test_reference_draws_follow_the_filtered_softmax():
    # temperature 0.7, top_k 4, top_p 0.9 over LOGITS5, by hand: z = log p / 0.7 -> p^(1/0.7)
    # renormalised over the top 4; then top-p keeps tokens while the mass above them is < 0.9.
    n = 20000
    with use_backend("reference"):
        tokens = draws(LOGITS5, n, seed=3, temperature=0.7, top_k=4, top_p=0.9)
    p = PROBS[:4] ** (1 / 0.7)
    p = p / p.sum()
    above = torch.cumsum(p, 0) - p
    p = torch.where(above < 0.9, p, torch.zeros_like(p))
    p = p / p.sum()
    assert p[3] == 0  # 0.646, 0.174, 0.116 above token 3 make 0.935 >= 0.9
    counts = torch.bincount(tokens, minlength=5).double()
    assert counts[3] == 0 and counts[4] == 0
    expected = n * p.double()
    nonzero = expected > 0
    chi2 = float((((counts[:4][nonzero] - expected[nonzero]) ** 2) / expected[nonzero]).sum())
    df = int(nonzero.sum()) - 1
    # 99.9% quantile of chi-square(df <= 3) is 16.27: a correct sampler fails this once in 1000 seeds.
    assert chi2 < 16.27, (chi2, df, counts.tolist(), expected.tolist())


@pytest.mark.parametrize(
    "B, V, kwargs",
    [
        (1, 50272, {"temperature": 0.9}),
        (7, 1000, {"temperature": 0.7, "top_k": 50}),
        (7, 1000, {"temperature": 1.0, "top_p": 0.9}),
        (7, 123, {"temperature": 0.8, "top_k": 20, "top_p": 0.5}),
        (1, 5000, {"temperature": 0.8, "top_k": 30, "top_p": 0.8}),  # two vocabulary blocks per pass
    ],
)
def test_triton_draws_the_reference_tokens(needs_triton, device, B, V, kwargs):
    logits = 2 * torch.randn(B, V, generator=torch.Generator().manual_seed(V + B))
    with use_backend("reference"):
        want = sample(logits, seed=1234, **kwargs)
    with use_backend("triton"):
        got = sample(logits.to(device), seed=1234, **kwargs)
    assert torch.equal(got.cpu(), want)


def test_seed_from_torch_generator_is_reproducible():
    logits = torch.randn(4, 100)
    torch.manual_seed(0)
    a = sample(logits)
    torch.manual_seed(0)
    b = sample(logits)
    gen = torch.Generator().manual_seed(0)
    c = sample(logits, generator=gen)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_hash_uniform_is_uniform_and_distinct_within_a_row():
    u = hash_uniform(7, 4, 4096)
    assert u.shape == (4, 4096) and u.dtype == torch.float32
    assert bool(((u > 0) & (u < 1)).all())
    # The 32-bit hash is a bijection of the column; u keeps its top 23 bits, so a few of the 4096
    # columns share a level (about one pair by the birthday bound), not many.
    assert all(row.unique().numel() >= 4090 for row in u)
    # Mean and variance of U(0, 1): 1/2 and 1/12, within ~5 standard errors for 16384 draws.
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert abs(float(u.var()) - 1 / 12) < 0.005
    assert not torch.equal(hash_uniform(8, 4, 4096), u)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_invalid_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.randn(2, 5), **kwargs)
    with pytest.raises(ValueError, match="logits"):
        sample(torch.randn(5))
