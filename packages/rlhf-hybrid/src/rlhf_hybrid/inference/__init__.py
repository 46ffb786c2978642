"""Generate mode's fast path: an inference layout of a HF causal LM and a KV-cache decode loop.

    reason = supported(model)            # None, or why not (log it and fall back to HF generate)
    layout = build_layout(model, state)  # fused QKV / gate-up, other weights shared, not copied
    out = generate(layout, input_ids, attention_mask, max_new_tokens=256, eos_token_id=eos)
    out.sequences                        # (B, P + R), as HF generate returns them

On CUDA the decode steps replay CUDA graphs, one per batch-size bucket, kept in a
:class:`DecodeGraphs` that a caller passes to every call to reuse them (see :mod:`.graphs`):

    graphs = DecodeGraphs()              # keep it: cache, static buffers, one graph per bucket
    out = generate(layout, input_ids, attention_mask, max_new_tokens=256, graphs=graphs)

Families: Llama-style (Llama, Mistral, Qwen2), OPT and GPT-2 (see :mod:`.adapters`). Greedy tokens
match HF ``generate`` on the same weights (fp32, left-padded prompts); the kernels are
rlhf_kernels' ops (PyTorch references on CPU).
"""

from .adapters import SUPPORTED_CLASSES, build_layout, fused_groups, supported
from .generate import GenerationOutput, generate
from .graphs import BATCH_BUCKETS, DecodeGraphs, bucket_size
from .layout import InferenceLayout, KVCache, LayerWeights
from .tp import shard_layout

__all__ = [
    "BATCH_BUCKETS",
    "SUPPORTED_CLASSES",
    "DecodeGraphs",
    "GenerationOutput",
    "InferenceLayout",
    "KVCache",
    "LayerWeights",
    "bucket_size",
    "build_layout",
    "fused_groups",
    "generate",
    "shard_layout",
    "supported",
]
