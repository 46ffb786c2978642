"""fused_logprobs / logprobs_from_hidden against an oracle written here: full fp64 log_softmax + gather,
entropy from its definition -sum p log p, gradients by autograd through that oracle. Every test runs
on both backends (the reference and the Triton kernels; on CPU the latter through TRITON_INTERPRET)."""

from __future__ import annotations

import pytest
import torch
from rlhf_kernels import fused_logprobs, logprobs_from_hidden
from torch.utils._python_dispatch import TorchDispatchMode

IGNORE = -100

# (atol, rtol) per input dtype. Forward outputs are fp32 computed from the same upcast logits, so
# they agree closely for every dtype; gradients are rounded to the input dtype (bf16 keeps 8
# mantissa bits, fp16 11). logprobs_from_hidden also does its matmuls in the input dtype, in chunks
# (a different summation order than one big matmul), hence the separate, looser table.
FWD_TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.bfloat16: (5e-5, 1e-5),
    torch.float16: (5e-5, 1e-5),
}
GRAD_TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-5, 1.6e-2),
    torch.float16: (1e-6, 2e-3),
}
HIDDEN_FWD_TOL = {
    torch.float32: (5e-5, 1e-5),
    torch.bfloat16: (8e-2, 2e-2),
    torch.float16: (1e-2, 2e-3),
}
HIDDEN_GRAD_TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 3e-2),
    torch.float16: (2e-3, 1e-2),
}
DTYPES = list(FWD_TOL)


@pytest.fixture(autouse=True)
def _every_backend(cpu_backend):
    """Every test here runs on the reference and on the Triton kernels (see conftest.py)."""
    yield


def oracle(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, ignore_index=IGNORE):
    """(B, T, V), (B, T) -> logprobs (B, T), entropy (B, T), materialising everything in fp64.

    fp64 makes the oracle's own rounding negligible next to the fp32 kernel's, so the tolerances
    below measure the kernel alone.
    """
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)  # (B, T, V)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(logp.exp() * logp).sum(-1) * valid
    return logprobs, entropy


def make_targets(shape, vocab, gen, n_ignored=2):
    targets = torch.randint(0, vocab, shape, generator=gen)
    flat = targets.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:n_ignored]] = IGNORE
    return targets


def assert_close(actual, expected, tol):
    atol, rtol = tol
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


# (B, T, V, chunk_size, temperature): an OPT-sized vocabulary (once, it is the slow case), batch 1
# and 7, chunk sizes that do not divide the B*T rows, a chunk of one row, one larger than all rows.
LOGIT_CASES = [
    (1, 7, 50272, 3, 0.7),
    *[(7, 3, 1000, 4, t) for t in (1.0, 0.7)],
    *[(2, 5, 257, 1, t) for t in (1.0, 1.5)],
    *[(3, 4, 31, 4096, t) for t in (1.0, 0.7)],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,V,chunk,temperature", LOGIT_CASES)
def test_fused_logprobs_forward_and_backward_match_oracle(dtype, B, T, V, chunk, temperature):
    gen = torch.Generator().manual_seed(B * 1000 + V)
    logits = (3 * torch.randn(B, T, V, generator=gen)).to(dtype)
    targets = make_targets((B, T), V, gen)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)

    x = logits.clone().requires_grad_()
    lp, ent = fused_logprobs(x, targets, temperature=temperature, return_entropy=True, chunk_size=chunk)
    (lp * g_lp + ent * g_ent).sum().backward()

    x_ref = logits.clone().requires_grad_()
    lp_ref, ent_ref = oracle(x_ref, targets, temperature)
    (lp_ref * g_lp + ent_ref * g_ent).sum().backward()

    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (B, T)
    assert x.grad.dtype == dtype
    assert_close(lp, lp_ref, FWD_TOL[dtype])
    assert_close(ent, ent_ref, FWD_TOL[dtype])
    assert_close(x.grad, x_ref.grad, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_logprobs_without_entropy(dtype):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 123, generator=gen).to(dtype)
    targets = make_targets((2, 9), 123, gen)
    x = logits.clone().requires_grad_()
    lp = fused_logprobs(x, targets, chunk_size=5)
    lp.sum().backward()
    x_ref = logits.clone().requires_grad_()
    lp_ref, _ = oracle(x_ref, targets)
    lp_ref.sum().backward()
    assert isinstance(lp, torch.Tensor) and lp.shape == (2, 9)
    assert_close(lp, lp_ref, FWD_TOL[dtype])
    assert_close(x.grad, x_ref.grad, GRAD_TOL[dtype])


