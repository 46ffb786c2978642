"""Test helpers that ship with rlhf-data: rows in public formats, written to local files.

Every adapter is tested offline on files in its real schema; these helpers write such files.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from .demo import question


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` as .jsonl, .json (a list), .csv or .parquet, by the file's extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(f"write_rows: unknown extension {path.suffix!r}")
    return path


def addition_hh_rows(n: int, seed: int = 0, multi_turn_every: int = 5) -> list[dict]:
    """``n`` rows in Anthropic HH-RLHF's schema about two-digit addition (right answer chosen).

    Every ``multi_turn_every``-th row has an earlier exchange, as many HH transcripts do.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-10, -1, 1, 10])
        head = ""
        if multi_turn_every and i % multi_turn_every == 0:
            c, d = rng.randint(10, 99), rng.randint(10, 99)
            head = f"\n\nHuman: {question(c, d)}\n\nAssistant: {c + d}"
        prompt = f"{head}\n\nHuman: {question(a, b)}\n\nAssistant:"
        rows.append({"chosen": f"{prompt} {a + b}", "rejected": f"{prompt} {wrong}"})
    return rows
