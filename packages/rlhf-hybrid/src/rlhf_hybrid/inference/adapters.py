"""Family adapters: a Hugging Face causal LM's weights -> :class:`InferenceLayout`.

Each adapter is two small functions: ``check(config) -> reason | None`` and
``build(config, weights) -> InferenceLayout``, registered by the model's class name.
:func:`supported` tells a caller whether the fast path can run (None) or why not (a sentence to
log before falling back to HF ``generate``); :func:`build_layout` raises ``NotImplementedError``
with that same sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .layout import InferenceLayout, LayerWeights

Tensor = torch.Tensor


@dataclass(frozen=True)
class _Adapter:
    family: str
    check: Callable[[object], str | None]
    build: Callable[[object, _Weights], InferenceLayout]
    # config -> the parameter names the layout fuses, one tuple per fused matrix, in fused order
    fused: Callable[[object], list[tuple[str, ...]]]


class _Weights:
    """A state dict moved to the target dtype/device on access, with clear errors for missing keys."""

    def __init__(self, state: Mapping[str, Tensor], dtype: torch.dtype | None, device: torch.device | None):
        self._state, self._dtype, self._device = state, dtype, device

    def __contains__(self, key: str) -> bool:
        return key in self._state

    def get(self, key: str) -> Tensor | None:
        t = self._state.get(key)
        # .to() returns the tensor itself when nothing changes: no copy for matching weights.
        return None if t is None else t.detach().to(device=self._device, dtype=self._dtype)

    def __getitem__(self, key: str) -> Tensor:
        t = self.get(key)
        if t is None:
            raise KeyError(f"inference layout: weight {key!r} is missing from the state dict")
        return t


def _adjacent(parts: list[Tensor]) -> bool:
    """Whether ``parts`` lie one after another in one storage, so that their concatenation along
    dim 0 is a view of it (training weights packed by :func:`~.storage.pack_fused_params` or
    flattened by DeepSpeed ZeRO-1/2 in fused order; weights gathered by :mod:`rlhf_hybrid.gather`)."""
    first = parts[0]
    if not all(p.is_contiguous() and p.dtype == first.dtype and p.device == first.device
               and p.shape[1:] == first.shape[1:] for p in parts):
        return False
    ptr = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for p in parts:
        if p.untyped_storage().data_ptr() != ptr or p.storage_offset() != offset:
            return False
        offset += p.numel()
    return True


def _cat(*parts: Tensor | None) -> Tensor | None:
    """Fuses projection parts along dim 0; None if all are None.

    A view of the parts' storage when they are adjacent in it (no copy: the layout then reads the
    training weights themselves), else a copy made once per layout.
    """
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if len(present) != len(parts):
        # A bias on q but not on k, say: no supported family does this.
        raise ValueError("fused projection: some of the fused parts have a bias and some do not")
    if _adjacent(present):
        first = present[0]
        rows = sum(p.shape[0] for p in present)
        return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())
    return torch.cat(present, dim=0)


def _act_reason(name: object) -> str | None:
    from transformers.activations import ACT2FN

    return None if isinstance(name, str) and name in ACT2FN else f"activation {name!r} is not supported"


def _act(name: str) -> Callable[[Tensor], Tensor]:
    from transformers.activations import ACT2FN

    # transformers' own activation modules, so the MLP math is exactly HF's (gelu_new is a
    # hand-written tanh formula there, not torch's gelu(approximate="tanh")).
    return ACT2FN[name]


# -- Llama-style: Llama, Mistral, Qwen2 ----------------------------------------------------------


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x names
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


def _llama_check(config) -> str | None:
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        return f"rope type {rope_type!r} is not implemented (only the default rope is)"
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        return f"partial rotary (partial_rotary_factor={partial}) is not implemented"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))} are not implemented (only 'full_attention')"
    return _act_reason(getattr(config, "hidden_act", None))


def _qkv(prefix: str, kind: str) -> tuple[str, str, str]:
    """Names of the q, k and v projections' ``kind`` ("weight" / "bias") under ``prefix``: fused order."""
    return prefix + "q_proj." + kind, prefix + "k_proj." + kind, prefix + "v_proj." + kind


def _gate_up(prefix: str, kind: str) -> tuple[str, str]:
    return prefix + "gate_proj." + kind, prefix + "up_proj." + kind


def _llama_fused(config) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for i in range(config.num_hidden_layers):
        a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out += [_qkv(a, "weight"), _qkv(a, "bias"), _gate_up(m, "weight"), _gate_up(m, "bias")]
    return out


