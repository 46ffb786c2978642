"""LoRA (Hu et al. 2021): low-rank adapters on a model's linear layers, and their fusion for generation.

``apply_lora(model, rank=8)`` replaces the targeted ``nn.Linear`` modules by :class:`LoRALinear`
(``y = x W^T + b + (alpha / r) * x A^T B^T``, ``W`` frozen, ``A`` and ``B`` trained, ``B`` starting
at 0 so the model is unchanged at first). Only the adapters train, so optimizer state is a few
percent of the model's.

For generation the adapters are *fused*: :func:`merged_state_dict` gives the state dict of the
plain model, every adapted weight replaced by ``W + (alpha / r) B A``, under the plain model's
key names — what the fast generation path builds its layout from and what a saved checkpoint
holds (loadable without this module). The fused weights are new tensors: fusing into ``W`` in
place and subtracting afterwards would drift in bf16 with every rollout, and ``W`` must stay
exactly the frozen base.

peft models (``peft.PeftModel`` with LoRA adapters, TRL's usual policy) are handled the same way:
:func:`plain_model` is the Hugging Face model under the wrapper (its class and config choose the
inference adapter), and :func:`merged_state_dict` fuses each layer's active adapter through peft's
own ``get_delta_weight`` (``fan_in_fan_out`` included, so GPT-2's Conv1D layers work) into new
tensors under the plain model's key names. What cannot be fused into a plain weight (DoRA and the
other LoRA variants, LoRA biases, several active adapters, ``modules_to_save``, adapters already
merged in place, non-LoRA peft types) raises ``NotImplementedError`` naming it.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj", "up_proj", "down_proj",
                   "fc1", "fc2")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (``base``) plus a trainable low-rank update ``(alpha / r) B A``.

    Args:
        base: the linear layer to adapt; its parameters are frozen.
        rank: r, the adapter rank (>= 1).
        alpha: scale numerator; the update is multiplied by ``alpha / rank``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"lora rank: must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., out); the low-rank path costs 2 * r * (in + out) per token
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)

    def delta(self) -> torch.Tensor:
        """``(alpha / r) B A``: (out, in), in float32 then cast to the weight's dtype."""
        return (self.scale * (self.lora_B.float() @ self.lora_A.float())).to(self.base.weight.dtype)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0,
               targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by a :class:`LoRALinear`
    and freeze every other parameter. Returns the adapted modules' names.

    Raises:
        ValueError: nothing matched ``targets`` (the message lists the model's linear layer names).
    """
    names = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                names.append(f"{name}.{child_name}" if name else child_name)
    if not names:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora targets {list(targets)} match no linear layer; the model's are: {', '.join(linear)}")
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A" in n or ".lora_B" in n)
    return names


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` has adapters to fuse (:class:`LoRALinear` modules, or is a peft model): then
    its state dict is not the plain model's and :func:`merged_state_dict` makes it so."""
    return _peft_root(model) is not None or any(isinstance(m, LoRALinear) for m in model.modules())


def _peft_root(model: nn.Module) -> nn.Module | None:
    """The peft tuner (``LoraModel``, ...) of a peft model, else None. peft is never imported here:
    a model built with it has imported it already."""
    peft = sys.modules.get("peft")
    if peft is None:
        return None
    if isinstance(model, peft.PeftModel):
        return model.base_model
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, BaseTuner):
        return model
    if type(model).__module__.startswith("peft."):  # PeftMixedModel, ...
        raise NotImplementedError(f"peft {type(model).__name__} is not supported; rlhf_hybrid takes a peft.PeftModel "
                                  f"with LoRA adapters")
    return None


