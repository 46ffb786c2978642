"""rlhf-kernels: fused log-prob/entropy and blockwise quantization, with pure-PyTorch references.

Every op has a pure-PyTorch reference implementation (the CPU path and the test oracle); faster
GPU implementations plug in per op, chosen at first call (see :func:`set_backend` and the
``RLHF_KERNELS_BACKEND`` environment variable). Importing this package never imports triton.
"""

from ._backend import get_backend, set_backend, use_backend
from ._version import __version__
from .logprobs import fused_logprobs, logprobs_from_hidden
from .quant import QuantizedTensor, dequantize_blockwise, quantize_blockwise

__all__ = [
    "QuantizedTensor",
    "__version__",
    "dequantize_blockwise",
    "fused_logprobs",
    "get_backend",
    "logprobs_from_hidden",
    "quantize_blockwise",
    "set_backend",
    "use_backend",
]
