"""Data sources: adapters that turn raw rows into canonical records, found by name.

A *source spec* names where data comes from and how much of it to use. Several are joined with
commas (brackets may hold commas)::

    hh                                   the adapter's default hub dataset (needs internet)
    hh:./hh-train.jsonl                  a local file in the adapter's schema
    hh:Anthropic/hh-rlhf:0.5             a hub dataset, weight 0.5
    shp:0.3                              default hub dataset, weight 0.3
    ./pairs.jsonl                        a local file; the format is detected from its columns
    local:./x.csv[prompt=question,chosen=good,rejected=bad]:0.2
                                         a generic local file with a column mapping
    org/name[subset=en,revision=v1,split=train,streaming=true]
                                         a hub dataset by id: the format is detected from its rows;
                                         the options choose how datasets.load_dataset loads it
    ./saved                              a Dataset/DatasetDict.save_to_disk directory

Adapters are registered under the entry-point group ``rlhf.data.sources``; the built-ins are
registered there exactly as a third party's are (see rlhf-data's pyproject.toml).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from .errors import DataError
from .readers import (
    FILE_SUFFIXES,
    HUB_OPTIONS,
    HubOptions,
    is_saved_dataset,
    read_hub_rows,
    read_rows,
    read_saved_rows,
)
from .records import Record

log = logging.getLogger(__name__)

GROUP = "rlhf.data.sources"
# options every adapter that reads data accepts: which splits to read, and how load_dataset loads them
LOAD_OPTIONS = ("split", "eval_split", *HUB_OPTIONS)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class RowError(ValueError):
    """Raised by :meth:`SourceAdapter.convert` for a malformed row (``field`` names the bad column)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field!r}: {message}")
        self.field = field


