"""Raw rows from wherever data lives: local files, ``save_to_disk`` directories, hub datasets.

* local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` / ``.arrow`` files: :func:`read_rows`;
* a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
  (``datasets.load_from_disk``): :func:`read_saved_rows`;
* a hub dataset id, or a local directory of data files / a dataset script
  (``datasets.load_dataset`` with subset, revision, split and streaming): :func:`read_hub_rows`.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
HUB_OPTIONS = ("subset", "revision", "streaming", "max_rows")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@dataclass(frozen=True)
class HubOptions:
    """How ``datasets.load_dataset`` loads a dataset (the spec's bracket options of the same names).

    Attributes:
        subset: the dataset's configuration (``load_dataset``'s ``name``), e.g. ``"default"``.
        revision: a git revision of the hub repository (branch, tag or commit).
        streaming: iterate the dataset instead of downloading and preparing it whole.
        max_rows: read only the first ``max_rows`` rows of each split (the report says so).
    """

    subset: str | None = None
    revision: str | None = None
    streaming: bool = False
    max_rows: int | None = None

    @classmethod
    def from_options(cls, options: dict[str, str], source: str) -> HubOptions:
        """The hub options among a source's spec options; raises ``DataError`` naming a bad value."""
        streaming = str(options.get("streaming", "false")).strip().lower()
        if streaming not in _TRUE + _FALSE:
            raise DataError(f"source {source!r}: option streaming={options['streaming']!r} is not allowed; "
                            f"allowed: true, false")
        max_rows = options.get("max_rows")
        if max_rows is not None:
            try:
                max_rows = int(max_rows)
            except (TypeError, ValueError):
                max_rows = -1
            if max_rows < 1:
                raise DataError(f"source {source!r}: option max_rows={options['max_rows']!r} is not allowed; "
                                f"allowed: a whole number >= 1")
        return cls(options.get("subset") or None, options.get("revision") or None, streaming in _TRUE, max_rows)

    def given(self) -> list[str]:
        """The options set away from their defaults, as ``key=value`` (for error messages)."""
        return [f"{k}={v}" for k, v in vars(self).items() if v not in (None, False)]


def is_saved_dataset(location: str | Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` (``state.json``) or ``DatasetDict.save_to_disk``
    (``dataset_dict.json``)."""
    p = Path(location).expanduser()
    return p.is_dir() and ((p / "state.json").is_file() or (p / "dataset_dict.json").is_file())


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a local .jsonl, .json (a list of objects, or ``{"data": [...]}``), .parquet, .csv or
    .arrow (a ``datasets`` arrow file) file.

    Raises:
        DataError: missing, empty, unreadable or unparsable file (with the line number), not UTF-8
            text (with the byte offset), unknown extension; every message names the file.
    """
    try:
        return _read_rows(path)
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}); "
                        f"convert it, e.g. iconv -f latin1 -t utf-8") from None
    except csv.Error as e:
        raise DataError(f"data file {str(path)!r}: not a readable CSV file: {e}") from None
    except OSError as e:
        raise DataError(f"data file {str(path)!r} cannot be read: {e.strerror or e}") from None


def _read_rows(path: str | Path) -> list[dict]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(p, path)
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8") or "[]")
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
        rows = data
    elif suffix == ".csv":
        with p.open(encoding="utf-8", newline="") as f:
            rows = [dict(r) for r in csv.DictReader(f)]
    elif suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        try:
            rows = pq.read_table(p).to_pylist()
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"data file {str(path)!r} is not a readable parquet file: {e}") from None
    elif suffix == ".arrow":
        rows = _read_arrow(p, path)
    else:
        raise DataError(f"data file {str(path)!r}: unknown extension {p.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    if not rows:
        raise DataError(f"data file {str(path)!r} is empty (no rows)")
    return rows


def _read_jsonl(p: Path, path: str | Path) -> list[dict]:
    rows = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON: {e.msg}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {n} is a JSON {type(row).__name__}, expected an object")
            rows.append(row)
    return rows


def _read_arrow(p: Path, path: str | Path) -> list[dict]:
    """An arrow file as ``datasets`` writes it (IPC stream), or an IPC file (``pyarrow.feather``)."""
    import pyarrow as pa

    for opener in (pa.ipc.open_stream, pa.ipc.open_file):
        try:
            with p.open("rb") as f:
                return opener(f).read_all().to_pylist()
        except pa.ArrowInvalid:
            continue
    raise DataError(f"data file {str(path)!r} is not an Arrow IPC stream or file")


def read_saved_rows(location: str, split: str, *, whole: bool) -> tuple[str, list[dict]] | None:
    """Rows of a ``save_to_disk`` directory: split ``split`` of a ``DatasetDict``; a single
    ``Dataset`` when ``whole`` (it is the train part). ``None`` if there is no such split."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(Path(location).expanduser()))
    except Exception as e:
        raise DataError(f"cannot load {location!r} with datasets.load_from_disk ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            return None
        ds, where = ds[split], f"{location}[{split}]"
    elif whole:
        where = location
    else:
        return None
    return where, [dict(r) for r in ds]


def read_hub_rows(dataset: str, split: str, hub: HubOptions = HubOptions()) -> tuple[str, list[dict]] | None:
    """Rows of split ``split`` of a dataset loaded with ``datasets.load_dataset`` (a hub id, or a local
    directory of data files or with a loading script). ``None`` if the dataset has no such split.

    Raises:
        DataError: the dataset cannot be loaded (the message names it and the options given).
    """
    import datasets

    opts = (" with " + ", ".join(hub.given())) if hub.given() else ""
    try:
        ds = datasets.load_dataset(dataset, name=hub.subset, revision=hub.revision, split=split,
                                   streaming=hub.streaming)
        rows = [dict(r) for r in itertools.islice(ds, hub.max_rows)]
    except ValueError as e:
        if "split" in str(e).lower():  # the dataset has no such split
            return None
        raise DataError(f"cannot load split {split!r} of dataset {dataset!r}{opts}: {e}") from None
    except Exception as e:
        raise DataError(f"cannot load dataset {dataset!r}{opts} with `datasets.load_dataset` ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); for a local file give its path (ending in "
                        f"{', '.join(FILE_SUFFIXES)})") from None
    where = f"{dataset}[{split}]" + (f" (first {hub.max_rows} rows: max_rows)" if hub.max_rows else "")
    return where, rows