def test_entropy_only_loss_backward():
    # The log-prob output is unused: its upstream gradient arrives as zeros.
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 50, generator=gen)
    targets = make_targets((3, 4), 50, gen)
    x = logits.clone().requires_grad_()
    _, ent = fused_logprobs(x, targets, return_entropy=True, chunk_size=5, temperature=1.3)
    ent.sum().backward()
    x_ref = logits.clone().requires_grad_()
    oracle(x_ref, targets, 1.3)[1].sum().backward()
    assert_close(x.grad, x_ref.grad, GRAD_TOL[torch.float32])


def test_ignored_positions_are_zero_and_get_no_gradient():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 40, generator=gen, requires_grad=True)
    targets = torch.randint(0, 40, (2, 6), generator=gen)
    targets[0, :2] = IGNORE  # e.g. prompt tokens
    targets[1, -1] = IGNORE  # e.g. padding
    lp, ent = fused_logprobs(logits, targets, return_entropy=True, chunk_size=5)
    (lp.sum() + ent.sum()).backward()
    ignored = targets == IGNORE
    assert torch.all(lp[ignored] == 0) and torch.all(ent[ignored] == 0)
    assert torch.all(lp[~ignored] < 0) and torch.all(ent[~ignored] > 0)
    assert torch.all(logits.grad[ignored] == 0)
    assert torch.all(logits.grad[~ignored].abs().sum(-1) > 0)


def test_custom_ignore_index_and_none():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 30, generator=gen)
    targets = torch.randint(1, 30, (2, 5), generator=gen)
    targets[1, 3:] = 0  # pad id 0
    lp = fused_logprobs(logits, targets, ignore_index=0, chunk_size=3)
    assert_close(lp, oracle(logits, targets, ignore_index=0)[0], FWD_TOL[torch.float32])
    # ignore_index=None: every position counts, including token 0.
    lp_all = fused_logprobs(logits, targets, ignore_index=None)
    full = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert_close(lp_all, full, FWD_TOL[torch.float32])


def test_shifted_noncontiguous_logits():
    # The usual call: logits[:, :-1] against input_ids[:, 1:] (a non-contiguous view).
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 8, 64, generator=gen, requires_grad=True)
    ids = torch.randint(0, 64, (3, 8), generator=gen)
    lp = fused_logprobs(logits[:, :-1], ids[:, 1:], chunk_size=4)
    lp.sum().backward()
    ref_logits = logits.detach().clone().requires_grad_()
    oracle(ref_logits[:, :-1], ids[:, 1:])[0].sum().backward()
    assert_close(lp, oracle(logits[:, :-1], ids[:, 1:])[0], FWD_TOL[torch.float32])
    assert_close(logits.grad, ref_logits.grad, GRAD_TOL[torch.float32])


def test_masked_vocabulary_with_neg_inf_is_finite():
    # Padded vocabulary entries set to -inf must behave as if they did not exist (no 0 * -inf NaN).
    gen = torch.Generator().manual_seed(6)
    real = torch.randn(2, 3, 20, generator=gen)
    padded = torch.cat([real, torch.full((2, 3, 4), float("-inf"))], dim=-1).requires_grad_()
    targets = torch.randint(0, 20, (2, 3), generator=gen)
    lp, ent = fused_logprobs(padded, targets, return_entropy=True, chunk_size=4)
    (lp.sum() + ent.sum()).backward()
    x_ref = real.clone().requires_grad_()
    lp_ref, ent_ref = oracle(x_ref, targets)
    (lp_ref.sum() + ent_ref.sum()).backward()
    assert_close(lp, lp_ref, FWD_TOL[torch.float32])
    assert_close(ent, ent_ref, FWD_TOL[torch.float32])
    assert_close(padded.grad[..., :20], x_ref.grad, GRAD_TOL[torch.float32])
    assert torch.all(padded.grad[..., 20:] == 0)


def test_no_grad_and_empty_input():
    with torch.no_grad():
        lp = fused_logprobs(torch.randn(0, 5, 11), torch.zeros(0, 5, dtype=torch.long))
    assert lp.shape == (0, 5)


class _RecordOutputs(TorchDispatchMode):
    """Records (shape, dtype) of every tensor produced by an aten op while active."""

    def __init__(self):
        super().__init__()
        self.outputs: list[tuple[torch.Size, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.shape, t.dtype))
        return out


def test_fused_logprobs_never_materialises_full_fp32_rows():
    B, T, V, chunk = 2, 10, 300, 6  # 20 rows, chunks of 6
    logits = torch.randn(B, T, V).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (B, T))
    with _RecordOutputs() as rec:
        lp, ent = fused_logprobs(logits, targets, return_entropy=True, chunk_size=chunk)
        (lp.sum() + ent.sum()).backward()
    fp32_numels = [s.numel() for s, d in rec.outputs if d == torch.float32]
    assert max(fp32_numels) <= chunk * V
    assert logits.grad.dtype == torch.bfloat16


