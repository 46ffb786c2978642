"""What loading a data spec gives: per-source reports and the per-stage datasets of a run."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import DataError
from .records import PreferenceRecord, PromptRecord, SFTRecord

# what each stage needs from a row, in the column names of the built-in formats (for error messages)
STAGE_NEEDS = {
    "sft": "a response: 'completion' (with 'prompt'), 'response', 'chosen' (pairs), 'text', or 'messages' ending "
           "with an assistant turn",
    "rm": "a pair: 'chosen' and 'rejected' (with 'prompt', or an implicit prompt they share)",
    "rl": "a prompt: 'prompt', or 'messages' / 'chosen' with a user turn",
}
SET_STAGE = {"sft": "sft", "rm": "rm", "rl": "rl", "sft_eval": "sft", "rm_eval": "rm", "rl_valid": "rl",
             "rl_eval": "rl"}


@dataclass
class SourceReport:
    """What one source contributed: rows read, drops by reason, records per part and per stage.

    ``dropped`` counts rows the adapter dropped (by reason); ``unusable`` counts, per set (``sft``,
    ``rm``, ``rl``, ``sft_eval``, ...), the records of that set's part the stage cannot use (a
    prompt-only record in the SFT part, say), by reason. ``columns`` are the first row's columns.
    """

    label: str
    format: str
    where: list[str] = field(default_factory=list)
    rows: int = 0
    dropped: Counter = field(default_factory=Counter)
    records: int = 0
    parts: dict[str, int] = field(default_factory=dict)  # sft/rm/rl/eval: records in the part
    usable: dict[str, int] = field(default_factory=dict)  # stage: records the stage can use
    used: dict[str, int] = field(default_factory=dict)  # stage: samples taken by the blend
    weight: float = 1.0
    columns: list[str] = field(default_factory=list)
    unusable: dict[str, Counter] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "format": self.format, "where": self.where, "rows": self.rows,
                "dropped": dict(self.dropped), "records": self.records, "parts": self.parts,
                "usable": self.usable, "used": self.used, "weight": self.weight, "columns": self.columns,
                "unusable": {k: dict(v) for k, v in self.unusable.items() if v}}


@dataclass
class StageData:
    """The datasets of one run.

    Attributes:
        sft / rm / rl: training samples of each stage (SFT records, preference pairs, prompts).
        sft_eval / rm_eval: held-out SFT records and pairs (never trained on).
        rl_valid / rl_eval: held-out prompts: ``rl_valid`` selects the RL checkpoint, ``rl_eval``
            reports the final score; disjoint.
        corpus: text for training an in-process tokenizer (tiny models without one).
        verifier: ``verify(response, meta) -> float`` when the data has a ground truth (the demo).
        reports: one :class:`SourceReport` per source.
    """

    sft: list[SFTRecord] = field(default_factory=list)
    rm: list[PreferenceRecord] = field(default_factory=list)
    rl: list[PromptRecord] = field(default_factory=list)
    sft_eval: list[SFTRecord] = field(default_factory=list)
    rm_eval: list[PreferenceRecord] = field(default_factory=list)
    rl_valid: list[PromptRecord] = field(default_factory=list)
    rl_eval: list[PromptRecord] = field(default_factory=list)
    corpus: list[str] = field(default_factory=list)
    verifier: Callable[[str, dict], float] | None = None
    reports: list[SourceReport] = field(default_factory=list)

    def report_dict(self) -> dict:
        return {"sources": [r.to_dict() for r in self.reports],
                "stages": {s: len(getattr(self, s)) for s in SET_STAGE}}

    def why_empty(self, set_name: str) -> str:
        """Why set ``set_name`` (``"sft"``, ``"rm_eval"``, ...) has no samples: per source, its format,
        columns, records in the part and why they were unusable, and what the stage needs."""
        stage = SET_STAGE[set_name]
        part = set_name if set_name in ("sft", "rm", "rl") else "eval"
        said = []
        for r in self.reports:
            cols = ", ".join(map(repr, r.columns)) or "-"
            why = "; ".join(f"{k}: {v}" for k, v in (r.unusable.get(set_name) or {}).items())
            n = r.parts.get(part, 0)
            said.append(f"source {r.label!r} (format {r.format!r}, columns {cols}) has {n} record{'s' * (n != 1)} "
                        f"in its {part} part" + (f", none usable ({why})" if why else ""))
        return "; ".join(said) + f"; the {stage} stage needs {STAGE_NEEDS[stage]}"

    def require(self, set_name: str) -> list:
        """The samples of ``set_name``.

        Raises:
            DataError: there are none; the message names every source, the columns it has and the
                fields the stage looks for.
        """
        if set_name not in SET_STAGE:
            raise ValueError(f"set_name: {set_name!r} is not allowed; allowed: {', '.join(SET_STAGE)}")
        samples = getattr(self, set_name)
        if not samples:
            raise DataError(f"no usable {set_name} samples: {self.why_empty(set_name)}")
        return samples


@dataclass
class StagedParts:
    """What a source adapter with its own stage logic (the demo) returns from ``load_stages``."""

    sft: list
    rm: list
    rl: list
    sft_eval: list
    rm_eval: list
    rl_valid: list
    rl_eval: list
    corpus: list[str] = field(default_factory=list)
    verifier: Callable[[str, dict], float] | None = None
