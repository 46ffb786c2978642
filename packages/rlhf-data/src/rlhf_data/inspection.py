"""What a data spec gives each stage: counts, token-length histograms, truncation, examples.

The numbers behind ``rlhf data inspect`` (the CLI only draws them).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .stages import StageData
from .tokenization import TokenizeConfig, TokenizeStats, render_prompt, render_response, tokenize_records

# the training sets and held-out sets of a StageData, with the stage whose format they use
SETS = (("sft", "sft"), ("rm", "rm"), ("rl", "rl"), ("sft_eval", "sft"), ("rm_eval", "rm"), ("rl_valid", "rl"),
        ("rl_eval", "rl"))


@dataclass
class Inspection:
    """One source's samples in one set (``sft``, ``rm``, ``rl``, ``sft_eval``, ...)."""

    source: str
    set: str
    stats: TokenizeStats
    examples: list[str] = field(default_factory=list)

    @property
    def prompt_summary(self) -> dict[str, float]:
        return summarize(self.stats.prompt_lens)

    @property
    def response_summary(self) -> dict[str, float]:
        return summarize(self.stats.response_lens)


def summarize(lengths: list[int]) -> dict[str, float]:
    """min / median / p95 / max of token lengths (zeros when empty)."""
    if not lengths:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    s = sorted(lengths)
    return {"min": s[0], "median": statistics.median(s), "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
            "max": s[-1]}


def histogram(lengths: list[int], bins: int = 10) -> list[tuple[int, int, int]]:
    """``[(low, high, count)]``: equal-width bins over ``[min, max]`` (both ends inclusive)."""
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = [0] * (-(-(hi - lo + 1) // width))
    for n in lengths:
        counts[(n - lo) // width] += 1
    return [(lo + i * width, lo + (i + 1) * width - 1, c) for i, c in enumerate(counts)]


def render_example(tokenizer, record, kind: str) -> str:
    """A record as the model sees it (rendered prompt + response(s))."""
    prompt = render_prompt(tokenizer, record.prompt)
    if kind == "sft":
        return prompt + render_response(tokenizer, record.response, raw=record.prompt == "")
    if kind == "rm":
        return (f"{prompt}\n  [chosen]  {render_response(tokenizer, record.chosen).strip()}\n"
                f"  [rejected] {render_response(tokenizer, record.rejected).strip()}")
    return prompt


def inspect_stage_data(data: StageData, tokenizer, cfg: TokenizeConfig = TokenizeConfig(), *,
                       examples: int = 3) -> list[Inspection]:
    """Tokenize every set of ``data`` per source and collect lengths, limit counts and examples."""
    out = []
    labels = [r.label for r in data.reports]
    for set_name, kind in SETS:
        records = getattr(data, set_name)
        for label in labels:
            mine = [r for r in records if r.meta.get("source") == label]
            if not mine:
                continue
            stats = tokenize_records(tokenizer, mine, kind, cfg).stats
            shown = [render_example(tokenizer, r, kind) for r in mine[:examples]]
            out.append(Inspection(label, set_name, stats, shown))
    return out