def plain_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a peft wrapper (``PeftModel.base_model.model``), else ``model``.

    Its class and config are the base model's (what the fast generation path and checkpoint saving
    look at); with peft its LoRA layers are still peft's, so use it with :func:`merged_state_dict`'s
    weights, never its own state dict.

    Raises:
        NotImplementedError: a peft model with something :func:`merged_state_dict` cannot fuse.
    """
    tuner = _peft_root(model)
    if tuner is None:
        return model
    _check_peft(model, tuner)
    return tuner.model


def _check_peft(model: nn.Module, tuner: nn.Module) -> None:
    from peft import PeftType
    from peft.tuners import lora
    from peft.utils.other import AuxiliaryTrainingWrapper

    why = "rlhf_hybrid fuses plain LoRA adapters (peft LoraConfig on Linear / Conv1D layers) into the weights"
    configs = model.peft_config  # PeftModel's own for prompt learning, else its tuner's
    for name, conf in configs.items():
        if conf.peft_type != PeftType.LORA:
            raise NotImplementedError(f"peft type {conf.peft_type.value} (adapter {name!r}) is not supported; {why}")
    active = set()
    for mod_name, m in model.named_modules():
        if isinstance(m, AuxiliaryTrainingWrapper):
            raise NotImplementedError(f"peft {type(m).__name__} at {mod_name!r} (modules_to_save / "
                                      f"trainable_token_indices) is not supported; {why}")
        if not isinstance(m, lora.LoraLayer):
            continue
        if type(m) is not lora.Linear:
            raise NotImplementedError(f"peft LoRA layer {type(m).__name__} at {mod_name!r} is not supported; {why}")
        if m.merged:
            raise NotImplementedError(f"peft adapters {m.merged_adapters} are merged into {mod_name!r} in place "
                                      f"(merge_adapter); call unmerge_adapter() first: {why}, as new tensors")
        for adapter in m.active_adapters:
            if adapter not in m.lora_A:
                continue  # this adapter does not target this layer
            active.add(adapter)
            if m.use_dora.get(adapter) or m.lora_variant.get(adapter) is not None:
                variant = "DoRA (use_dora=True)" if m.use_dora.get(adapter) else type(m.lora_variant[adapter]).__name__
                raise NotImplementedError(f"peft LoRA variant {variant} (adapter {adapter!r} at {mod_name!r}) is not "
                                          f"supported; {why}")
            if m.lora_bias.get(adapter):
                raise NotImplementedError(f"peft lora_bias=True (adapter {adapter!r}) is not supported; {why}")
    if len(active) > 1:
        raise NotImplementedError(f"several active peft adapters {sorted(active)} are not supported; {why}, one "
                                  f"active adapter at a time (peft_model.set_adapter(name))")
    for name in active:
        if getattr(configs.get(name), "layer_replication", None):
            raise NotImplementedError(f"peft layer_replication (adapter {name!r}) is not supported; {why}")


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter fused: ``<prefix>.weight = W + (alpha/r) B A``.

    Args:
        model: a model with :class:`LoRALinear` modules (only their ``scale`` is read from it), or a
            peft LoRA model: then each layer's delta comes from peft's ``get_delta_weight``, which
            reads the adapter weights from the modules themselves (under ZeRO-3 call this inside a
            gather of the parameters).
        state: the full state dict to fuse (e.g. gathered from ZeRO-3 shards); default
            ``model.state_dict()``.

    Raises:
        NotImplementedError: a peft model with something that cannot be fused (see :func:`plain_model`).
    """
    if _peft_root(model) is not None:
        return _peft_merged_state_dict(model, state)
    state = dict(model.state_dict() if state is None else state)
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        p = f"{name}." if name else ""
        a, b = state.pop(f"{p}lora_A"), state.pop(f"{p}lora_B")
        w = state.pop(f"{p}base.weight")
        state[f"{p}weight"] = (w.float() + module.scale * (b.float() @ a.float())).to(w.dtype)
        if f"{p}base.bias" in state:
            state[f"{p}bias"] = state.pop(f"{p}base.bias")
    return state


def _peft_merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    from peft.tuners import lora

    plain = plain_model(model)  # checks that every adapter can be fused
    # e.g. "base_model.model." for a PeftModel
    prefix = next(f"{n}." if n else "" for n, m in model.named_modules() if m is plain)
    state = model.state_dict() if state is None else state
    layers = {n.removeprefix(prefix): m for n, m in model.named_modules() if isinstance(m, lora.LoraLayer)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            raise KeyError(f"peft model: state dict key {key!r} is not under the base model ({prefix!r})")
        key = key.removeprefix(prefix)
        owner = _lora_owner(key, layers)
        if owner is None:
            out[key] = value
        elif key.startswith(f"{owner}.base_layer."):  # the wrapped layer's own weight and bias
            out[f"{owner}.{key.removeprefix(f'{owner}.base_layer.')}"] = value
        # else: an adapter's weight (lora_A / lora_B / ...), not part of the plain model
    for name, layer in layers.items():
        if layer.disable_adapters:
            continue  # peft_model.disable_adapter(): the layer computes its base alone
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                w = out[f"{name}.weight"]
                # (out, in), or (in, out) for Conv1D (fan_in_fan_out): the weight's own layout
                delta = layer.get_delta_weight(adapter)
                out[f"{name}.weight"] = (w.float() + delta.to(w.device, torch.float32)).to(w.dtype)
    return out


def _lora_owner(key: str, layers: dict[str, nn.Module]) -> str | None:
    """The name of the LoRA layer that holds state dict entry ``key``, or None."""
    parts = key.split(".")
    return next((n for n in (".".join(parts[:i]) for i in range(1, len(parts))) if n in layers), None)


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear`` holding the fused weight (in place;
    for export or inference once training is over)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.base.bias is not None,
                                device=child.base.weight.device, dtype=child.base.weight.dtype)
                with torch.no_grad():
                    lin.weight.copy_(child.base.weight + child.delta())
                    if child.base.bias is not None:
                        lin.bias.copy_(child.base.bias)
                setattr(module, child_name, lin)
    return model
