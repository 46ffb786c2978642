"""apply_rotary_ against an fp64 oracle written here (Hugging Face's rotate_half form, angles
computed from the positions in fp64), in place, on strided views, ragged positions, both backends."""

from __future__ import annotations

import math

import pytest
import torch
from rlhf_kernels import apply_rotary_, rotary_cos_sin

# (atol, rtol): fp32 math on fp32 tables, one rounding to the dtype (half an ulp).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2**-8), torch.float16: (1e-5, 2**-11)}
DTYPES = list(TOL)


def oracle(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float) -> torch.Tensor:
    """(B, T, H, D) -> rotated copy in fp64: x * cos + rotate_half(x) * sin on the first R dims."""
    xd = x.double()
    inv_freq = torch.tensor([base ** (-2 * i / rotary_dim) for i in range(rotary_dim // 2)], dtype=torch.float64)
    angles = positions.double()[..., None] * inv_freq  # (B, T, R/2)
    cos = torch.cat([angles.cos(), angles.cos()], -1)[:, :, None, :]  # (B, T, 1, R)
    sin = torch.cat([angles.sin(), angles.sin()], -1)[:, :, None, :]
    rot = xd[..., :rotary_dim]
    half = rotary_dim // 2
    rotate_half = torch.cat([-rot[..., half:], rot[..., :half]], -1)
    return torch.cat([rot * cos + rotate_half * sin, xd[..., rotary_dim:]], -1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B, T, Hq, Hk, D, R",
    [(1, 5, 4, 4, 64, 64), (7, 3, 8, 2, 24, 24), (2, 1, 3, 1, 40, 16)],  # full, GQA, partial rotary
)
def test_rotary_matches_oracle_in_place(backend, device, dtype, B, T, Hq, Hk, D, R):
    gen = torch.Generator().manual_seed(B * 100 + D)
    q = torch.randn(B, T, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, T, Hk, D, generator=gen).to(dtype)
    positions = torch.randint(0, 500, (B, T), generator=gen)  # ragged: every token its own position
    cos, sin = rotary_cos_sin(512, R, base=10000.0, device=device)
    q_dev, k_dev = q.clone().to(device), k.clone().to(device)
    q_out, k_out = apply_rotary_(q_dev, k_dev, cos, sin, positions.to(device))
    assert q_out is q_dev and k_out is k_dev  # in place
    for got, x in ((q_dev, q), (k_dev, k)):
        want = oracle(x, positions, R, 10000.0)
        torch.testing.assert_close(got.cpu().double(), want, atol=TOL[dtype][0], rtol=TOL[dtype][1])
        assert torch.equal(got[..., R:].cpu(), x[..., R:])  # dims past R untouched


def test_rotary_on_transposed_head_major_views(backend, device):
    # Hugging Face keeps q as (B, H, T, D); its transpose is a strided (B, T, H, D) view, written through.
    gen = torch.Generator().manual_seed(1)
    q_bhtd = torch.randn(2, 4, 5, 32, generator=gen)
    k_bhtd = torch.randn(2, 2, 5, 32, generator=gen)
    positions = torch.arange(5).repeat(2, 1) + torch.tensor([[0], [7]])
    cos, sin = rotary_cos_sin(64, 32)
    want_q = oracle(q_bhtd.transpose(1, 2), positions, 32, 10000.0).transpose(1, 2)
    want_k = oracle(k_bhtd.transpose(1, 2), positions, 32, 10000.0).transpose(1, 2)
    q_dev, k_dev = q_bhtd.clone().to(device), k_bhtd.clone().to(device)
    apply_rotary_(q_dev.transpose(1, 2), k_dev.transpose(1, 2), cos.to(device), sin.to(device), positions.to(device))
    torch.testing.assert_close(q_dev.cpu().double(), want_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_dev.cpu().double(), want_k, atol=1e-5, rtol=1e-5)


def test_rotary_hand_computed():
    # D = R = 2, position 1, base 10000: one pair rotated by 1 radian.
    q = torch.tensor([[[[1.0, 0.0]]]])
    k = torch.tensor([[[[0.0, 2.0]]]])
    cos, sin = rotary_cos_sin(2, 2)
    apply_rotary_(q, k, cos, sin, torch.tensor([[1]]))
    c, s = math.cos(1.0), math.sin(1.0)
    torch.testing.assert_close(q, torch.tensor([[[[c, s]]]]))
    torch.testing.assert_close(k, torch.tensor([[[[-2 * s, 2 * c]]]]))


def test_invalid_inputs_raise():
    cos, sin = rotary_cos_sin(8, 4)
    q, k, pos = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 1, 4), torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="R <= D"):
        apply_rotary_(q, k, *rotary_cos_sin(8, 6), pos)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary_(q, k, cos, sin, pos.float())
    with pytest.raises(ValueError, match="k .* must match q"):
        apply_rotary_(q, k.double(), cos, sin, pos)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary_cos_sin(8, 3)
