"""Models built partitioned under ZeRO-3 from the first byte: no rank ever holds the whole model.

``HybridEngine`` under ZeRO-3 shards the parameters when it is created; a model built whole first
(``load_causal_lm``, ``LlamaForCausalLM(config)``) has by then cost every rank the full model's
memory. The builders here construct it inside DeepSpeed's ZeRO-3 init instead, with the DeepSpeed
config the engine will use (:func:`~rlhf_hybrid.engine.deepspeed_config`), so that each parameter is
partitioned as soon as its module is built:

* from a checkpoint (:func:`build_causal_lm` with a path, :func:`build_value_model`): transformers'
  ``HfDeepSpeedConfig`` integration. ``from_pretrained`` builds the model under
  ``deepspeed.zero.Init``; rank 0 reads the checkpoint and copies it in one module at a time (each
  module's parameters gathered, written, re-partitioned), the other ranks read only its key names.
  Peak memory: one module's whole parameters per rank, plus the checkpoint file on rank 0 (memory-
  mapped for safetensors).
* from a config (random weights): the model is built under ``deepspeed.zero.Init`` without
  initialisation, then every module is initialised by the model's own ``_init_weights``, the RNG
  re-seeded per module from ``seed`` and the module's name: each rank draws that module's whole
  weights locally (the same numbers on every rank) and keeps its partition, so no collective runs and
  the peak is one module's weights. :func:`seeded_init_` does the same on a whole model, so a model built whole
  (``partition=False``) and one built partitioned hold the same weights for the same seed, whatever
  order the constructor drew random numbers in. (transformers' own ZeRO-3 init draws in another order
  than its whole-model init, so the two would differ.)

* from a config with ``seed=None`` (the CLI's demo model): transformers' own initialisation, drawn from
  the caller's global RNG in transformers' order, as ``causal_lm_from_config`` builds it whole. Under
  ``zero.Init`` each module's parameters are partitioned as soon as its constructor returns, so
  transformers' per-module initialiser (run by ``post_init``) is given that module's whole parameters on
  every rank (:func:`_whole_modules_init`) and each rank keeps its partition: the same weights, and the
  same global RNG state after, as the whole build (the ranks' RNG states must agree: checked).

Outside ZeRO-3 the builders return the whole model. The ``HfDeepSpeedConfig`` is alive only while a
builder runs: transformers reads it globally (``is_deepspeed_zero3_enabled``), and a later
``generate`` on a plain copy must not think it is under ZeRO-3.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
from torch import nn

from .engine import EngineConfig, _import_deepspeed, deepspeed_config
from .hostmem import fix_mmap_threshold
from .models import ValueModel, causal_lm_from_config, load_causal_lm


def is_partitioned(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are ZeRO-3 partitioned (built under ``zero.Init`` or already wrapped)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def local_numel(module: nn.Module) -> tuple[int, int]:
    """``(elements this rank holds, elements of the whole model)`` over ``module``'s parameters (each
    shared parameter counted once). A whole model holds all of them."""
    local = total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            total += p.ds_numel
        else:
            local += p.numel()
            total += p.numel()
    return local, total


@contextlib.contextmanager
def zero3_init(cfg: EngineConfig, *, trainable: bool = True) -> Iterator[dict]:
    """Inside the block, transformers builds (``from_pretrained``, ``from_config``) models partitioned
    under ZeRO-3 with the DeepSpeed config of an engine of ``cfg``; yields that config. Collective:
    every rank of the default process group enters it.

    Raises:
        ValueError: ``cfg.zero_stage`` is not 3.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    conf = _zero3_config(cfg, trainable)
    hf_conf = HfDeepSpeedConfig(conf)  # transformers keeps only a weak reference: hold it while building
    try:
        yield conf
    finally:
        unset_hf_deepspeed_config()
        del hf_conf


def _zero3_config(cfg: EngineConfig, trainable: bool) -> dict:
    """The DeepSpeed config of an engine of ``cfg``, with deepspeed.comm set up for ``zero.Init``."""
    import torch.distributed as dist

    if cfg.zero_stage != 3:
        raise ValueError(f"zero_stage: partitioned construction needs zero_stage=3, got {cfg.zero_stage}")
    fix_mmap_threshold()  # freed whole parameters go back to the OS, not into heap fragments (hostmem.py)
    ds = _import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    # zero.Init reads the world size from deepspeed.comm, which deepspeed.initialize would set up later:
    # wrap our process group now, exactly as it will (the same call, a no-op the second time).
    ds.comm.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return deepspeed_config(cfg, dist.get_world_size() if dist.is_initialized() else 1, trainable)


