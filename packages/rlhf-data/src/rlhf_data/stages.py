"""Stage splits, blending, and the per-stage datasets the pipeline trains on.

Data flow for each source of a spec::

    raw rows --adapter--> records --eval holdout--> train part / eval part
    train part --stage split "2,4,4" (by prompt)--> SFT / RM / RL parts
    each part --convert--> what the stage consumes (SFT: prompt+response, RM: pairs, RL: prompts)

and then, per stage, the sources are blended by weight. A prompt never crosses parts: rows that
share a prompt (several pairs per SHP post, say) go to the same part, so nothing leaks between the
stages or between train and eval.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .records import (
    ChatRecord,
    PreferenceRecord,
    PromptRecord,
    Record,
    SFTRecord,
    prompt_messages,
    simplify_prompt,
    split_conversation,
)
from .sources import (
    LOAD_OPTIONS,
    DataError,
    SourceAdapter,
    SourceSpec,
    detect_source,
    get_source,
    is_local,
    iter_records,
    parse_data_spec,
)
from .stage_data import SourceReport, StageData, StagedParts

STAGE_NAMES = ("sft", "rm", "rl")


# ----------------------------------------------------------------------------------------------
# stage split
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageSplit:
    """Relative sizes of the SFT / reward-model / RL parts of every source (DeepSpeed-Chat's
    ``--data_split 2,4,4``). Zero is allowed (the source gives that stage nothing), all zero is not."""

    sft: float = 2.0
    rm: float = 4.0
    rl: float = 4.0

    def __post_init__(self) -> None:
        parts = (self.sft, self.rm, self.rl)
        if any(not math.isfinite(w) or w < 0 for w in parts) or sum(parts) <= 0:
            raise DataError(f"data.split: {','.join(f'{w:g}' for w in parts)} is not allowed; need three "
                            f"non-negative numbers for sft,rm,rl, not all zero, e.g. '2,4,4'")

    @classmethod
    def parse(cls, text: str | Sequence[float]) -> StageSplit:
        """``"2,4,4"`` (or a 3-sequence) -> StageSplit.

        Raises:
            DataError: not three comma-separated non-negative numbers, or all zero.
        """
        items = text.split(",") if isinstance(text, str) else list(text)
        if len(items) != 3:
            raise DataError(f"data.split: {text!r} must have three comma-separated parts (sft,rm,rl), e.g. '2,4,4'")
        values = []
        for name, item in zip(STAGE_NAMES, items, strict=True):
            try:
                values.append(float(item))
            except (TypeError, ValueError):
                raise DataError(f"data.split: {text!r}: the {name} part {str(item).strip()!r} is not a number; "
                                f"allowed: three non-negative numbers, e.g. '2,4,4'") from None
        return cls(*values)

    def fractions(self) -> tuple[float, float, float]:
        total = self.sft + self.rm + self.rl
        return self.sft / total, self.rm / total, self.rl / total

    def __str__(self) -> str:
        return f"{self.sft:g},{self.rm:g},{self.rl:g}"


def _seed_for(seed: int, *keys: str) -> int:
    h = hashlib.sha256(json.dumps([seed, *keys]).encode()).digest()
    return int.from_bytes(h[:8], "little")


def cut(n: int, fractions: Sequence[float]) -> list[int]:
    """Sizes summing to ``n``, proportional to ``fractions`` (largest remainder; a zero fraction gets 0)."""
    raw = [n * f for f in fractions]
    sizes = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (raw[i] - sizes[i], fractions[i]), reverse=True)
    for i in order[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def prompt_key(record: Record) -> str:
    """Records with the same key share a prompt and must stay in the same part (a language-modelling
    text, which has no prompt, is its own group)."""
    if isinstance(record, SFTRecord) and record.prompt == "":
        return json.dumps(["text", record.response])
    if isinstance(record, ChatRecord):
        msgs = record.messages
        prompt = msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs
    else:
        prompt = record.prompt
    return json.dumps([[m["role"], m["content"].strip()] for m in prompt_messages(prompt)])


def split_groups(records: Sequence[Record], fractions: Sequence[float], seed: int, key: str = "") -> list[list[Record]]:
    """Deterministic disjoint parts of ``records`` with sizes (in prompts) proportional to ``fractions``.

    Records sharing a prompt stay together. The assignment depends only on the records (their
    order included), ``fractions``, ``seed`` and ``key``, so loading the same source again gives the
    same parts.
    """
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(prompt_key(r), []).append(r)
    keys = list(groups)
    random.Random(_seed_for(seed, "split", key)).shuffle(keys)
    parts, start = [], 0
    for size in cut(len(keys), fractions):
        parts.append([r for k in keys[start : start + size] for r in groups[k]])
        start += size
    return parts


# ----------------------------------------------------------------------------------------------
# what each stage consumes
# ----------------------------------------------------------------------------------------------
def to_sft(r: Record) -> SFTRecord | None:
    """SFT demonstration of a record (a pair's chosen answer, a chat's last assistant turn); an unpaired
    completion labelled undesirable (``meta["label"] is False``) is none."""
    if isinstance(r, SFTRecord):
        return None if r.meta.get("label") is False else r
    if isinstance(r, PreferenceRecord):
        return SFTRecord(r.prompt, r.chosen, r.meta)
    if isinstance(r, ChatRecord):
        try:
            prompt, answer = split_conversation(r.messages)
        except ValueError:
            return None
        return SFTRecord(prompt, answer, r.meta)
    return None


def to_pair(r: Record) -> PreferenceRecord | None:
    return r if isinstance(r, PreferenceRecord) else None


def to_prompt(r: Record) -> PromptRecord | None:
    if isinstance(r, PromptRecord):
        return r
    if isinstance(r, ChatRecord):
        msgs = r.messages
        prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        return PromptRecord(simplify_prompt(prompt), r.meta) if any(m["role"] == "user" for m in prompt) else None
    return PromptRecord(r.prompt, r.meta) if r.prompt != "" else None  # "": language-modelling text


def unusable_reason(r: Record, stage: str) -> str:
    """Why ``stage`` cannot use ``r`` (its converter gave None): the reason counted in the report."""
    if isinstance(r, SFTRecord) and r.prompt == "":
        what = "language-modelling text (no prompt)"
    elif isinstance(r, SFTRecord) and "label" in r.meta:
        what = f"unpaired completion with label={str(r.meta['label']).lower()}"
    else:
        what = {SFTRecord: "prompt-response record", PromptRecord: "prompt-only record (no response)",
                ChatRecord: "conversation", PreferenceRecord: "preference pair"}[type(r)]
    if stage == "rm":
        return f"{what}: not a chosen/rejected pair"
    if isinstance(r, ChatRecord):
        return f"{what}: no user turn" + (" before a final assistant answer" if stage == "sft" else "")
    return what


CONVERTERS: dict[str, Callable[[Record], Record | None]] = {"sft": to_sft, "rm": to_pair, "rl": to_prompt}


def _convert_all(records: Sequence[Record], stage: str, unusable: Counter | None = None) -> list[Record]:
    """``records`` converted for ``stage``; those it cannot use are counted by reason in ``unusable``."""
    conv, out = CONVERTERS[stage], []
    for r in records:
        x = conv(r)
        if x is not None:
            out.append(x)
        elif unusable is not None:
            unusable[unusable_reason(r, stage)] += 1
    return out


# ----------------------------------------------------------------------------------------------
# blending
# ----------------------------------------------------------------------------------------------
def blend(parts: dict[str, list], weights: dict[str, float], seed: int, size: int | None = None,
          key: str = "") -> tuple[list, dict[str, int]]:
    """Mix ``parts`` so that each source contributes a ``weights``-proportional share of the samples.

    Args:
        parts: source label -> its samples (empty sources are left out and the weights of the
            others renormalised).
        weights: source label -> relative weight (> 0).
        seed: the selection and the order depend only on it (and ``key``).
        size: total samples. ``None``: the largest mix that repeats nothing (the source that is
            scarcest relative to its weight is used whole). A larger ``size`` repeats samples.

    Returns:
        ``(samples, counts)``: the shuffled mix (a single source keeps its order) and the number
        of samples taken from each source.
    """
    live = {k: v for k, v in parts.items() if v}
    if not live:
        return [], {k: 0 for k in parts}
    total_w = sum(weights[k] for k in live)
    p = {k: weights[k] / total_w for k in live}
    if size is None:
        size = min(math.floor(len(v) / p[k] + 1e-9) for k, v in live.items())
    counts = dict(zip(live, cut(size, [p[k] for k in live]), strict=True))
    out: list = []
    for k, v in live.items():
        n = counts[k]
        if len(live) == 1 and n == len(v):
            out = list(v)
            break
        rng = random.Random(_seed_for(seed, "blend", key, k))
        taken: list = []
        while len(taken) < n:  # without replacement first, then repeat in a fresh order
            order = list(range(len(v)))
            rng.shuffle(order)
            taken += [v[i] for i in order[: n - len(taken)]]
        out += taken
    if len(live) > 1:
        random.Random(_seed_for(seed, "blend-order", key)).shuffle(out)
    return out, {k: counts.get(k, 0) for k in parts}


# ----------------------------------------------------------------------------------------------
# loading a spec into per-stage datasets
# ----------------------------------------------------------------------------------------------
def load_records(spec: SourceSpec, *, label: str | None = None, options: dict | None = None
                 ) -> tuple[list[Record], list[Record] | None, SourceReport]:
    """The records of one source: ``(train records, eval records or None, report)``.

    ``None`` for eval means the source has no eval split of its own (it is held out from train).
    ``label`` (default ``spec.label``) names the source in ``meta["source"]`` and the report.

    Raises:
        DataError: a bad location, option, split or row, or no usable rows (named).
    """
    label = label or spec.label
    adapter, reader, rows_train = _open_source(spec, options)
    location = spec.location or adapter.hub_id or ""
    report = SourceReport(label, adapter.name, weight=spec.weight)
    if rows_train is None:
        rows_train = reader.read(location, reader.read_split)
        if rows_train is None:
            raise DataError(f"dataset {location!r} has no split {reader.read_split!r}; choose one with "
                            f"'{spec.name or location}[split=NAME]' (data.sources)")
    rows_eval = None
    if reader.read_eval_split and not is_local(location):
        rows_eval = reader.read(location, reader.read_eval_split)
    report.columns = list(rows_train[1][0]) if rows_train[1] else []

    def convert(where_rows) -> list[Record]:
        where, rows = where_rows
        report.where.append(where)
        report.rows += len(rows)
        out = []
        for n, rec in iter_records(adapter, rows, where, report.dropped):
            out.append(type(rec)(**{**rec.__dict__, "meta": {**rec.meta, "source": label, "row": n}}))
        return out

    train = convert(rows_train)
    evals = convert(rows_eval) if rows_eval is not None else None
    report.records = len(train) + len(evals or [])
    if not train:
        reasons = ", ".join(f"{k}: {v}" for k, v in report.dropped.items())
        raise DataError(f"{report.where[0]}: no usable rows (all {report.rows} dropped: {reasons})")
    return train, evals, report


class _BareReader(SourceAdapter):
    """Reads a bare location before its format is known (splits "train"/"test" unless the spec says)."""

    def __init__(self, location: str, options: dict[str, str]) -> None:
        self.name = location  # type: ignore[misc]  # option errors name the location: there is no format yet
        super().__init__(options)


def _open_source(spec: SourceSpec, options: dict | None) -> tuple[SourceAdapter, SourceAdapter, tuple | None]:
    """``(adapter, reader, train rows or None)`` of a spec entry. A named source reads its own rows;
    a bare file, directory or hub id is read by a plain :class:`SourceAdapter` (splits "train" and
    "test", or the spec's ``split``/``eval_split``) and its format detected from the first row."""
    if spec.name:
        adapter = get_source(spec.name)({**(options or {}), **spec.options})
        location = spec.location or adapter.hub_id
        if not location:
            raise DataError(f"source {adapter.name!r} has no default dataset; give a file or dataset: "
                            f"'{adapter.name}:./data.jsonl'")
        adapter.check_location(location)
        return adapter, adapter, None
    reader = _BareReader(spec.location, {k: v for k, v in spec.options.items() if k in LOAD_OPTIONS})
    reader.check_location(spec.location)
    rows_train = reader.read(spec.location, reader.read_split)
    if rows_train is None:
        raise DataError(f"dataset {spec.location!r} has no split {reader.read_split!r}; choose one with "
                        f"'{spec.location}[split=NAME]' (data.sources)")
    cls = detect_source(rows_train[1], spec.location)
    return cls({**(options or {}), **spec.options}), reader, rows_train


DEFAULT_SPLIT = "2,4,4"  # DeepSpeed-Chat's default data_split


def build_stage_data(spec: str | list, *, split: str | StageSplit | None = None, seed: int = 1234,
                     eval_fraction: float = 0.1, max_eval: int = 500, sizes: dict[str, int] | None = None,
                     source_options: dict[str, dict] | None = None) -> StageData:
    """Load every source of ``spec``, split each into SFT / RM / RL / eval parts, blend by weight.

    Args:
        spec: a data spec (see :mod:`rlhf_data.sources`) or its list form.
        split: relative sizes of each source's SFT / RM / RL parts (``"2,4,4"``); ``None``: each
            source's default (2,4,4 for loaded data; the demo task's own 4,3,3).
        seed: every random choice (holdout, split, blend) derives from it and the source's label.
        eval_fraction: share of prompts held out for evaluation from sources without an eval split
            of their own.
        max_eval: cap on each held-out set per source.
        sizes: optional total samples per stage (``{"sft": 10000}``); default: the largest mix that
            repeats nothing.
        source_options: default adapter options by source name (the spec's brackets override them).

    Raises:
        DataError: a bad spec, split, file or row (named).
    """
    given = _checked_split(split, eval_fraction, max_eval)  # None: each source's default
    stage_split = given or StageSplit.parse(DEFAULT_SPLIT)
    specs = parse_data_spec(spec)
    data = StageData()
    per_stage: dict[str, dict[str, list]] = {s: {} for s in STAGE_NAMES}
    weights: dict[str, float] = {}
    verifiers = []
    for sp, label in zip(specs, _labels(specs), strict=True):
        opts = (source_options or {}).get(sp.name, {})
        cls = get_source(sp.name) if sp.name else None
        staged = None
        if cls is not None and hasattr(cls, "load_stages"):  # a source with its own stage logic (the demo)
            staged = cls({**opts, **({"stage_split": given} if given else {}), **sp.options}).load_stages(seed)
        if staged is not None:
            source = _from_staged(staged, cls.name, label, sp.weight)
        else:
            source = _from_records(sp, label, opts, stage_split, seed=seed, eval_fraction=eval_fraction,
                                   max_eval=max_eval)
        report, parts, evals = source.report, source.parts, source.evals
        data.corpus += source.corpus
        verifiers.append(source.verifier)
        if report.label in weights:
            raise DataError(f"data spec: source {report.label!r} is listed twice")
        weights[report.label] = sp.weight
        for s in STAGE_NAMES:
            per_stage[s][report.label] = parts[s]
        report.usable = {s: len(parts[s]) for s in STAGE_NAMES}
        for k, v in evals.items():
            getattr(data, k).extend(v)
        data.reports.append(report)
    for s in STAGE_NAMES:
        mixed, counts = blend(per_stage[s], weights, seed, (sizes or {}).get(s), key=s)
        setattr(data, s, mixed)
        for r in data.reports:
            r.used[s] = counts[r.label]
    if verifiers and all(v is not None for v in verifiers) and len({id(v) for v in verifiers}) == 1:
        data.verifier = verifiers[0]
    return data


@dataclass
class _SourceParts:
    """One source's share of :func:`build_stage_data`: its report, its records per stage and per
    held-out set, its tokenizer-corpus lines and its verifier (None for loaded data)."""

    report: SourceReport
    parts: dict[str, list]  # stage -> records
    evals: dict[str, list]  # sft_eval / rm_eval / rl_valid / rl_eval -> records
    corpus: list[str]
    verifier: Callable[[str, dict], float] | None


def _checked_split(split: str | StageSplit | None, eval_fraction: float, max_eval: int) -> StageSplit | None:
    """``split`` parsed (None for None or ""), after checking the eval options; raises ``DataError``."""
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"data.eval_fraction: {eval_fraction!r} must be in [0, 1)")
    if max_eval < 0:
        raise DataError(f"data.max_eval: {max_eval!r} must be >= 0")
    return None if split is None or split == "" else split if isinstance(split, StageSplit) else StageSplit.parse(split)


