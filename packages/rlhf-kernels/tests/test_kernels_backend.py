"""Backend selection: auto / reference / triton, the env var, overrides, and honest errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import rlhf_kernels
import torch
from rlhf_kernels import _backend, fused_logprobs, get_backend, set_backend, use_backend

ENV = "RLHF_KERNELS_BACKEND"
OP = "fused_logprobs"


@pytest.fixture(autouse=True)
def _clean_state(monkeypatch):
    """Every test starts and ends with no override, no env var and no cached choice.

    TRITON_INTERPRET (which conftest.py sets on machines without a GPU) is removed too, so the
    rules are tested as on a user's machine; tests about the interpreter set it themselves.
    """
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    set_backend(None)
    yield
    set_backend(None)


@pytest.fixture
def reference_only_op(monkeypatch):
    """An op registered with a reference implementation and no Triton one."""
    monkeypatch.setitem(_backend._REGISTRY, "only_reference", {"reference": lambda x: x + 1})
    set_backend(None)
    return "only_reference"


@pytest.fixture
def fake_triton(monkeypatch):
    """Pretends a Triton implementation of OP is registered and triton is importable."""
    calls = []

    def fake_impl(logits, targets, **kwargs):
        calls.append(logits.device)
        return torch.zeros(targets.shape)

    monkeypatch.setitem(_backend._REGISTRY, OP, {**_backend._REGISTRY[OP], "triton": fake_impl})
    monkeypatch.setattr(_backend, "_triton_importable", lambda: True)
    set_backend(None)  # forget choices made before the registry changed
    return calls


def small_inputs():
    return torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))


def test_default_is_auto_and_picks_reference_on_cpu():
    assert get_backend(OP) == "reference"
    logits, targets = small_inputs()
    fused_logprobs(logits, targets)  # runs


@pytest.mark.parametrize("value", ["reference", "auto", "AUTO", " reference ", ""])
def test_env_var_accepted_values(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    assert get_backend(OP, "cpu") == "reference"


def test_bad_env_value_names_variable_value_and_choices(monkeypatch):
    monkeypatch.setenv(ENV, "cuda-please")
    with pytest.raises(ValueError) as info:
        fused_logprobs(*small_inputs())
    message = str(info.value)
    for word in (ENV, "cuda-please", "auto", "reference", "triton"):
        assert word in message


def test_env_triton_without_implementation_raises(monkeypatch, reference_only_op):
    monkeypatch.setenv(ENV, "triton")
    with pytest.raises(
        RuntimeError,
        match=rf"{reference_only_op}: backend 'triton' was requested \({ENV}=triton\).*no Triton implementation",
    ):
        _backend.dispatch(reference_only_op, torch.device("cuda"))


def test_set_backend_triton_without_implementation_raises(reference_only_op):
    with use_backend("triton"), pytest.raises(RuntimeError, match=rf"{reference_only_op}.*'triton'.*set_backend"):
        get_backend(reference_only_op, "cuda")


def test_explicit_triton_on_cpu_without_interpreter_raises(monkeypatch):
    # The real registration (lazy "module:function"), not a fake: on CPU without the interpreter
    # the request cannot be honoured, and the message says how it could be. Without triton
    # installed (`pip install rlhf-kernels` alone) the reason is that, with the install command.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if _backend._triton_importable():
        reason = rf"{OP}.*'cpu'.*TRITON_INTERPRET=1"
    else:
        reason = rf"{OP}.*triton is not installed \(pip install triton\)"
    with use_backend("triton"), pytest.raises(RuntimeError, match=reason):
        fused_logprobs(*small_inputs())


def test_interpreter_allows_explicit_triton_on_cpu_but_auto_stays_reference(monkeypatch, fake_triton):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_backend(OP, "cpu") == "reference"  # auto never picks the (slow) interpreter
    with use_backend("triton"):
        assert get_backend(OP, "cpu") == "triton"
        fused_logprobs(*small_inputs())
    assert fake_triton == [torch.device("cpu")]


def test_every_op_has_both_backends_registered():
    ops = {
        "fused_logprobs", "logprobs_from_hidden", "rms_norm", "layer_norm", "apply_rotary_",
        "decode_attention", "sample", "quantize_blockwise", "dequantize_blockwise",
    }  # fmt: skip
    assert ops <= set(_backend._REGISTRY)
    for op in ops:
        assert set(_backend._REGISTRY[op]) == {"reference", "triton"}, op
        triton_impl = _backend._REGISTRY[op]["triton"]
        # Lazily registered (a string) until first used; once imported, a function of _triton.
        name = triton_impl if isinstance(triton_impl, str) else f"{triton_impl.__module__}:"
        assert name.startswith("rlhf_kernels._triton."), (op, name)


def test_explicit_triton_on_cpu_raises_even_when_implemented(fake_triton):
    with use_backend("triton"), pytest.raises(RuntimeError, match=rf"{OP}.*'triton'.*'cpu'.*CUDA device"):
        fused_logprobs(*small_inputs())
    assert fake_triton == []


def test_explicit_triton_without_triton_installed_raises(fake_triton, monkeypatch):
    monkeypatch.setattr(_backend, "_triton_importable", lambda: False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="triton is not installed"):
        get_backend(OP, "cuda")


def test_auto_picks_triton_only_for_cuda_inputs(fake_triton, monkeypatch):
    # Resolution looks only at the device type, so no GPU is needed to test the rule.
    assert get_backend(OP, "cpu") == "reference"
    assert get_backend(OP, torch.device("cuda", 0)) == "triton"
    with use_backend("triton"):
        assert get_backend(OP, "cuda") == "triton"
    with use_backend("reference"):
        assert get_backend(OP, "cuda") == "reference"
    monkeypatch.setattr(_backend, "_triton_importable", lambda: False)
    set_backend(None)
    assert get_backend(OP, "cuda") == "reference"


def test_choice_is_made_once_until_reset(monkeypatch):
    assert get_backend(OP) == "reference"
    monkeypatch.setenv(ENV, "triton")
    assert get_backend(OP) == "reference"  # cached at first call; the env is not re-read per call
    set_backend(None)  # drops the cache
    with pytest.raises(RuntimeError):
        get_backend(OP)  # triton requested, CPU input, no interpreter


def test_use_backend_restores_previous_request():
    set_backend("reference")
    with use_backend("triton"):
        assert _backend._override == "triton"
    assert _backend._override == "reference"
    with pytest.raises(RuntimeError), use_backend("triton"):
        get_backend(OP)
    assert _backend._override == "reference"


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="auto, reference, triton.*'cuda'"):
        set_backend("cuda")
    with pytest.raises(ValueError, match="auto, reference, triton"), use_backend("fast"):
        pass


def test_unknown_op_raises():
    with pytest.raises(ValueError, match="unknown op 'nope'.*fused_logprobs"):
        get_backend("nope")


def test_public_api():
    assert set(rlhf_kernels.__all__) == {
        "__version__",
        "fused_logprobs",
        "logprobs_from_hidden",
        "rms_norm",
        "layer_norm",
        "apply_rotary_",
        "rotary_cos_sin",
        "decode_attention",
        "sample",
        "hash_uniform",
        "quantize_blockwise",
        "dequantize_blockwise",
        "QuantizedTensor",
        "quantized_all_gather",
        "quantized_reduce_scatter",
        "two_level_groups",
        "CommStats",
        "set_backend",
        "use_backend",
        "get_backend",
    }
    for name in rlhf_kernels.__all__:
        assert getattr(rlhf_kernels, name) is not None
    assert rlhf_kernels.__version__ == "0.1.0"


def test_import_has_no_side_effects_and_does_not_import_triton(tmp_path):
    # A fake `triton` that fails loudly if anything imports it; it is still "importable" for
    # find_spec, so the auto rule sees triton installed and still picks reference on CPU.
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise RuntimeError('triton imported eagerly')\n")
    script = textwrap.dedent(
        """
        import os, sys
        before = dict(os.environ)
        import rlhf_kernels, torch
        assert "triton" not in sys.modules
        assert dict(os.environ) == before
        assert rlhf_kernels.get_backend("fused_logprobs", "cpu") == "reference"
        rlhf_kernels.fused_logprobs(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long))
        assert "triton" not in sys.modules
        """
    )
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), *sys.path])
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_triton_backend_runs_the_kernels_through_the_interpreter_on_cpu(needs_triton, monkeypatch):
    """The CPU Triton tests really execute the @triton.jit kernels (interpreted), not a fallback."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton kernels run compiled on it, not interpreted")
    # Before triton is first imported: its own library functions (tl.sum's combine, ...) are
    # decorated at import, interpreted or not.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import rlhf_kernels._triton.logprobs as tri_logprobs
    import rlhf_kernels._triton.norms as tri_norms
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    for kernel in (tri_norms._norm_fwd_kernel, tri_logprobs._logprobs_fwd_kernel):
        assert isinstance(kernel, InterpretedFunction)

        def counting_run(*args, _kernel=kernel, _run=kernel.run, **kwargs):
            launches.append(_kernel.fn.__name__)
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", counting_run)
    x = torch.randn(3, 8)
    with use_backend("triton"):
        assert get_backend("rms_norm", "cpu") == "triton"
        y = rlhf_kernels.rms_norm(x, torch.ones(8))
        lp = fused_logprobs(*small_inputs())
    assert "_norm_fwd_kernel" in launches and "_logprobs_fwd_kernel" in launches
    torch.testing.assert_close(y, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert lp.shape == (2, 3)
