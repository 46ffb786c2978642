"""Finding algorithms: every algorithm, built-in or third-party, is an entry point in one group.

A plugin package registers its class in its own ``pyproject.toml``::

    [project.entry-points."rlhf.algorithms"]
    my_algo = "my_package.algo:MyAlgo"

and after ``pip install`` it is listed by :func:`available_algorithms` and loaded by
:func:`get_algorithm` exactly like the built-ins, which register the same way in
``packages/rlhf-algos/pyproject.toml``. Every stage of the pipeline is such an algorithm: ``sft``
and ``rm`` as well as the stage-3 ones (``ppo``, ``dpo``, ...).

A plugin replaces a built-in by registering its name: when a name is registered by rlhf-algos
(target in ``rlhf_algos``) and by one other package, the other package's class is the one loaded.
Two registrations of one name outside rlhf-algos with different targets are an error.
"""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint, entry_points

__all__ = ["ENTRY_POINT_GROUP", "REQUIRED_ATTRIBUTES", "available_algorithms", "get_algorithm",
           "registered_entry_points"]

ENTRY_POINT_GROUP = "rlhf.algorithms"
REQUIRED_ATTRIBUTES: tuple[str, ...] = ("name", "kind", "data_kind", "required_models", "config_class",
                                        "description")
_KINDS = ("online", "offline", "supervised", "reward_model")
_DATA_KINDS = ("prompts", "pairs", "demonstrations")
_ROLES = ("actor", "reference", "critic", "reward")

_cache: dict[str, type] | None = None
log = logging.getLogger(__name__)
_replaced_told: set[tuple[str, str]] = set()  # (name, plugin target) already logged


_BUILT_IN_PREFIXES = ("rlhf_algos.", "rlhf_data.")  # the packages of this project register built-ins


def _is_built_in(ep: EntryPoint) -> bool:
    return ep.value.startswith(_BUILT_IN_PREFIXES)


def _entry_points() -> dict[str, EntryPoint]:
    return registered_entry_points(ENTRY_POINT_GROUP, "algorithm")


def registered_entry_points(group: str, what: str) -> dict[str, EntryPoint]:
    """Name -> entry point of ``group`` (``what`` names one item in messages: "algorithm", "environment").

    A third-party registration replaces a built-in of the same name; two third-party registrations of
    one name with different targets are an error (``ValueError``)."""
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        seen = found.get(ep.name)
        if seen is None or seen.value == ep.value:  # an identical duplicate (e.g. a stale egg-info) is harmless
            found[ep.name] = ep
        elif _is_built_in(seen) != _is_built_in(ep):
            plugin, built_in = (seen, ep) if _is_built_in(ep) else (ep, seen)
            found[ep.name] = plugin  # the plugin wins; say so once, so a shadowed built-in is never silent
            if (ep.name, plugin.value) not in _replaced_told:
                _replaced_told.add((ep.name, plugin.value))
                log.warning("%s %r: the plugin %s replaces the built-in %s", what, ep.name, plugin.value,
                            built_in.value)
        else:
            raise ValueError(f"{what} {ep.name!r} is registered twice in entry-point group {group!r}: "
                             f"{seen.value} and {ep.value}; uninstall one of the packages")
    return found


def _load(ep: EntryPoint) -> type:
    """Import an entry point and check that it declares what the CLI needs."""
    where = f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP!r})"
    try:
        cls = ep.load()
    except Exception as e:  # a broken plugin must say which one it is
        raise ImportError(f"{where} failed to import: {type(e).__name__}: {e}") from e
    missing = [a for a in REQUIRED_ATTRIBUTES if not hasattr(cls, a)]
    if missing:
        raise TypeError(f"{where}: {cls!r} does not declare {', '.join(missing)} (see rlhf_algos.Algorithm)")
    problems = []
    if cls.kind not in _KINDS:
        problems.append(f"kind={cls.kind!r} (allowed: {', '.join(_KINDS)})")
    if cls.data_kind not in _DATA_KINDS:
        problems.append(f"data_kind={cls.data_kind!r} (allowed: {', '.join(_DATA_KINDS)})")
    if not set(cls.required_models) <= set(_ROLES):
        problems.append(f"required_models={tuple(cls.required_models)!r} (allowed: a subset of {_ROLES})")
    if problems:
        raise TypeError(f"{where}: {cls.__name__} declares {'; '.join(problems)}")
    return cls


def available_algorithms(refresh: bool = False) -> dict[str, type]:
    """Every registered algorithm, name -> class, sorted by name (imports each one).

    Args:
        refresh: Re-read the entry points (after installing a plugin in the same process).

    Raises:
        ImportError: A registered class cannot be imported (the message names the entry point).
        TypeError: A registered class does not declare the interface's class variables.
        ValueError: One name is registered twice with different targets.
    """
    global _cache
    if _cache is None or refresh:
        eps = _entry_points()
        _cache = {name: _load(eps[name]) for name in sorted(eps)}
    return dict(_cache)


def get_algorithm(name: str) -> type:
    """The class registered as ``name`` (imports only that one).

    Raises:
        ValueError: ``name`` is not registered; the message lists every available name and the
            entry-point group to register under.
        ImportError, TypeError: As :func:`available_algorithms`, for that entry point.
    """
    eps = _entry_points()
    if name not in eps:
        available = ", ".join(sorted(eps)) or "(none)"
        raise ValueError(f"unknown algorithm {name!r}; available: {available}. Algorithms are registered under "
                         f"the entry-point group {ENTRY_POINT_GROUP!r}")
    return _load(eps[name])