def seeded_init_(model: nn.Module, seed: int) -> nn.Module:
    """Initialise every parameter of ``model`` with its own ``_init_weights`` (transformers' scheme), the
    RNG seeded per module from ``seed`` and the module's name; in place, whole or ZeRO-3 partitioned.
    Partitioned, every rank draws one module's whole parameters at a time (the same numbers on every
    rank: the same seed) and keeps its own partition of them; no collective. The caller's RNG state is
    left as it was.

    Returns:
        ``model``.
    """
    init_fn = model._init_weights  # a transformers PreTrainedModel's per-module initialiser
    partitioned = is_partitioned(model)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for name, module in model.named_modules():
            params = list(module.parameters(recurse=False))
            if not params and not list(module.buffers(recurse=False)):
                continue
            with _whole_here(params) if partitioned else contextlib.nullcontext():
                torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                init_fn(module)
    return model


@contextlib.contextmanager
def _whole_here(params: list[nn.Parameter]) -> Iterator[None]:
    """Inside, each ZeRO-3 partitioned parameter of ``params`` is a whole (zero) tensor of its shape on this
    rank alone; on exit the rank copies its own partition of what was written into ``ds_tensor`` and the
    parameter is the empty placeholder again. DeepSpeed's layout (as rlhf_hybrid.gather reads it): rank r
    of the parameter's group holds elements ``[r*n, (r+1)*n)`` of the flattened tensor, n =
    ``ds_tensor.numel()``, the last rank's tail zero-padded."""
    import torch.distributed as dist

    placeholders = [p.data for p in params]
    for p in params:
        p.data = torch.zeros(p.ds_shape, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
    try:
        yield
    finally:
        for p, placeholder in zip(params, placeholders, strict=True):
            n = p.ds_tensor.numel()
            start = dist.get_rank(group=p.ds_process_group) * n
            mine = p.data.reshape(-1)[start : start + n]
            p.ds_tensor.zero_()
            p.ds_tensor[: mine.numel()].copy_(mine)
            p.data = placeholder


def cast_partitioned_(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """What ``module.to(dtype)`` does, for a module whose parameters are (partly) ZeRO-3 partitioned:
    whole parameters and floating-point buffers are cast; partitions are left where they are, and must
    already be in ``dtype`` (``.to`` would only replace their empty placeholders).

    Raises:
        ValueError: a partitioned parameter of another dtype (built with another engine config).
    """
    for name, p in module.named_parameters():
        if hasattr(p, "ds_tensor"):
            if p.ds_tensor.dtype != dtype:
                raise ValueError(f"dtype: parameter {name!r} was partitioned in {p.ds_tensor.dtype}, the engine trains in "
                                 f"{dtype}; build the model with the engine's config (rlhf_hybrid.zero_init)")
        elif p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    for mod in module.modules():
        for key, buf in mod._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                mod._buffers[key] = buf.to(dtype)
    return module


def to_engine_dtype(module: nn.Module, cfg: EngineConfig, name: str) -> nn.Module:
    """``module`` in the dtype of an engine of ``cfg`` (``HybridEngine`` calls it). One built partitioned stays
    partitioned (:func:`cast_partitioned_`: ``module.to`` would cast only its placeholders).

    Raises:
        ValueError: a partitioned module for an engine that is not ZeRO-3, or partitioned in another dtype.
    """
    if not is_partitioned(module):
        return module.to(cfg.torch_dtype)
    if cfg.zero_stage != 3:
        raise ValueError(f"zero_stage: {name} was built ZeRO-3 partitioned; its engine needs zero_stage=3, got "
                         f"{cfg.zero_stage}")
    return cast_partitioned_(module, cfg.torch_dtype)


def build_causal_lm(source, cfg: EngineConfig, *, trainable: bool = True, seed: int | None = 0,
                    partition: bool | None = None, **load_kwargs) -> nn.Module:
    """A causal LM for an engine of ``cfg``, partitioned from the first byte under ZeRO-3.

    Args:
        source: A checkpoint directory or hub name (``from_pretrained``, weights loaded exactly), or a
            transformers ``PretrainedConfig`` (random weights, :func:`seeded_init_` with ``seed``).
        cfg: The engine's config: its ``zero_stage``, ``dtype`` and offload settings shape the
            DeepSpeed config the model is built with.
        trainable: Whether the engine will train it (the DeepSpeed config differs: clipping).
        seed: Random init only: :func:`seeded_init_`'s seed, or None: transformers' initialisation from the
            global RNG, equal to ``causal_lm_from_config`` whole or partitioned (every rank's RNG state the same).
        partition: Build partitioned (default: when ``cfg.zero_stage == 3``). ``False`` builds whole
            (today's path, the reference the tests compare with).
        **load_kwargs: for a checkpoint, :func:`~rlhf_hybrid.models.load_causal_lm`'s settings (dtype,
            attn_implementation, ...); partitioned, the dtype is the engine's (``zero.Init`` casts to it).
            From a config, ``attn_implementation`` only (the dtype is the engine's).

    Returns:
        The model in ``cfg``'s dtype; under ZeRO-3 each rank holds its partition of every parameter.
        Collective when partitioned.
    """
    partition = cfg.zero_stage == 3 if partition is None else partition
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        with zero3_init(cfg, trainable=trainable) if partition else contextlib.nullcontext():
            return load_causal_lm(str(source), **_load_kw(cfg, partition, load_kwargs))
    unknown = set(load_kwargs) - {"attn_implementation", "dtype", "trust_remote_code", "revision"}
    if unknown:
        raise TypeError(f"build_causal_lm: unexpected keyword argument(s) {sorted(unknown)}")
    return _from_config(source, cfg.torch_dtype, seed, _zero3_config(cfg, trainable) if partition else None,
                        load_kwargs.get("attn_implementation"))


def _from_config(config, dtype: torch.dtype, seed: int | None, ds_config: dict | None,
                 attn_implementation: str | None = None) -> nn.Module:
    """A random model of ``config``: built under ``zero.Init(ds_config)`` (partitioned) or whole. With a
    ``seed``, without transformers' initialisation (its ZeRO-3 one would gather every module once more),
    then :func:`seeded_init_`; with None, transformers' initialisation from the global RNG
    (:func:`_whole_modules_init` when partitioned)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights

    contexts: list = []
    if seed is not None:
        contexts += [torch.random.fork_rng(devices=[]), no_init_weights()]  # the caller's RNG is left alone
    if ds_config is not None:
        import deepspeed

        if seed is None:
            _check_same_rng()
        with contextlib.suppress(ImportError):  # transformers 5: keeps rotary tables out of zero.Init's dtype cast
            from transformers.integrations.deepspeed import prevent_arange_dtype_change

            contexts.append(prevent_arange_dtype_change())
        if seed is None:  # entered first: its transformers import must not run under zero.Init's patched torch
            contexts.append(_whole_modules_init())
        contexts.append(deepspeed.zero.Init(config_dict_or_path=ds_config))
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        model = causal_lm_from_config(config, dtype, attn_implementation=attn_implementation)
    if seed is not None:
        seeded_init_(model, seed)
        model.tie_weights()
    return model


@contextlib.contextmanager
def _whole_modules_init() -> Iterator[None]:
    """Inside (and inside ``zero.Init``), transformers' per-module initialiser
    (``PreTrainedModel._initialize_weights``, which ``post_init`` runs over every module) sees the module's
    whole parameters (:func:`_whole_here`) instead of the empty placeholders ``zero.Init`` left after the
    module's constructor: the same random numbers are drawn, in the same order, as in a whole build. A
    module already initialised (transformers' ``_is_hf_initialized``; a sub-model's ``post_init`` ran first)
    is skipped as transformers skips it, before its partitions could be overwritten. The patch is undone on
    exit. A parameter an initialiser leaves alone would keep zeros here, not its constructor's values:
    the tests compare the demo's Llama with its whole build."""
    from transformers import PreTrainedModel

    original = PreTrainedModel._initialize_weights

    def initialize(self, module, *args, **kwargs):
        params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
        if not params or getattr(module, "_is_hf_initialized", False):
            return original(self, module, *args, **kwargs)
        with _whole_here(params):
            return original(self, module, *args, **kwargs)

    PreTrainedModel._initialize_weights = initialize
    try:
        yield
    finally:
        PreTrainedModel._initialize_weights = original


def _check_same_rng() -> None:
    """Every rank's global torch RNG state is the same (a partitioned build from it keeps each rank's own
    draws). Collective.

    Raises:
        ValueError: they differ.
    """
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, zlib.crc32(torch.get_rng_state().numpy().tobytes()))
    if len(set(states)) > 1:
        raise ValueError("seed: None draws the model's weights from the global RNG, but the ranks' torch RNG states "
                         "differ; seed every rank alike (torch.manual_seed) before building, or pass a seed")


def _load_kw(cfg: EngineConfig, partition: bool, load_kwargs: dict) -> dict:
    return {"dtype": cfg.torch_dtype} | load_kwargs | ({"dtype": cfg.torch_dtype} if partition else {})


def build_value_model(source, cfg: EngineConfig, *, trainable: bool = True, seed: int | None = 0,
                      partition: bool | None = None, **load_kwargs) -> ValueModel:
    """A value model (reward model, critic) for an engine of ``cfg``, partitioned from the first byte
    under ZeRO-3: its causal-LM backbone as :func:`build_causal_lm` builds it; from a checkpoint
    directory, ``ValueModel.from_pretrained`` built inside ZeRO-3's init, in any of its formats (a
    sequence-classification checkpoint, the older causal LM + ``value_head.safetensors``, a plain causal
    LM with a zero head: a head not in the checkpoint is written whole and re-partitioned). The value
    head of a config-built one (hidden_size x 1) is built whole and partitioned by the engine."""
    partition = cfg.zero_stage == 3 if partition is None else partition
    if not (isinstance(source, (str, bytes)) or hasattr(source, "__fspath__")):
        return ValueModel(build_causal_lm(source, cfg, trainable=trainable, seed=seed, partition=partition))
    with zero3_init(cfg, trainable=trainable) if partition else contextlib.nullcontext():
        return ValueModel.from_pretrained(str(source), **_load_kw(cfg, partition, load_kwargs))


__all__ = ["build_causal_lm", "cast_partitioned_", "to_engine_dtype", "build_value_model", "is_partitioned", "local_numel", "seeded_init_", "zero3_init"]
