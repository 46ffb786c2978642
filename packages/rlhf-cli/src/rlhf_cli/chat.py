"""``rlhf chat``: one answer, or an interactive session, from a model directory written by ``rlhf run``."""

from __future__ import annotations

import math

import typer

from .errors import fail
from .preflight import preflight_chat

__all__ = ["chat"]


def chat(model: str, prompt: str | None, max_new_tokens: int, temperature: float) -> None:
    """Check the settings and the model directory, then answer ``prompt`` (or read prompts from stdin)."""
    if max_new_tokens < 1:
        fail(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        fail(f"--temperature: {temperature!r} is not allowed; allowed: a finite number >= 0 (0 = greedy)")
    preflight_chat(model)
    import torch
    from rlhf_data import encode_prompt
    from rlhf_hybrid import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model)
    lm = load_causal_lm(model).eval()

    def answer(text: str) -> str:
        ids = torch.tensor([encode_prompt(tok, text)])
        with torch.no_grad():
            out = lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                              top_k=None, top_p=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    if prompt is not None:
        typer.echo(answer(prompt))
        return
    typer.echo("Interactive chat; an empty line or Ctrl-D ends it.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        typer.echo(f"model> {answer(text)}")