def test_logprobs_from_hidden_never_materialises_full_logits():
    B, T, H, V, chunk = 2, 70, 123, 512, 32  # N*V = 71680 > V*H = 62976 (the weight gradient)
    hidden = torch.randn(B, T, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    targets = torch.randint(0, V, (B, T))
    with _RecordOutputs() as rec:
        lp, ent = logprobs_from_hidden(hidden, weight, targets, return_entropy=True, chunk_size=chunk)
        (lp.sum() + ent.sum()).backward()
    assert max(s.numel() for s, _ in rec.outputs) < B * T * V


# (B, T, H, V, chunk_size, with_bias, temperature)
HIDDEN_CASES = [
    (1, 7, 123, 50272, 3, False, 0.7),
    *[(7, 3, 123, 1000, 4, True, t) for t in (1.0, 0.7)],
    *[(2, 5, 16, 257, 1, True, t) for t in (1.0, 1.5)],
    *[(3, 4, 8, 31, 4096, False, t) for t in (1.0, 0.7)],
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,V,chunk,with_bias,temperature", HIDDEN_CASES)
def test_logprobs_from_hidden_matches_oracle(dtype, B, T, H, V, chunk, with_bias, temperature):
    gen = torch.Generator().manual_seed(B * 1000 + V)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype)
    weight = (torch.randn(V, H, generator=gen) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=gen).to(dtype) if with_bias else None
    targets = make_targets((B, T), V, gen)
    g_lp, g_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)

    def leaves():
        return [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]

    h, w, b = leaves()
    lp, ent = logprobs_from_hidden(
        h, w, targets, bias=b, temperature=temperature, return_entropy=True, chunk_size=chunk
    )
    (lp * g_lp + ent * g_ent).sum().backward()

    h_ref, w_ref, b_ref = leaves()
    logits_ref = h_ref @ w_ref.T + (b_ref if b_ref is not None else 0)  # (B, T, V) in dtype
    lp_ref, ent_ref = oracle(logits_ref, targets, temperature)
    (lp_ref * g_lp + ent_ref * g_ent).sum().backward()

    assert lp.dtype == torch.float32 and lp.shape == (B, T)
    assert_close(lp, lp_ref, HIDDEN_FWD_TOL[dtype])
    assert_close(ent, ent_ref, HIDDEN_FWD_TOL[dtype])
    for ours, ref in [(h, h_ref), (w, w_ref), (b, b_ref)]:
        if ours is None:
            continue
        assert ours.grad.dtype == dtype
        atol, rtol = HIDDEN_GRAD_TOL[dtype]
        # Scale atol by the gradient's magnitude: weight grads are ~1/V smaller than hidden grads.
        assert_close(ours.grad, ref.grad, (atol * ref.grad.float().abs().max().item(), rtol))


def test_logprobs_from_hidden_grad_only_for_hidden():
    # A frozen lm_head (e.g. the reference model): only hidden requires grad.
    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 5, 12, generator=gen, requires_grad=True)
    weight = torch.randn(40, 12, generator=gen)
    targets = make_targets((2, 5), 40, gen)
    logprobs_from_hidden(hidden, weight, targets, chunk_size=3).sum().backward()
    h_ref = hidden.detach().clone().requires_grad_()
    oracle(h_ref @ weight.T, targets)[0].sum().backward()
    assert weight.grad is None
    assert_close(hidden.grad, h_ref.grad, HIDDEN_GRAD_TOL[torch.float32])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": 2.5}, "chunk_size"),
    ],
)
def test_invalid_options_raise(kwargs, match):
    logits, targets = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        fused_logprobs(logits, targets, **kwargs)
    with pytest.raises(ValueError, match=match):
        logprobs_from_hidden(logits, torch.randn(7, 5), targets, **kwargs)


def test_invalid_inputs_raise():
    logits = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"targets shape \(2, 4\)"):
        fused_logprobs(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        fused_logprobs(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="floating-point"):
        fused_logprobs(torch.zeros(2, 3, 5, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 5\)"):
        logprobs_from_hidden(logits, torch.randn(7, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="dtype"):
        logprobs_from_hidden(logits, torch.randn(7, 5).double(), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="bias"):
        logprobs_from_hidden(
            logits, torch.randn(7, 5), torch.zeros(2, 3, dtype=torch.long), bias=torch.randn(6)
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (any model)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_on_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 7, 50272, generator=gen).to(dtype)
    targets = make_targets((2, 7), 50272, gen)
    lp_cpu, ent_cpu = fused_logprobs(logits, targets, return_entropy=True, chunk_size=3)
    lp_gpu, ent_gpu = fused_logprobs(logits.cuda(), targets.cuda(), return_entropy=True, chunk_size=3)
    assert_close(lp_gpu.cpu(), lp_cpu, FWD_TOL[dtype])
    assert_close(ent_gpu.cpu(), ent_cpu, FWD_TOL[dtype])
