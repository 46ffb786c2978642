"""Metrics sinks: where the reporter sends each metrics row besides ``<out>/<stage>/metrics.jsonl``.

One small interface (:class:`MetricsSink`) and a built-in sink per experiment tracker, each behind an
optional extra of rlhf-cli (``pip install 'rlhf-cli[tensorboard]'``, ``[wandb]``, ``[mlflow]``,
``[trackio]``), chosen with ``report.to=tensorboard,wandb``. Each stage is one run of the tracker (its
own step axis: SFT/RM optimizer steps, RL iterations). Sinks only read the numbers they are given: no
RNG, no tensor math, so a run's training numbers are the same with and without them.

Where they write: TensorBoard ``<out>/tensorboard/<stage>``; wandb ``<out>/wandb`` (online, or offline
with ``WANDB_MODE=offline``); mlflow ``$MLFLOW_TRACKING_URI``, else the SQLite file ``<out>/mlflow.db``
(``mlflow ui --backend-store-uri sqlite:///<out>/mlflow.db``);
trackio its local database (``$TRACKIO_DIR``, else trackio's default).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Protocol

__all__ = ["SINKS", "MLflowSink", "MetricsSink", "TensorBoardSink", "TrackioSink", "WandbSink", "make_sinks",
           "scalars"]

# row keys that are the row's coordinates, not metrics
_NOT_METRICS = frozenset({"step", "iteration", "time"})


def scalars(row: dict) -> dict[str, float]:
    """The numeric entries of a metrics row (bools, strings, lists, None and the step keys left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _NOT_METRICS}


class MetricsSink(Protocol):
    """Receives the metrics rows of each stage (rank 0 only)."""

    def start(self, stage: str) -> None:
        """A stage begins: open its run / writer."""

    def log(self, values: dict[str, float], step: int) -> None:
        """One row's numeric metrics at the stage's ``step``."""

    def finish(self) -> None:
        """The stage ended (or failed): flush and close its run."""


class TensorBoardSink:
    """Event files under ``<out>/tensorboard/<stage>`` (``tensorboard --logdir <out>/tensorboard``)."""

    def __init__(self, out: Path, **_) -> None:
        self.root = Path(out) / "tensorboard"
        self._writer = None

    def start(self, stage: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(self.root / stage))

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self._writer.add_scalar(k, v, global_step=step)
        self._writer.flush()  # readable while the stage runs

    def finish(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class WandbSink:
    """One Weights & Biases run per stage, grouped by the output directory's name."""

    def __init__(self, out: Path, project: str, config: dict, **_) -> None:
        self.out, self.project, self.config = Path(out), project, config
        self._run = None

    def start(self, stage: str) -> None:
        import wandb

        self.out.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=self.project, name=f"{self.out.resolve().name}-{stage}", group=self.out.name,
                               job_type=stage, dir=str(self.out), config=self.config, reinit="finish_previous")

    def log(self, values: dict[str, float], step: int) -> None:
        self._run.log(values, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MLflowSink:
    """One MLflow run per stage in the experiment ``report.project``; the settings logged as its params."""

    def __init__(self, out: Path, project: str, config: dict, **_) -> None:
        self.out, self.project, self.config = Path(out), project, config
        # MLflow 3 refuses a new file store (./mlruns) by default; a SQLite file is its local default
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.out.resolve() / 'mlflow.db'}"
        self._client = self._run_id = None

    def start(self, stage: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.out.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri=self.uri)
        exp = self._client.get_experiment_by_name(self.project)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(self.project)
        self._run_id = self._client.create_run(exp_id, run_name=f"{self.out.resolve().name}-{stage}").info.run_id
        params = [Param(k, str(v)[:500]) for k, v in self.config.items()]
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self._client.log_batch(self._run_id, params=params[i : i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items() if math.isfinite(v)]
        self._client.log_batch(self._run_id, metrics=metrics)

    def finish(self) -> None:
        if self._run_id is not None:
            self._client.set_terminated(self._run_id)
            self._run_id = None


class TrackioSink:
    """One trackio run per stage in the project ``report.project`` (local; ``trackio show`` opens it)."""

    def __init__(self, out: Path, project: str, config: dict, **_) -> None:
        self.out, self.project, self.config = Path(out), project, config
        self._run = None

    def start(self, stage: str) -> None:
        import trackio

        self._run = trackio.init(project=self.project, name=f"{self.out.resolve().name}-{stage}", config=self.config)

    def log(self, values: dict[str, float], step: int) -> None:
        import trackio

        trackio.log(values, step=step)

    def finish(self) -> None:
        if self._run is not None:
            import trackio

            trackio.finish()
            self._run = None


SINKS: dict[str, type] = {"tensorboard": TensorBoardSink, "wandb": WandbSink, "mlflow": MLflowSink,
                          "trackio": TrackioSink}


def make_sinks(names: tuple[str, ...], out: Path, project: str, config: dict) -> list[MetricsSink]:
    """The sinks called ``names`` (``report.to``; checked and installed: ``ReportSection.check_installed``)."""
    return [SINKS[n](out=out, project=project, config=config) for n in names]