class SkipRow(Exception):  # noqa: N818  (control flow, not an error)
    """Raised by :meth:`SourceAdapter.convert` for a well-formed row that cannot be used
    (a tie, chosen == rejected); the row is dropped and counted under ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# adapters
# ----------------------------------------------------------------------------------------------
class SourceAdapter:
    """Base class of a source adapter: one public data format.

    Subclasses set the class attributes and implement :meth:`convert`. Register a subclass under
    the entry-point group ``rlhf.data.sources`` (``name = "package.module:Class"``).

    Attributes:
        name: the registered name (the entry point's name must match it).
        hub_id: the dataset loaded when the spec gives no location (``None``: a location is required).
        columns: top-level columns every row must have (checked once per file, with the row number).
        train_split / eval_split: the hub dataset's splits; ``eval_split=None`` means the eval part
            is held out from ``train_split`` (see :func:`rlhf_data.build_stage_data`).
        record_kind: what :meth:`convert` returns: "preference", "sft", "prompt", "chat" or "mixed".
        example: one raw row in the format, as JSON (used by the docs and the tests).
        reads_data: whether the source reads rows (and so takes the load options: ``split``,
            ``eval_split``, ``subset``, ``revision``, ``streaming``, ``max_rows``).
    """

    name: ClassVar[str] = ""
    hub_id: ClassVar[str | None] = None
    columns: ClassVar[tuple[str, ...]] = ()
    train_split: ClassVar[str] = "train"
    eval_split: ClassVar[str | None] = "test"
    record_kind: ClassVar[str] = "preference"
    example: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reads_data: ClassVar[bool] = True

    def __init__(self, options: dict[str, str] | None = None) -> None:
        options = dict(options or {})
        allowed = self.option_names() + (LOAD_OPTIONS if self.reads_data else ())
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise DataError(f"source {self.name!r}: unknown option(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(allowed) or 'none'}")
        self.load_options = {k: str(v) for k, v in options.items() if k in LOAD_OPTIONS}
        self.options = {k: v for k, v in options.items() if k not in LOAD_OPTIONS}
        self.hub = HubOptions.from_options(self.load_options, self.name)
        # the splits read: the spec's [split=..., eval_split=...] or the format's own; "none" = no eval split
        self.read_split = self.load_options.get("split") or self.train_split
        eval_split = self.load_options.get("eval_split", self.eval_split)
        self.read_eval_split = None if eval_split in (None, "", "none") else eval_split

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Options accepted in the spec's brackets (``name:path[key=value,...]``)."""
        return ()

    def required_columns(self) -> tuple[str, ...]:
        return self.columns

    def convert(self, row: dict[str, Any]) -> Record:
        """One raw row -> one canonical record.

        Raises:
            RowError: the row is malformed (missing/empty/wrong-typed field).
            SkipRow: the row is well formed but unusable (dropped and counted).
        """
        raise NotImplementedError

    @classmethod
    def detect(cls, row: dict[str, Any]) -> bool:
        """Whether a row of a local file without a named format is in this format."""
        return False

    # -- reading ------------------------------------------------------------------------------
    def read(self, location: str, split: str | None) -> tuple[str, list[dict]] | None:
        """Raw rows of ``location`` (local file or hub id) for ``split``.

        Returns ``(where, rows)`` or ``None`` when the dataset has no such split. A local file (or a
        ``save_to_disk`` directory of one ``Dataset``) holds only the train part (``split ==
        self.read_split``); its eval part is held out from it.
        """
        if is_local(location):
            return (location, read_rows(location)) if split == self.read_split else None
        if is_saved_dataset(location):
            return read_saved_rows(location, split, whole=split == self.read_split)
        return read_hub_rows(location, split, self.hub)

    def check_location(self, location: str) -> None:
        """Raise ``DataError`` for load options that do not apply to ``location`` (nothing is ignored)."""
        if is_local(location):
            bad = sorted(self.load_options)
            what = "a local file"
        elif is_saved_dataset(location):
            bad = sorted(set(self.load_options) & set(HUB_OPTIONS))
            what = "a save_to_disk directory (datasets.load_from_disk)"
        else:
            return
        if bad:
            raise DataError(f"source {self.name or location!r}: option(s) {', '.join(bad)} do not apply to {location!r}, "
                            f"{what}; they apply to datasets loaded with datasets.load_dataset (hub ids, dataset "
                            f"directories)" + ("; split/eval_split also to DatasetDict directories"
                                               if what == "a local file" else ""))


def text_field(row: dict, name: str, *, allow_empty: bool = False) -> str:
    """``row[name]`` as a string, or :class:`RowError` naming the field."""
    if name not in row or row[name] is None:
        raise RowError(name, "missing")
    value = row[name]
    if not isinstance(value, str):
        raise RowError(name, f"expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(name, "empty")
    return value


def number_field(row: dict, name: str) -> float:
    if name not in row or row[name] is None:
        raise RowError(name, "missing")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RowError(name, f"expected a number, got {row[name]!r}") from None
    if math.isnan(value):
        raise RowError(name, "is NaN")
    return float(value)


def messages_field(row: dict, name: str, *, role_key: str = "role", content_key: str = "content",
                   role_map: dict[str, str] | None = None) -> tuple[dict[str, str], ...]:
    """A list of message dicts as canonical ``{"role", "content"}`` messages."""
    if name not in row or row[name] is None:
        raise RowError(name, "missing")
    value = row[name]
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(name, "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or role_key not in m or content_key not in m:
            raise RowError(name, f"message {i} needs {role_key!r} and {content_key!r} keys, got {m!r:.80}")
        role = (role_map or {}).get(m[role_key], m[role_key])
        if role not in ("system", "user", "assistant"):
            allowed = sorted(role_map) if role_map else ["system", "user", "assistant"]
            raise RowError(name, f"message {i} has role {m[role_key]!r}; allowed: {', '.join(allowed)}")
        if not isinstance(m[content_key], str):
            raise RowError(name, f"message {i} content is not text")
        out.append({"role": role, "content": m[content_key]})
    return tuple(out)


def check_pair(chosen: str, rejected: str) -> None:
    if chosen.strip() == rejected.strip():
        raise SkipRow("chosen == rejected")


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
_cache: dict[str, type[SourceAdapter]] | None = None


def available_sources(refresh: bool = False) -> dict[str, type[SourceAdapter]]:
    """Every registered adapter, by name (from the ``rlhf.data.sources`` entry points)."""
    global _cache
    if _cache is None or refresh:
        found: dict[str, type[SourceAdapter]] = {}
        for ep in entry_points(group=GROUP):
            try:
                cls = ep.load()
            except Exception as e:  # a broken plugin must not hide the others
                log.warning("rlhf.data.sources: cannot load %s = %s: %s", ep.name, ep.value, e)
                continue
            if not (isinstance(cls, type) and issubclass(cls, SourceAdapter)):
                log.warning("rlhf.data.sources: %s = %s is not a SourceAdapter subclass", ep.name, ep.value)
                continue
            found[ep.name] = cls
        _cache = found
    return dict(_cache)


def get_source(name: str) -> type[SourceAdapter]:
    """The adapter registered as ``name`` (or whose default hub dataset is ``name``).

    Raises:
        DataError: unknown name; the message lists the available ones.
    """
    sources = available_sources()
    if name in sources:
        return sources[name]
    by_hub = {cls.hub_id: cls for cls in sources.values() if cls.hub_id}
    if name in by_hub:
        return by_hub[name]
    raise DataError(f"unknown data source {name!r}; available: {', '.join(sorted(sources))} "
                    f"(or a local {'/'.join(FILE_SUFFIXES)} file, a dataset directory, or a hub dataset id 'org/name'; "
                    f"adapters register under the entry-point group {GROUP!r})")


# ----------------------------------------------------------------------------------------------
# specs
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSpec:
    """One entry of a data spec: adapter ``name``, ``location`` (local path or hub id; "" = the
    adapter's default hub dataset), relative ``weight`` and adapter ``options``."""

    name: str
    location: str = ""
    weight: float = 1.0
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        s = self.name + (f":{self.location}" if self.location else "")
        if self.options:
            s += "[" + ",".join(f"{k}={v}" for k, v in self.options.items()) + "]"
        return s + (f":{self.weight:g}" if self.weight != 1.0 else "")

    @property
    def label(self) -> str:
        """Short name for reports: ``name`` or ``name:file``."""
        if not self.location:
            return self.name
        where = Path(self.location).name if is_local(self.location) else self.location
        return f"{self.name}:{where}" if self.name else where


def is_local(location: str) -> bool:
    """A local file (or something meant to be one) rather than a hub id. A local *directory* is not:
    it is loaded with ``datasets.load_from_disk`` when ``save_to_disk`` wrote it, else with
    ``datasets.load_dataset`` like a hub dataset (train/test files inside)."""
    p = Path(location).expanduser()
    if p.is_dir():
        return False
    return p.is_file() or location.lower().endswith(FILE_SUFFIXES) or location.startswith(("/", "./", "../", "~"))


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DataError(f"data spec {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise DataError(f"data spec {text!r}: unbalanced '['")
    return parts + [cur]


_FLOAT = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def parse_source(entry: str) -> SourceSpec:
    """One spec entry (see the module docstring) -> :class:`SourceSpec`."""
    text = entry.strip()
    if not text:
        raise DataError("data spec: empty entry (two commas in a row?)")
    options: dict[str, str] = {}
    m = re.search(r"\[(.*)\]", text)
    if m:
        for item in _split_top(m.group(1)):
            key, sep, value = item.partition("=")
            if not sep or not key.strip():
                raise DataError(f"data spec {entry!r}: option {item!r} is not key=value")
            options[key.strip()] = value.strip()
        text = text[: m.start()] + text[m.end() :]
    parts = text.split(":")
    weight = 1.0
    if len(parts) > 1 and (_FLOAT.match(parts[-1].strip()) or parts[-1].strip().startswith("-")):
        raw = parts.pop().strip()
        try:
            weight = float(raw)
        except ValueError:
            raise DataError(f"data spec {entry!r}: weight {raw!r} is not a number") from None
        if not weight > 0 or math.isinf(weight):
            raise DataError(f"data spec {entry!r}: weight {raw} must be a positive number")
    head = parts[0].strip()
    location = ":".join(parts[1:]).strip()
    if not location and _is_bare_location(head):
        name, location = "", head  # a bare file, directory or hub id: detect the format from its rows
    else:
        name = head
        cls = get_source(name)  # unknown names fail here, listing the available ones
        if location and not cls.reads_data:
            raise DataError(f"data spec {entry!r}: source {name!r} is generated in-process and takes no file or "
                            f"dataset, got {location!r}; write {name!r} alone (with a weight: '{name}:0.5')")
    return SourceSpec(name, location, weight, options)


def _is_bare_location(head: str) -> bool:
    """``head`` is data to read, not an adapter name: a local file or directory, or a hub id that is
    no adapter's default dataset (those pick their adapter)."""
    sources = available_sources()
    if head in sources or any(cls.hub_id == head for cls in sources.values()):
        return False
    return is_local(head) or Path(head).expanduser().is_dir() or bool(_HUB_ID.match(head))


def parse_data_spec(spec: str | list) -> list[SourceSpec]:
    """A data spec string (``"hh:0.5,shp:0.3,local:./x.jsonl:0.2"``) or the YAML list form
    (strings in that syntax, or mappings with ``source``, ``path``, ``weight``, ``columns``)."""
    entries: list[SourceSpec] = []
    if isinstance(spec, str):
        if not spec.strip():
            raise DataError("data spec: empty; give a source name or a file, e.g. 'demo' or 'hh:./hh.jsonl'")
        entries = [parse_source(e) for e in _split_top(spec)]
    elif isinstance(spec, (list, tuple)):
        for i, item in enumerate(spec):
            if isinstance(item, SourceSpec):
                entries.append(item)
            elif isinstance(item, str):
                entries.append(parse_source(item))
            elif isinstance(item, dict):
                unknown = set(item) - {"source", "path", "weight", "columns", "options"}
                if unknown or "source" not in item and "path" not in item:
                    raise DataError(f"data.sources[{i}]: keys {sorted(item)}; allowed: source, path, weight, "
                                    f"columns (and at least one of source, path)")
                text = str(item.get("source", "")) + (":" if "source" in item and "path" in item else "")
                text += str(item.get("path", ""))
                opts = {**(item.get("columns") or {}), **(item.get("options") or {})}
                if opts:
                    text += "[" + ",".join(f"{k}={v}" for k, v in opts.items()) + "]"
                weight = item.get("weight", 1.0)
                if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                    raise DataError(f"data.sources[{i}].weight: {weight!r} must be a positive number")
                entries.append(SourceSpec(**{**parse_source(text).__dict__, "weight": float(weight)}))
            else:
                raise DataError(f"data.sources[{i}]: {item!r} is neither a spec string nor a mapping")
    else:
        raise DataError(f"data spec: expected a string or a list, got {type(spec).__name__}")
    labels = Counter(str(e) for e in entries)
    dup = [s for s, n in labels.items() if n > 1]
    if dup:
        raise DataError(f"data spec: source {dup[0]!r} is listed twice; give it once with its total weight")
    return entries


def iter_records(adapter: SourceAdapter, rows: list[dict], where: str, dropped: Counter) -> Iterator[tuple[int, Record]]:
    """Convert rows, yielding ``(row number, record)``; drops are counted in ``dropped``.

    Raises:
        DataError: a required column is missing from the file, or a row is malformed (file, row, field).
    """
    required = adapter.required_columns()
    if rows:
        missing = [c for c in required if c not in rows[0]]
        if missing:
            raise DataError(f"{where}: missing column(s) {', '.join(map(repr, missing))} for format "
                            f"{adapter.name!r} (row 1 has columns {', '.join(map(repr, rows[0]))})")
    for n, row in enumerate(rows, 1):
        try:
            yield n, adapter.convert(row)
        except SkipRow as s:
            dropped[s.reason] += 1
        except RowError as e:
            raise DataError(f"{where}: row {n}: {e} (format {adapter.name!r})") from None
        except DataError as e:  # a problem of the whole file found at its first row: name the file
            raise DataError(f"{where}: {e}") from None


def detect_source(rows: list[dict], where: str) -> type[SourceAdapter]:
    """The adapter for a local file given without a format name, from its first row."""
    row = rows[0]
    hits = [cls for cls in available_sources().values() if cls.detect(row)]
    if len(hits) == 1:
        return hits[0]
    cols = ", ".join(map(repr, row))
    if not hits:
        raise DataError(f"{where}: cannot tell the format from the columns ({cols}); name it, e.g. "
                        f"'hh:{where}', or map columns: 'local:{where}[prompt=...,chosen=...,rejected=...]'")
    raise DataError(f"{where}: columns ({cols}) fit several formats: {', '.join(c.name for c in hits)}; "
                    f"name one, e.g. '{hits[0].name}:{where}'")