def _llama_build(config, w: _Weights) -> InferenceLayout:
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(LayerWeights(
            norm1_weight=w[p + "input_layernorm.weight"], norm1_bias=None,
            qkv_weight=_cat(*map(w.__getitem__, _qkv(a, "weight"))),
            # Qwen2 (and Llama with attention_bias=True) have q/k/v biases.
            qkv_bias=_cat(*map(w.get, _qkv(a, "bias"))),
            o_weight=w[a + "o_proj.weight"], o_bias=w.get(a + "o_proj.bias"),
            norm2_weight=w[p + "post_attention_layernorm.weight"], norm2_bias=None,
            up_weight=_cat(*map(w.__getitem__, _gate_up(m, "weight"))),  # (2I, H) = [gate; up]
            up_bias=_cat(*map(w.get, _gate_up(m, "bias"))),
            down_weight=w[m + "down_proj.weight"], down_bias=w.get(m + "down_proj.bias"),
            attn_scale=head_dim**-0.5,
        ))
    embed = w["model.embed_tokens.weight"]
    return InferenceLayout(
        family="llama", layers=tuple(layers), embed_tokens=embed, embed_positions=None, position_offset=0,
        project_in=None, project_out=None,
        final_norm_weight=w["model.norm.weight"], final_norm_bias=None,
        lm_head=w.get("lm_head.weight") if "lm_head.weight" in w else embed,  # tied when absent
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        norm="rms", norm_eps=config.rms_norm_eps, norm_before=True,
        act=_act(config.hidden_act), gated_mlp=True,
        rope_theta=float(_rope_parameters(config)["rope_theta"]), max_positions=None,
        sliding_window=getattr(config, "sliding_window", None),
    )


# -- OPT -----------------------------------------------------------------------------------------


def _opt_check(config) -> str | None:
    return _act_reason(getattr(config, "activation_function", None))


def _opt_fused(config) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for i in range(config.num_hidden_layers):
        a = f"model.decoder.layers.{i}.self_attn."
        out += [_qkv(a, "weight"), _qkv(a, "bias")]
    return out


def _opt_build(config, w: _Weights) -> InferenceLayout:
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads

    def norm(prefix: str) -> tuple[Tensor, Tensor | None]:
        # layer_norm_elementwise_affine=False: no parameters, i.e. weight 1 and bias 0.
        if prefix + ".weight" in w:
            return w[prefix + ".weight"], w.get(prefix + ".bias")
        ones = torch.ones(hidden, dtype=w["model.decoder.embed_tokens.weight"].dtype,
                          device=w["model.decoder.embed_tokens.weight"].device)
        return ones, None

    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.decoder.layers.{i}."
        a = p + "self_attn."
        n1w, n1b = norm(p + "self_attn_layer_norm")
        n2w, n2b = norm(p + "final_layer_norm")
        layers.append(LayerWeights(
            norm1_weight=n1w, norm1_bias=n1b,
            qkv_weight=_cat(*map(w.__getitem__, _qkv(a, "weight"))),
            qkv_bias=_cat(*map(w.get, _qkv(a, "bias"))),
            o_weight=w[a + "out_proj.weight"], o_bias=w.get(a + "out_proj.bias"),
            norm2_weight=n2w, norm2_bias=n2b,
            up_weight=w[p + "fc1.weight"], up_bias=w.get(p + "fc1.bias"),
            down_weight=w[p + "fc2.weight"], down_bias=w.get(p + "fc2.bias"),
            attn_scale=head_dim**-0.5,
        ))
    has_final = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
    fw, fb = norm("model.decoder.final_layer_norm") if has_final else (None, None)
    embed = w["model.decoder.embed_tokens.weight"]
    positions = w["model.decoder.embed_positions.weight"]
    return InferenceLayout(
        family="opt", layers=tuple(layers), embed_tokens=embed,
        embed_positions=positions, position_offset=2,  # OPTLearnedPositionalEmbedding.offset
        project_in=w.get("model.decoder.project_in.weight"), project_out=w.get("model.decoder.project_out.weight"),
        final_norm_weight=fw, final_norm_bias=fb,
        lm_head=w.get("lm_head.weight") if "lm_head.weight" in w else embed,
        num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        norm="layer", norm_eps=1e-5,  # nn.LayerNorm's default; OPT sets no eps
        norm_before=config.do_layer_norm_before,
        act=_act(config.activation_function), gated_mlp=False,
        rope_theta=None, max_positions=positions.shape[0] - 2, sliding_window=None,
    )


# -- GPT-2 ---------------------------------------------------------------------------------------


def _gpt2_check(config) -> str | None:
    if getattr(config, "add_cross_attention", False):
        return "GPT-2 with cross-attention (add_cross_attention=True) is not supported"
    return _act_reason(getattr(config, "activation_function", None))


