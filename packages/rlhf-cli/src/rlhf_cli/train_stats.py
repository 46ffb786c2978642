"""Training statistics added to each training row of metrics.jsonl: learning rate, gradient norm,
throughput and the accelerator's peak memory.

Clocks, counters and values the engine already holds are read; nothing draws from an RNG or changes a
float operation of the training, so a seed gives the same training numbers with or without them.
"""

from __future__ import annotations

import time

import torch

__all__ = ["StepTimer", "example_tokens"]

# the token-id lists of a tokenized example (rlhf_data.tokenize_records): SFT samples, preference pairs
_TOKEN_KEYS = ("input_ids", "chosen_ids", "rejected_ids")


def example_tokens(examples: list[dict]) -> int:
    """Tokens in tokenized examples (SFT rows, or a pair's chosen and rejected sequences), padding excluded."""
    return sum(len(e[k]) for e in examples for k in _TOKEN_KEYS if k in e)


class StepTimer:
    """Times one training step (``start`` ... ``stats``) and gives the row's statistics.

    ``samples_per_s`` and ``tokens_per_s`` count every rank: this rank's samples and tokens times the
    world size (ranks get equal shares of samples; tokens are this rank's, scaled). ``lr`` and ``grad_norm``
    come from :meth:`rlhf_hybrid.HybridEngine.step_stats`; ``accel_mem_max_gib`` (the peak of
    ``torch.cuda.max_memory_allocated`` so far, GiB) only where there is a CUDA device.
    """

    def __init__(self, engine, world_size: int = 1) -> None:
        self.engine = engine
        self.world_size = world_size
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stats(self, samples: int, tokens: int) -> dict[str, float]:
        dt = max(time.perf_counter() - self._t0, 1e-9)
        out = {**self.engine.step_stats(), "samples_per_s": samples * self.world_size / dt,
               "tokens_per_s": tokens * self.world_size / dt}
        if torch.cuda.is_available():
            out["accel_mem_max_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out
