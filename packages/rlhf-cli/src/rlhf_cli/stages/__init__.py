"""The stages of ``rlhf run``, one module each. A stage builds the engines and data its rlhf-algos
algorithm needs, drives it (progress, metrics, checkpoint selection) and saves ``<out>/<stage>``;
the training itself is the algorithm's (``rlhf_algos.SFT``, ``RM``, ``PPO``, ``DPO``, ...)."""

from .offline import run_offline
from .online import run_online
from .rm import run_rm
from .sft import run_sft

__all__ = ["run_offline", "run_online", "run_rm", "run_sft"]