def _gpt2_build(config, w: _Weights) -> InferenceLayout:
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        scale = head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(i + 1)
        # Conv1D stores (in, out) and computes x @ W + b: transpose to (out, in). c_attn's columns
        # are already [q | k | v], so its transpose is the fused QKV weight as it is (a view, no copy).
        layers.append(LayerWeights(
            norm1_weight=w[p + "ln_1.weight"], norm1_bias=w.get(p + "ln_1.bias"),
            qkv_weight=w[p + "attn.c_attn.weight"].t(), qkv_bias=w.get(p + "attn.c_attn.bias"),
            o_weight=w[p + "attn.c_proj.weight"].t(), o_bias=w.get(p + "attn.c_proj.bias"),
            norm2_weight=w[p + "ln_2.weight"], norm2_bias=w.get(p + "ln_2.bias"),
            up_weight=w[p + "mlp.c_fc.weight"].t(), up_bias=w.get(p + "mlp.c_fc.bias"),
            down_weight=w[p + "mlp.c_proj.weight"].t(), down_bias=w.get(p + "mlp.c_proj.bias"),
            attn_scale=scale,
        ))
    embed = w["transformer.wte.weight"]
    positions = w["transformer.wpe.weight"]
    return InferenceLayout(
        family="gpt2", layers=tuple(layers), embed_tokens=embed, embed_positions=positions, position_offset=0,
        project_in=None, project_out=None,
        final_norm_weight=w["transformer.ln_f.weight"], final_norm_bias=w.get("transformer.ln_f.bias"),
        lm_head=w.get("lm_head.weight") if "lm_head.weight" in w else embed,
        num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
        norm="layer", norm_eps=config.layer_norm_epsilon, norm_before=True,
        act=_act(config.activation_function), gated_mlp=False,
        rope_theta=None, max_positions=positions.shape[0], sliding_window=None,
    )


def _gpt2_fused(config) -> list[tuple[str, ...]]:
    return []  # c_attn already holds q, k and v in one matrix


_LLAMA = _Adapter("llama", _llama_check, _llama_build, _llama_fused)
_ADAPTERS: dict[str, _Adapter] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,
    "OPTForCausalLM": _Adapter("opt", _opt_check, _opt_build, _opt_fused),
    "GPT2LMHeadModel": _Adapter("gpt2", _gpt2_check, _gpt2_build, _gpt2_fused),
}
SUPPORTED_CLASSES: tuple[str, ...] = tuple(sorted(_ADAPTERS))


def supported(model: nn.Module, *, max_length: int | None = None) -> str | None:
    """Whether :func:`build_layout` / :func:`generate` can run ``model``.

    Never raises for an unsupported model: callers log the reason and fall back to HF ``generate``.

    Args:
        model: A Hugging Face causal LM (weights may be ZeRO-3 shards; only its class and config
            are read here).
        max_length: Prompt length + new tokens, if known: checked against the model's limits
            (Mistral's sliding window, learned position tables).

    Returns:
        None when supported, else a one-line reason.
    """
    name = type(model).__name__
    adapter = _ADAPTERS.get(name)
    if adapter is None:
        return (f"no inference adapter for {name} (model_type "
                f"{getattr(getattr(model, 'config', None), 'model_type', None)!r}); "
                f"supported: {', '.join(SUPPORTED_CLASSES)}")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        return f"{name} has quantized weights; the inference layout needs plain float weights"
    config = model.config
    reason = adapter.check(config)
    if reason is not None:
        return f"{name}: {reason}"
    if max_length is not None:
        window = getattr(config, "sliding_window", None) if adapter.family == "llama" else None
        if window is not None and max_length > window:
            return f"{name}: length {max_length} exceeds the sliding window {window} (windowed decode is not implemented)"
        limit = getattr(config, "max_position_embeddings", None) if adapter.family != "llama" else None
        if limit is not None and max_length > limit:
            return f"{name}: length {max_length} exceeds max_position_embeddings {limit}"
    return None


def build_layout(
    model: nn.Module,
    state_dict: Mapping[str, Tensor] | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> InferenceLayout:
    """Arranges a Hugging Face causal LM's weights for :func:`generate`.

    Args:
        model: The HF model (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
            ``OPTForCausalLM`` or ``GPT2LMHeadModel``): its class and config choose the adapter.
        state_dict: Full (unsharded) weights under the model's own parameter names; default
            ``model.state_dict()``. Under ZeRO-3 pass the gathered weights.
        dtype: Convert the weights to this dtype (default: keep theirs).
        device: Move the weights there (default: keep theirs).

    Returns:
        The layout. Tensors that need no conversion are shared with ``state_dict``, not copied;
        the fused QKV (Llama-style and OPT) and gate/up matrices are new.

    Raises:
        NotImplementedError: If :func:`supported` gives a reason (the message is that reason).
        KeyError: If a weight the adapter needs is missing from ``state_dict``.
    """
    reason = supported(model)
    if reason is not None:
        raise NotImplementedError(reason)
    state = model.state_dict() if state_dict is None else state_dict
    weights = _Weights(state, dtype, torch.device(device) if device is not None else None)
    with torch.no_grad():
        return _ADAPTERS[type(model).__name__].build(model.config, weights)


def fused_groups(model: nn.Module) -> list[tuple[str, ...]]:
    """The parameter names :func:`build_layout` fuses into one matrix, one tuple per matrix, in fused
    order, restricted to parameters ``model`` has (no biases in a bias-free model). Empty for an
    unsupported model."""
    adapter = _ADAPTERS.get(type(model).__name__)
    if adapter is None:
        return []
    names = {n for n, _ in model.named_parameters()}
    return [g for g in adapter.fused(model.config) if all(n in names for n in g)]
