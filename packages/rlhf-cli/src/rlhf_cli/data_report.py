"""``rlhf data inspect``: load a data spec the way ``rlhf run`` does and draw what each stage gets."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .config import RunConfig

BARS = " ▁▂▃▄▅▆▇█"


def sparkline(hist: list[tuple[int, int, int]]) -> str:
    """A histogram as one line of block characters, with its range: ``"3-41 ▁▃█▅▂▁"``."""
    if not hist:
        return "-"
    top = max(c for _, _, c in hist)
    bars = "".join(BARS[0 if c == 0 else max(1, round(8 * c / top))] for _, _, c in hist)
    return f"{hist[0][0]}-{hist[-1][1]} {bars}"


def load_inspection_tokenizer(cfg: RunConfig, name: str | None, corpus: list[str]):
    """The tokenizer ``rlhf run`` would use: ``name``, else model.actor_model's, else one trained on the data."""
    from rlhf_data import train_demo_tokenizer

    name = name or cfg.model.actor_model
    if name:
        from rlhf_hybrid import load_tokenizer

        return load_tokenizer(name, **cfg.model.tokenizer_kwargs(user_model=name == cfg.model.actor_model))
    return train_demo_tokenizer(corpus, vocab_size=tiny_vocab_size(cfg))


def tiny_vocab_size(cfg: RunConfig) -> int:
    """Vocabulary of the in-process tokenizer for the tiny model (model.tokenizer_vocab_size; 0 = auto)."""
    return cfg.model.tokenizer_vocab_size or (320 if cfg.data.sources == "demo" else 2048)


def load_stage_data(cfg: RunConfig):
    """The run's per-stage datasets (``rlhf_data.StageData``) from the ``data.*`` keys; ``rlhf run``
    and ``rlhf data inspect`` both load through here, so they see the same data."""
    from rlhf_data import build_stage_data

    d = cfg.data
    sizes = {"sft": d.sft_samples, "rm": d.rm_samples, "rl": d.rl_samples}
    return build_stage_data(d.sources, split=d.split or None, seed=cfg.seed, eval_fraction=d.eval_fraction,
                            max_eval=d.max_eval, sizes={k: v for k, v in sizes.items() if v},
                            source_options={"demo": d.demo_options(),
                                            "tool-demo": {"num_eval": d.num_eval, "num_valid": d.num_valid}})


# the sets of StageData each stage tokenizes (an RL algorithm's by its kind; it also evaluates on rl_valid/rl_eval)
STAGE_SETS = {"sft": ("sft", "sft_eval"), "rm": ("rm", "rm_eval"), "online": ("rl", "rl_valid", "rl_eval"),
              "offline": ("rm", "rl_valid", "rl_eval")}


def check_stage_data(cfg: RunConfig, data, stages: list[str], algo_kind: str) -> None:
    """Before any stage trains: every set a stage to run needs has samples.

    Raises:
        PipelineError: a set is empty; the message names every source, its columns, why its records
            were unusable and the fields the stage looks for.
    """
    from rlhf_data import DataError

    from .context import PipelineError

    for stage in stages:
        for name in STAGE_SETS.get(stage) or STAGE_SETS.get(algo_kind, ()):
            try:
                data.require(name)
            except DataError as e:
                raise PipelineError(f"data: stage {stage!r}: {e} (data.sources={cfg.data.sources!r}, "
                                    f"data.split={cfg.data.split!r}; `rlhf data inspect` shows what each source "
                                    f"gives each stage)") from None


def unusable_lines(data) -> list[str]:
    """One line per source and set whose part held records that set cannot use, with the reasons."""
    lines = []
    for r in data.reports:
        for set_name, reasons in r.unusable.items():
            if reasons:
                lines.append(f"{r.label}: {set_name}: {sum(reasons.values())} records not usable ("
                             + ", ".join(f"{k}: {v}" for k, v in reasons.items()) + ")")
    return lines


def tokenize_config(cfg: RunConfig):
    """The ``rlhf_data.TokenizeConfig`` of the ``data.*`` length keys."""
    from rlhf_data import TokenizeConfig

    d = cfg.data
    return TokenizeConfig(max_prompt_len=d.max_prompt_len, max_response_len=d.max_response_len, truncation=d.truncation)


def inspect_data(cfg: RunConfig, tokenizer_name: str | None, examples: int = 3, console: Console | None = None) -> None:
    from rlhf_data import histogram, inspect_stage_data

    console = console or Console()
    d = cfg.data
    data = load_stage_data(cfg)
    tok = load_inspection_tokenizer(cfg, tokenizer_name, data.corpus)
    tc = tokenize_config(cfg)

    src = Table(title=f"data.sources = {d.sources}   split = {d.split or 'source default'}   seed = {cfg.seed}")
    for col in ("source", "format", "rows read", "dropped rows", "weight", "sft", "rm", "rl", "held out"):
        src.add_column(col, justify="left" if col in ("source", "format", "dropped rows") else "right")
    for r in data.reports:
        dropped = ", ".join(f"{k}: {v}" for k, v in r.dropped.items()) or "0"
        src.add_row(r.label, r.format, str(r.rows) if r.rows else "-", dropped, f"{r.weight:g}",
                    *(f"{r.used.get(s, 0)}/{r.usable.get(s, 0)}" for s in ("sft", "rm", "rl")),
                    str(r.parts.get("eval", 0)))
    console.print(src)
    console.print("sft/rm/rl columns: samples used by the blend / usable samples in the source's part")
    for line in unusable_lines(data):
        console.print(line, markup=False, highlight=False)

    with console.status("tokenizing every set ..."):
        rows = inspect_stage_data(data, tok, tc, examples=examples)
    t = Table(title=f"token lengths (max_prompt_len={d.max_prompt_len}, max_response_len={d.max_response_len}, "
                    f"truncation={d.truncation})")
    for col in ("source", "set", "samples", "prompt med/p95/max", "prompt histogram", "response med/p95/max",
                "response histogram", "truncated p/r", "dropped p/r"):
        t.add_column(col, justify="right" if col in ("samples", "truncated p/r", "dropped p/r") else "left")
    for ins in rows:
        st, ps, rs = ins.stats, ins.prompt_summary, ins.response_summary
        t.add_row(ins.source, ins.set, str(st.samples), f"{ps['median']:g}/{ps['p95']:g}/{ps['max']:g}",
                  sparkline(histogram(st.prompt_lens)),
                  f"{rs['median']:g}/{rs['p95']:g}/{rs['max']:g}" if st.response_lens else "-",
                  sparkline(histogram(st.response_lens)),
                  f"{st.truncated_prompt}/{st.truncated_response}", f"{st.dropped_prompt}/{st.dropped_response}")
    console.print(t)
    for ins in rows:
        if ins.set in ("sft", "rm", "rl") and ins.examples:
            console.rule(f"{ins.source}: {ins.set} examples")
            for i, text in enumerate(ins.examples, 1):
                console.print(f"[bold]#{i}[/]", markup=True)
                console.print(text, markup=False, highlight=False)
