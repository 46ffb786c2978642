"""Static decode steps: batch-size buckets, static buffers and one captured CUDA graph per bucket.

A decode step of a 1B model at batch 64 is ~3 ms of GPU work, issued as several hundred small
kernel launches from Python: launch overhead is then a large part of the step. :class:`DecodeGraphs`
removes it by capturing :func:`~.model.decode_step` once per batch-size bucket in a
``torch.cuda.CUDAGraph`` and replaying it (the approach of vLLM's ``CUDAGraphRunner``):

* **What is captured**: the whole decode step (embedding, every block with its KV-cache write and
  decode attention, final norm, LM head, ``lengths += 1``) plus ``positions += 1``, reading the
  tokens from a static buffer and writing the (bucket, V) float32 logits to a static output.
  Sampling, log-probs and the EOS bookkeeping stay outside, eager, after each replay (as in vLLM):
  they are cheap, and the sampler's seed is drawn on the host per step.
* **Buckets**: a call with B rows decodes at ``bucket_size(B)`` rows (:data:`BATCH_BUCKETS`, then
  multiples of 64). Rows B.. are padding: token 0 at position 0, 1, ..., each attending only to
  the cache slots it wrote itself in this call; every op of the step is row-wise, so they never
  change a real row, and their logits are dropped.
* **Static state**: the KV cache (rows = the largest bucket used so far, slots rounded up to a
  multiple of ``length_multiple``), the token and position buffers and the rotary tables are owned
  here and reused across calls; each bucket uses the first ``bucket`` rows of them (views: same
  addresses for every call), so the prompt's padded width and the batch may vary between calls.
* **Reuse**: a bucket's graph is replayed only while the layout's tensors are the very same ones
  it was captured against (data pointers, shapes, strides, dtypes, and the layout's scalars) and
  the cache has not been reallocated; otherwise every graph is dropped and recaptured on first
  use. Under ZeRO-0/1/2 the layout can share storage with the training weights, whose addresses
  stay fixed (the optimizer writes in place), and graphs survive across rollouts; under ZeRO-3 the
  weights are gathered into new tensors for each rollout, so each rollout recaptures (one warm-up
  step and one capture per bucket used).

Without capture (``cuda_graphs=False`` with a :class:`DecodeGraphs`, and on CPU) the same buckets,
buffers and step function run eagerly: that static path is what the CPU tests check against HF
``generate``; the graph path differs from it only by capture and replay. No shrinking to a smaller
bucket when rows finish: it would move the KV cache of the unfinished rows (a copy of every
layer's cache rows), and the sampler's noise is keyed by row index, so sampled tokens would then
differ from the unbucketed path's; the early stop (see :func:`~.generate.generate`) covers the
common case of a batch whose rows all finish.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rlhf_kernels import rotary_cos_sin
from torch import nn

from .layout import InferenceLayout, KVCache
from .model import decode_step

Tensor = torch.Tensor

#: Batch sizes a decode step runs at (a B-row call runs at the smallest one >= B); past 128 the
#: buckets are the multiples of 64. Small steps first: a replay costs the bucket's full batch.
BATCH_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
_LARGE_BUCKET_STEP = 64

#: ``capture(step) -> replay``: ``step()`` runs one decode step eagerly and returns its logits;
#: ``replay()`` must run that same step again (on whatever the static buffers then hold) and
#: return its logits. The default captures a CUDA graph; tests pass a CPU stand-in.
CaptureFn = Callable[[Callable[[], Tensor]], Callable[[], Tensor]]


def bucket_size(batch: int) -> int:
    """The number of rows a decode step of ``batch`` rows runs at.

    Args:
        batch: B >= 1.

    Returns:
        The smallest of :data:`BATCH_BUCKETS` >= B, else B rounded up to a multiple of 64.

    Raises:
        ValueError: If ``batch`` < 1.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1; got {batch!r}")
    for size in BATCH_BUCKETS:
        if batch <= size:
            return size
    return -(-batch // _LARGE_BUCKET_STEP) * _LARGE_BUCKET_STEP


def _signature(value: object) -> object:
    """What a captured graph depends on: tensors by address and geometry, scalars by value."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr(), tuple(value.shape), value.stride(), value.dtype, value.device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tuple((f.name, _signature(getattr(value, f.name))) for f in dataclasses.fields(value))
    if isinstance(value, tuple | list):
        return tuple(_signature(v) for v in value)
    if isinstance(value, nn.Module):  # the activation: a fresh (parameter-free) module per layout
        params = tuple(sorted((k, v) for k, v in vars(value).items() if isinstance(v, int | float | str | bool)))
        return ("module", type(value), params, tuple(_signature(p) for p in value.parameters()))
    return value  # numbers, strings, None, a process group (compared by identity)


def _geometry(layout: InferenceLayout) -> tuple:
    """What the KV cache and the rotary tables depend on."""
    return (layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype, layout.device,
            layout.rope_theta)


@dataclass(frozen=True)
class StaticDecode:
    """One bucket's static decode step for one :func:`~.generate.generate` call.

    Attributes:
        bucket: Rows the step runs at.
        cache: The KV cache, ``bucket`` rows (views of :class:`DecodeGraphs`' cache).
        tokens: (bucket,) int64 input tokens: write each step's tokens into ``tokens[:B]``.
        positions: (bucket,) int64 positions of those tokens, advanced by one by each step.
        rope: Rotary (cos, sin) tables covering every slot of the cache, or None.
        run: Runs one step (replays the graph, or eagerly) and returns the (bucket, V) float32
            logits. With a graph the tensor is the graph's static output, overwritten by the next
            replay: read it before calling ``run`` again.
    """

    bucket: int
    cache: KVCache
    tokens: Tensor
    positions: Tensor
    rope: tuple[Tensor, Tensor] | None
    run: Callable[[], Tensor]

    def prefill_cache(self, batch: int) -> KVCache:
        """The first ``batch`` rows of the cache, for :func:`~.model.prefill` (views: writes land here)."""
        return KVCache(k=self.cache.k[:, :batch], v=self.cache.v[:, :batch], lengths=self.cache.lengths[:batch])

    def start(self, next_position: Tensor) -> None:
        """Resets the static inputs after prefill of B = ``len(next_position)`` rows.

        Real rows start at their next positions; padding rows at token 0, position 0 and an empty
        cache (also undoing what a capture's warm-up step wrote). No host sync.
        """
        B = next_position.shape[0]
        self.tokens.zero_()
        self.positions.zero_()
        self.positions[:B].copy_(next_position)
        self.cache.lengths[B:].zero_()


class DecodeGraphs:
    """Static decode state and one captured decode step per batch-size bucket, kept across calls.

    Pass the same instance to every :func:`~.generate.generate` call (an engine keeps one per
    policy): the KV cache, the static buffers and the graphs are reused while the layout's tensors
    stay the same (see the module docstring). It holds the cache's memory (and the graphs' memory
    pool) between calls: :meth:`clear` frees them, e.g. before a training phase that needs it.

    Args:
        capture: How to capture a step (:data:`CaptureFn`). Default: a ``torch.cuda.CUDAGraph``
            per bucket, all sharing one memory pool (buckets never run concurrently).
        length_multiple: Cache slots are allocated in multiples of this, so that calls whose
            prompts pad to different widths share one cache (and its graphs).

    Attributes:
        captures: Number of graphs captured so far (a recapture counts again).
    """

    def __init__(self, *, capture: CaptureFn | None = None, length_multiple: int = 128):
        if isinstance(length_multiple, bool) or not isinstance(length_multiple, int) or length_multiple < 1:
            raise ValueError(f"length_multiple must be an int >= 1; got {length_multiple!r}")
        self._custom_capture = capture
        self._length_multiple = length_multiple
        self.captures = 0
        self._pool: object | None = None
        self.clear()

    def clear(self) -> None:
        """Drops the graphs, the KV cache and the static buffers (the next call reallocates)."""
        self._graphs: dict[int, Callable[[], Tensor]] = {}
        self._weights: object | None = None  # _signature of the layout the graphs were captured against
        self._geometry: tuple | None = None
        self._cache: KVCache | None = None
        self._tokens: Tensor | None = None
        self._positions: Tensor | None = None
        self._rope: tuple[Tensor, Tensor] | None = None

    def capture_unavailable(self, layout: InferenceLayout) -> str | None:
        """None if graphs can be captured for ``layout``, else why not (a sentence)."""
        if self._custom_capture is not None:
            return None
        if layout.device.type != "cuda":
            return (f"CUDA graphs need the layout on a CUDA device; it is on {layout.device.type!r} "
                    "(use cuda_graphs=False: a DecodeGraphs then runs the same static steps eagerly)")
        return None

    def prepare(self, layout: InferenceLayout, batch: int, max_len: int, *, capture: bool) -> StaticDecode:
        """The static step for ``batch`` rows of up to ``max_len`` tokens, capturing it if needed.

        A capture runs one warm-up step on the cache before the caller's prefill (so call this
        before prefill; :meth:`StaticDecode.start` resets what the warm-up changed).

        Args:
            layout: The model.
            batch: B, the real rows of the call.
            max_len: P + R, the most tokens any row will hold.
            capture: Capture (or reuse) the bucket's graph; False runs the step eagerly.

        Returns:
            The bucket's :class:`StaticDecode`.

        Raises:
            RuntimeError: ``capture`` without a CUDA layout (see :meth:`capture_unavailable`).
        """
        if capture and (reason := self.capture_unavailable(layout)) is not None:
            raise RuntimeError(reason)
        bucket = bucket_size(batch)
        self._ensure_state(layout, bucket, max_len)
        assert self._cache is not None and self._tokens is not None and self._positions is not None
        cache = KVCache(k=self._cache.k[:, :bucket], v=self._cache.v[:, :bucket],
                        lengths=self._cache.lengths[:bucket])
        tokens, positions, rope = self._tokens[:bucket], self._positions[:bucket], self._rope

        def step() -> Tensor:
            logits = decode_step(layout, cache, tokens, positions, rope)  # (bucket, V); lengths += 1
            positions.add_(1)
            return logits

        run = step
        if capture:
            run = self._graphs.get(bucket)  # type: ignore[assignment]
            if run is None:
                # Valid inputs for the warm-up step (it writes slot 0 of each row; prefill overwrites).
                tokens.zero_()
                positions.zero_()
                cache.lengths.zero_()
                run = self._graphs[bucket] = (self._custom_capture or self._capture_cuda_graph)(step)
                self.captures += 1
        return StaticDecode(bucket, cache, tokens, positions, rope, run)

    def _ensure_state(self, layout: InferenceLayout, bucket: int, max_len: int) -> None:
        """(Re)allocates the cache and buffers if too small or for another model; drops stale graphs."""
        weights, geometry = _signature(layout), _geometry(layout)
        cache = self._cache
        fits = (cache is not None and geometry == self._geometry and cache.k.shape[1] >= bucket
                and cache.k.shape[3] >= max_len)
        if not fits:
            rows = bucket if cache is None or geometry != self._geometry else max(bucket, cache.k.shape[1])
            slots = max_len if cache is None or geometry != self._geometry else max(max_len, cache.k.shape[3])
            slots = -(-slots // self._length_multiple) * self._length_multiple
            self.clear()  # free the old cache before allocating the new one
            device = layout.device
            self._cache = KVCache.allocate(layout, rows, slots)
            self._tokens = torch.zeros(rows, dtype=torch.long, device=device)
            self._positions = torch.zeros(rows, dtype=torch.long, device=device)
            if layout.rope_theta is not None:
                # Positions stay below the slot count (a row's position <= its cache length).
                self._rope = rotary_cos_sin(slots, layout.head_dim, base=layout.rope_theta, device=device)
            self._geometry = geometry
        if weights != self._weights:
            self._graphs.clear()  # captured against other weights (or another cache): recapture
            self._weights = weights

    def _capture_cuda_graph(self, step: Callable[[], Tensor]) -> Callable[[], Tensor]:
        """Captures ``step`` in a CUDA graph (PyTorch's recipe: warm up on a side stream first)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            # Outside the capture: Triton compiles its kernels, cuBLAS picks its algorithms, lazy
            # initialisation runs. Its writes to the cache and buffers are reset before decoding.
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()  # recorded, not run: (bucket, V) in the graph's pool, rewritten by each replay

        def replay() -> Tensor:
            graph.replay()
            return out

        return replay


__all__ = ["BATCH_BUCKETS", "CaptureFn", "DecodeGraphs", "StaticDecode", "bucket_size"]
