"""rlhf-kernels: inference kernels and quantized collectives, each with a pure-PyTorch reference.

Every op has a pure-PyTorch reference implementation (the CPU path and the test oracle) and a
Triton GPU implementation, chosen at first call per device type (see :func:`set_backend` and the
``RLHF_KERNELS_BACKEND`` environment variable). Importing this package never imports triton.
"""

from ._backend import get_backend, set_backend, use_backend
from ._version import __version__
from .attention import decode_attention
from .comm import CommStats, quantized_all_gather, quantized_reduce_scatter, two_level_groups
from .logprobs import fused_logprobs, logprobs_from_hidden
from .norms import layer_norm, rms_norm
from .quant import QuantizedTensor, dequantize_blockwise, quantize_blockwise
from .rotary import apply_rotary_, rotary_cos_sin
from .sampling import hash_uniform, sample

__all__ = [
    "CommStats",
    "QuantizedTensor",
    "__version__",
    "apply_rotary_",
    "decode_attention",
    "dequantize_blockwise",
    "fused_logprobs",
    "get_backend",
    "hash_uniform",
    "layer_norm",
    "logprobs_from_hidden",
    "quantize_blockwise",
    "quantized_all_gather",
    "quantized_reduce_scatter",
    "rms_norm",
    "rotary_cos_sin",
    "sample",
    "set_backend",
    "two_level_groups",
    "use_backend",
]
