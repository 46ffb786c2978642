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
"""

from __future__ import annotations

import math

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
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every adapter fused: ``<prefix>.weight = W + (alpha/r) B A``.

    Args:
        model: a model with :class:`LoRALinear` modules (only their ``scale`` is read from it).
        state: the full state dict to fuse (e.g. gathered from ZeRO-3 shards); default
            ``model.state_dict()``.
    """
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
