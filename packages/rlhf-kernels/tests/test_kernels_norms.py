"""rms_norm / layer_norm (with and without the fused residual add) against fp64 oracles written here
(torch.nn.functional in fp64), outputs and gradients, on both backends."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rlhf_kernels import layer_norm, rms_norm

# (atol, rtol) of the output against the fp64 oracle: fp32 math, then one rounding to the input
# dtype (half an ulp: 2^-9 relative for bf16, 2^-12 for fp16), plus fp32 reduction-order noise.
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 2**-8), torch.float16: (1e-5, 2**-11)}
# Gradients: both backends differentiate the reference in fp32 (the Triton backward recomputes it)
# and round the result to the input dtype.
GRAD_TOL = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (5e-2, 2e-2), torch.float16: (5e-3, 5e-3)}
DTYPES = list(OUT_TOL)
# (rows shape, hidden): the odd hidden 123, batch 1 and 7, a wider row.
SHAPES = [((1, 5), 123), ((7, 3), 123), ((2, 2), 1000)]


def oracle(kind, x, weight, bias, residual, eps):
    h = x if residual is None else x + residual  # in the input dtype, like the model
    hd = h.double()
    if kind == "rms":
        y = F.rms_norm(hd, (hd.shape[-1],), weight.double(), eps=eps)
    else:
        y = F.layer_norm(hd, (hd.shape[-1],), weight.double(), None if bias is None else bias.double(), eps=eps)
    return y, h


def run(kind, x, weight, bias, residual, eps):
    if kind == "rms":
        return rms_norm(x, weight, eps=eps, residual=residual)
    return layer_norm(x, weight, bias, eps=eps, residual=residual)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead, hidden", SHAPES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_forward_and_backward_match_oracle(backend, device, dtype, lead, hidden, kind, with_residual):
    gen = torch.Generator().manual_seed(hidden + len(lead))
    x = (2 * torch.randn(*lead, hidden, generator=gen) + 0.5).to(dtype)
    residual = torch.randn(*lead, hidden, generator=gen).to(dtype) if with_residual else None
    weight = torch.randn(hidden, generator=gen)  # fp32 weight with 16-bit activations, as in mixed precision
    bias = torch.randn(hidden, generator=gen) if kind == "layer" else None
    eps = 1e-5
    g_y = torch.randn(*lead, hidden, generator=gen)
    g_h = torch.randn(*lead, hidden, generator=gen)

    leaves = [t.clone().to(device).requires_grad_() for t in (x, weight)]
    res = residual.clone().to(device).requires_grad_() if with_residual else None
    b = bias.clone().to(device).requires_grad_() if bias is not None else None
    out = run(kind, leaves[0], leaves[1], b, res, eps)
    y, h = out if with_residual else (out, None)
    loss = (y.float() * g_y.to(device)).sum() + ((h.float() * g_h.to(device)).sum() if with_residual else 0)
    loss.backward()

    ref_leaves = [t.clone().requires_grad_() for t in (x, weight)]
    ref_res = residual.clone().requires_grad_() if with_residual else None
    ref_b = bias.clone().requires_grad_() if bias is not None else None
    y_ref, h_ref = oracle(kind, ref_leaves[0], ref_leaves[1], ref_b, ref_res, eps)
    ref_loss = (y_ref * g_y.double()).sum() + ((h_ref.double() * g_h.double()).sum() if with_residual else 0)
    ref_loss.backward()

    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.float().cpu(), y_ref.float(), atol=OUT_TOL[dtype][0], rtol=OUT_TOL[dtype][1])
    if with_residual:
        assert torch.equal(h.cpu(), h_ref)  # the sum is rounded to the input dtype exactly as torch does
    tol = GRAD_TOL[dtype]
    for got, want in [(leaves[0].grad, ref_leaves[0].grad), (leaves[1].grad, ref_leaves[1].grad)]:
        torch.testing.assert_close(got.float().cpu(), want.float(), atol=tol[0], rtol=tol[1])
    if with_residual:
        torch.testing.assert_close(res.grad.float().cpu(), ref_res.grad.float(), atol=tol[0], rtol=tol[1])
    if bias is not None:
        torch.testing.assert_close(b.grad.float().cpu(), ref_b.grad.float(), atol=tol[0], rtol=tol[1])


def test_norm_without_grad_returns_plain_tensors(backend, device):
    x = torch.randn(3, 16, device=device)
    with torch.no_grad():
        y, h = rms_norm(x, torch.ones(16, device=device), residual=torch.ones(3, 16, device=device))
    assert not y.requires_grad and torch.equal(h.cpu(), x.cpu() + 1)


def test_rms_norm_hand_computed():
    # Row [3, 4]: mean square 12.5, rms 3.5355...; weight [1, 2]; eps 0.
    x = torch.tensor([[3.0, 4.0]])
    y = rms_norm(x, torch.tensor([1.0, 2.0]), eps=0.0)
    rms = (12.5) ** 0.5
    torch.testing.assert_close(y, torch.tensor([[3 / rms, 8 / rms]]))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rms_norm(torch.randn(2, 4), torch.ones(5)), "weight"),
        (lambda: rms_norm(torch.randn(2, 4), torch.ones(4), residual=torch.randn(2, 3)), "residual"),
        (lambda: rms_norm(torch.randn(2, 4), torch.ones(4), residual=torch.randn(2, 4).double()), "residual"),
        (lambda: layer_norm(torch.randn(2, 4), torch.ones(4), torch.ones(3)), "bias"),
        (lambda: rms_norm(torch.randn(2, 4), torch.ones(4), eps=-1.0), "eps"),
        (lambda: rms_norm(torch.ones(2, 4, dtype=torch.long), torch.ones(4)), "floating-point"),
    ],
)
def test_invalid_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
