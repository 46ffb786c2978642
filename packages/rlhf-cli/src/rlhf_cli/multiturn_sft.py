"""SFT examples of multi-turn demonstrations (the tool demo's): each laid out exactly as a rollout's
trajectory by :func:`rlhf_data.tool_demo.demonstration_example` (each turn tokenized on its own, EOS
after each model turn, the tool's turns out of the labels), after the prompt's ids as the RL stage
tokenizes them (the same rendering, so SFT and RL see the same prompt tokens)."""

from __future__ import annotations

from .context import Context, PipelineError, tokenized

__all__ = ["is_multiturn", "sft_examples"]


def is_multiturn(records: list) -> bool:
    """Whether SFT ``records`` are multi-turn demonstrations (``meta["turns"]``, the tool-demo source's)."""
    return bool(records) and "turns" in records[0].meta


def sft_examples(ctx: Context, tokenizer, records: list, what: str, stats: dict) -> list[dict]:
    """The SFT stage's examples of ``records``: :func:`rlhf_cli.context.tokenized` for single-turn records;
    for multi-turn demonstrations, ``{"input_ids", "labels", "prompt_len"}`` with labels on the model's
    turns only (``rlhf_data.collate_sft`` keeps an example's own labels)."""
    if not is_multiturn(records):
        return tokenized(ctx, tokenizer, records, "sft", what, stats)
    from rlhf_data import PromptRecord
    from rlhf_data.tool_demo import demonstration_example

    s = ctx.cfg.sft
    if s.packing or s.padding_free or not s.mask_prompt:
        raise PipelineError(f"sft: multi-turn demonstrations (data.sources={ctx.cfg.data.sources!r}) are trained with "
                            f"their own labels (the model's turns only); sft.packing={s.packing}, "
                            f"sft.padding_free={s.padding_free}, sft.mask_prompt={s.mask_prompt} are not supported "
                            f"with them; allowed: sft.packing=false, sft.padding_free=false, sft.mask_prompt=true")
    prompts = tokenized(ctx, tokenizer, [PromptRecord(r.prompt, {}) for r in records], "rl", what, stats)
    if len(prompts) != len(records):
        raise PipelineError(f"data: {what}: {len(records) - len(prompts)} prompts were dropped by the length limits "
                            f"(data.max_prompt_len={ctx.cfg.data.max_prompt_len}); use data.truncation=truncate")

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    out = []
    for p, r in zip(prompts, records, strict=True):
        e = demonstration_example(encode, p["input_ids"], [tuple(t) for t in r.meta["turns"]], tokenizer.eos_token_id)
        out.append({**e, "prompt_len": len(p["input_ids"])})
    stats[what]["multiturn_tokens_max"] = max(len(e["input_ids"]) for e in out)
    return out
