"""An exponential moving average of an engine's weights (DeepSpeed-Chat's EMA actor).

After every optimizer step ``ema = beta * ema + (1 - beta) * weight`` (DeepSpeed-Chat's
``moving_average``, ``torch.lerp(weight, ema, beta)``; beta 0.992 there). The average is kept
per rank over the storage the rank owns, so it costs no communication and no more memory than one
fp32 copy of the rank's part of the weights: the whole parameter under ZeRO-0/1/2, the rank's
partition (``param.ds_tensor``) under ZeRO-3. :meth:`ParamEMA.swapped` puts the average in place
of the weights for a block (evaluation, saving: both see an ordinary model) and puts the trained
weights back bitwise afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ParamEMA"]


def _owned(module: nn.Module) -> list[torch.Tensor]:
    """The tensors this rank stores for the trainable parameters (ZeRO-3: the partitions)."""
    return [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in module.parameters() if p.requires_grad]


class ParamEMA:
    """EMA of ``module``'s trainable weights over this rank's storage (see the module docstring).

    Args:
        module: The trained module (an engine's ``module``; partitioned under ZeRO-3).
        beta: The decay, in [0, 1).
    """

    def __init__(self, module: nn.Module, beta: float) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"ema beta: must be in [0, 1), got {beta!r}")
        self.module, self.beta = module, beta
        self.average = [t.detach().float().clone() for t in _owned(module)]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """``ema = beta * ema + (1 - beta) * weight`` for every owned tensor (after an optimizer step)."""
        for avg, t in zip(self.average, _owned(self.module), strict=True):
            avg.lerp_(t.detach().float(), 1.0 - self.beta)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The module holds the average inside the block and its trained weights again after it."""
        owned = _owned(self.module)
        saved = [t.detach().clone() for t in owned]
        with torch.no_grad():
            for t, avg in zip(owned, self.average, strict=True):
                t.copy_(avg.to(t.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(owned, saved, strict=True):
                    t.copy_(s)

    def state_dict(self) -> dict:
        return {"beta": self.beta, "updates": self.updates, "average": [a.cpu() for a in self.average]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["average"]) != len(self.average):
            raise ValueError(f"ema state: {len(state['average'])} tensors, this module has {len(self.average)}")
        self.beta, self.updates = state["beta"], state["updates"]
        self.average = [a.to(b.device).clone() for a, b in zip(state["average"], self.average, strict=True)]
