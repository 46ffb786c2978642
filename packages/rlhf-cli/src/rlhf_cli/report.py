"""Progress bars, metrics JSONL, the metrics sinks and the final summary table (rank 0 only)."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class Reporter:
    """Shows live progress on rank 0, appends every metrics row to ``<out>/<stage>/metrics.jsonl`` (flushed
    per row, so the file can be read while the stage runs) and sends its numbers to :attr:`sinks`
    (rlhf_cli.sinks: TensorBoard, wandb, mlflow, trackio; set by the pipeline from ``report.to``)."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.sinks: list = []  # rlhf_cli.sinks.MetricsSink
        self._progress: Progress | None = None
        self._task = None
        self._jsonl: TextIO | None = None
        self._done = 0
        self._total = 0
        self._name = ""
        self._next_line = 0

    def print(self, *args, **kw) -> None:
        if self.enabled:
            self.console.print(*args, **kw)

    @contextmanager
    def stage(self, name: str, total: int, jsonl: Path | None):
        """A progress bar for one stage; ``update`` advances it with live metrics and logs its rows to
        ``jsonl`` (started empty) and the sinks (one run each for this stage)."""
        if not self.enabled:
            yield self
            return
        if jsonl is not None:
            jsonl.parent.mkdir(parents=True, exist_ok=True)
            self._jsonl = jsonl.open("w")
        try:
            for sink in self.sinks:
                sink.start(name)
            with self._bar(name, total):
                yield self
        finally:
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None
            for sink in self.sinks:
                sink.finish()

    @contextmanager
    def _bar(self, name: str, total: int):
        self._name, self._total, self._done = name, total, 0
        self._next_line = max(1, total // 10)
        if not self.console.is_terminal:
            # Logs (CI, nohup, pipes): a plain line every 10% instead of a live bar.
            yield self
            self.console.print(f"{name}: done ({total}/{total})")
            return
        self._progress = Progress(
            TextColumn(f"[bold cyan]{name:>4}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            transient=False,
        )
        with self._progress:
            self._task = self._progress.add_task(name, total=total, metrics="")
            yield self
        self._progress = None

    def restore_rows(self, text: str) -> None:
        """Write rows an earlier, interrupted run of this stage logged (``rlhf_cli.resume``) into the open
        metrics.jsonl, as they were; the sinks get only the rows from now on."""
        if self._jsonl is not None and text:
            self._jsonl.write(text)
            self._jsonl.flush()

    def update(self, advance: int = 1, show: dict | None = None, log: dict | None = None) -> None:
        """Advance the bar, show ``show`` next to it, append ``log`` to metrics.jsonl and send it to the sinks."""
        if not self.enabled:
            return
        if log is not None:
            self._log_row(log)
        text = "  ".join(f"{k}={_fmt(v)}" for k, v in (show or {}).items())
        if self._progress is not None:
            self._progress.update(self._task, advance=advance, metrics=text)
        elif advance:
            self._done += advance
            if self._done >= self._next_line and self._done < self._total:
                self._next_line += max(1, self._total // 10)
                self.console.print(f"{self._name}: {self._done}/{self._total}  {text}")

    def log(self, row: dict) -> None:
        self.update(advance=0, log=row)

    def _log_row(self, row: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")
            self._jsonl.flush()  # a whole row at a time: `rlhf report` reads the file while the stage runs
        if self.sinks:
            from .sinks import scalars

            values = scalars(row)
            step = int(row.get("step", row.get("iteration", 0)))
            for sink in self.sinks:
                sink.log(values, step)

    def summary_table(self, rows: list[tuple[str, str, str, str, str]]) -> None:
        if not self.enabled:
            return
        table = Table(title="rlhf run summary")
        for col in ("stage", "metric", "before", "after", "wall time"):
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        self.console.print(table)
