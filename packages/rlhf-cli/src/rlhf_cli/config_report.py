"""The ``report`` section of the run configuration: where metrics go besides ``metrics.jsonl``, and the plots.

A section like those of rlhf_cli/config_sections.py (same base class, same ``option(help=)``), kept in a
module of its own so that loading a config never imports a tracking library: the sinks themselves are in
rlhf_cli/sinks.py, imported only when a run starts.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from .config_sections import ConfigError, Section, option

__all__ = ["SINK_PACKAGES", "MissingExtraError", "ReportSection"]

# sink name -> (module it needs, the rlhf-cli extra that installs it)
SINK_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


class MissingExtraError(ConfigError, ImportError):
    """A setting needs an optional package that is not installed; the message gives the install command.

    An ImportError (the convention for a missing optional dependency) and a :class:`ConfigError` (the value
    cannot be honoured on this installation), which the CLI reports in one line.
    """


@dataclass(frozen=True)
class ReportSection(Section):
    """Reporting: experiment trackers, plots and report.md (metrics.jsonl is always written)."""

    section: ClassVar[str] = "report"

    to: str = option("", "comma-separated metrics sinks besides <out>/<stage>/metrics.jsonl: tensorboard "
                         "(<out>/tensorboard/<stage>), wandb, mlflow, trackio; \"\" or \"none\" = none. Each is an "
                         "optional extra, e.g. pip install 'rlhf-cli[tensorboard]'; a missing one stops the run "
                         "before training.")
    project: str = option("rlhf", "wandb/trackio project and mlflow experiment; each stage is one run in it, named "
                                  "<out dir name>-<stage>.")
    plots: bool = option(True, "after each stage and the run: PNG curves in <out>/plots/ and <out>/report.md (the "
                               "curves need matplotlib: pip install 'rlhf-cli[plots]'; without it report.md has the "
                               "tables only).")

    def __post_init__(self) -> None:
        for name in self.sinks():
            if name not in SINK_PACKAGES:
                self._fail("to", f"{name!r} is not allowed; allowed: a comma-separated list of "
                                 f"{', '.join(map(repr, SINK_PACKAGES))} (or '' / 'none')")
        if not self.project.strip():
            self._fail("project", f"{self.project!r} is not allowed; allowed: a non-empty name")

    def sinks(self) -> tuple[str, ...]:
        """The sink names of ``to``, in order, without repeats."""
        if self.to.strip().lower() == "none":
            return ()
        return tuple(dict.fromkeys(s.strip() for s in self.to.split(",") if s.strip()))

    def check_installed(self) -> None:
        """Raise :class:`MissingExtraError` with the install command for the first sink whose package is absent."""
        for name in self.sinks():
            module, extra = SINK_PACKAGES[name]
            if importlib.util.find_spec(module) is None:
                raise MissingExtraError(f"report.to: {name!r} needs the {module} package, which is not installed; "
                                        f"install it with: pip install 'rlhf-cli[{extra}]'")
