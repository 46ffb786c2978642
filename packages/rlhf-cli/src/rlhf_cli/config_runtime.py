"""The sections about how a run is carried out rather than what it trains: ``checkpoint.*`` (resumable
state, :mod:`rlhf_cli.resume`), ``train.*`` (the guards around every optimizer step), ``distributed.*``
(the process group) and ``offload.*`` (which models' parameters live on the CPU under ZeRO-3)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .config_sections import Section, option

__all__ = ["CheckpointSection", "DistributedSection", "OffloadSection", "TrainSection"]


@dataclass(frozen=True)
class CheckpointSection(Section):
    """Resumable training state (docs/pipeline.md, "Checkpoints and resume")."""

    section: ClassVar[str] = "checkpoint"

    every: int = option(200, "save the resumable state every this many training steps of sft, rm and the offline "
                             "algorithms (0: only on SIGTERM/SIGINT).")
    every_iterations: int = option(5, "... and every this many iterations of the online algorithms (0: only on "
                                      "SIGTERM/SIGINT).")
    keep: int = option(1, "how many saved states of a stage to keep (the newest); each holds the weights, the "
                          "optimizer state and the RNG states.")

    def __post_init__(self) -> None:
        self._check_min(0, "every", "every_iterations")
        self._check_min(1, "keep")


@dataclass(frozen=True)
class TrainSection(Section):
    """Every trained model (SFT, reward model, stage 3): the guards around the optimizer step."""

    section: ClassVar[str] = "train"

    max_nonfinite_steps: int = option(3, "optimizer steps in a row with a non-finite (nan/inf) loss or gradient norm "
                                         "that stop the run; each such step is skipped (no weight changes) and "
                                         "counted (docs/pipeline.md, \"Guards\").")

    def __post_init__(self) -> None:
        self._check_min(1, "max_nonfinite_steps")


@dataclass(frozen=True)
class DistributedSection(Section):
    """The process group every rank joins (docs/cli.md, "Multi-process and multi-node runs")."""

    section: ClassVar[str] = "distributed"

    # rlhf_hybrid.distributed.DEFAULT_TIMEOUT_S, spelled out: importing rlhf_hybrid (torch) here would slow
    # every `rlhf` command (a test checks that the two agree)
    timeout_s: float = option(1800.0, "seconds the ranks wait for each other, at the rendezvous and in every "
                                      "collective of the default process group (its torch.distributed timeout; "
                                      "groups DeepSpeed makes itself keep torch's default), before the run "
                                      "stops with an error; raise it when one rank can be busy for long alone (e.g. "
                                      "saving a large checkpoint on a slow disk).")

    def __post_init__(self) -> None:
        if not 0 < self.timeout_s < math.inf:  # nan fails this comparison too
            self._fail("timeout_s", f"must be finite and > 0, got {self.timeout_s!r}")


@dataclass(frozen=True)
class OffloadSection(Section):
    """ZeRO-3 parameter offload (``offload_param`` to the CPU, as DeepSpeed-Chat and OpenRLHF do): the
    model's partitions stay in CPU memory and are fetched to the device for each forward, freeing the
    accelerator between uses. Needs deepspeed.zero_stage=3; a CPU-only run has nothing to free (the
    partitions are in CPU memory anyway)."""

    section: ClassVar[str] = "offload"

    reference: bool = option(False, "the frozen reference policy's parameters on the CPU (DeepSpeed-Chat "
                                    "--offload_reference_model).")
    reward: bool = option(False, "the frozen reward model's parameters on the CPU (stage 3's reward and the "
                                 "preference stage's evaluation scorer).")
    params: bool = option(False, "the trained models' parameters on the CPU too (with deepspeed.offload_optimizer, "
                                 "their optimizer state as well: ZeRO-Infinity's CPU offload).")

    def roles(self) -> list[str]:
        """The ``offload.*`` keys that are on."""
        return [k for k in ("reference", "reward", "params") if getattr(self, k)]