def _labels(specs: list[SourceSpec]) -> list[str]:
    """Each source's label; two files with the same name in different folders are labelled by their paths."""
    short = [sp.label for sp in specs]
    return [label if short.count(label) == 1 else (f"{sp.name}:{sp.location}" if sp.name else sp.location)
            for sp, label in zip(specs, short, strict=True)]


def _from_staged(staged: StagedParts, fmt: str, label: str, weight: float) -> _SourceParts:
    """The parts of a source with its own stage logic (the demo), tagged with ``label``."""
    report = SourceReport(label, fmt, where=["generated"], weight=weight)
    parts = {s: _tag(getattr(staged, s), label) for s in STAGE_NAMES}
    evals = {k: _tag(getattr(staged, k), label) for k in ("sft_eval", "rm_eval", "rl_valid", "rl_eval")}
    report.parts = {s: len(v) for s, v in parts.items()} | {"eval": len(staged.rl_eval)}
    return _SourceParts(report, parts, evals, list(staged.corpus), staged.verifier)


def _from_records(sp: SourceSpec, label: str, opts: dict, stage_split: StageSplit, *, seed: int,
                  eval_fraction: float, max_eval: int) -> _SourceParts:
    """Load a source's records, hold out its eval set (its own eval split, else ``eval_fraction`` of
    its prompt groups, at most ``max_eval``) and split the rest into the stages' parts."""
    train, own_eval, report = load_records(sp, label=label, options=opts)
    fr = stage_split.fractions()
    if own_eval is None:
        held, *rest = split_groups(train, [eval_fraction, *(f * (1 - eval_fraction) for f in fr)], seed,
                                   report.label)
    else:
        held, rest = own_eval, split_groups(train, fr, seed, report.label)
    held = held[:]
    random.Random(_seed_for(seed, "eval", report.label)).shuffle(held)
    held = held[:max_eval] if max_eval else []
    un = report.unusable = {k: Counter() for k in (*STAGE_NAMES, "sft_eval", "rm_eval", "rl_valid", "rl_eval")}
    parts = {s: _convert_all(p, s, un[s]) for s, p in zip(STAGE_NAMES, rest, strict=True)}
    report.parts = {s: len(p) for s, p in zip(STAGE_NAMES, rest, strict=True)} | {"eval": len(held)}
    valid_half, eval_half = split_groups(held, [0.5, 0.5], seed, report.label + "/eval")
    evals = {"sft_eval": _convert_all(held, "sft", un["sft_eval"]), "rm_eval": _convert_all(held, "rm", un["rm_eval"]),
             "rl_valid": _convert_all(valid_half, "rl", un["rl_valid"]),
             "rl_eval": _convert_all(eval_half, "rl", un["rl_eval"])}
    corpus = [_corpus_line(r) for r in parts["sft"] + parts["rm"]]
    return _SourceParts(report, parts, evals, corpus, None)


def _tag(records: list, label: str) -> list:
    """Records with ``meta["source"] = label`` (reports group samples by it)."""
    return [type(r)(**{**r.__dict__, "meta": {**r.meta, "source": label}}) for r in records]


def _corpus_line(r: Record) -> str:
    """A record as plain "Human:/Assistant:" text, for training an in-process tokenizer."""
    from .tokenization import render_plain

    if isinstance(r, ChatRecord):
        return render_plain(r.messages)
    if isinstance(r, SFTRecord) and r.prompt == "":  # language-modelling text
        return r.response
    s = to_sft(r)
    if s is None:
        return render_plain(prompt_messages(r.prompt))
    return render_plain(prompt_messages(s.prompt)) + " " + s.response
