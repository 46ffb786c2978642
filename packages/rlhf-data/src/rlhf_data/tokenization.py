"""Prompt/response rendering and tokenization shared by every stage.

A prompt is rendered with the tokenizer's chat template when it has one; otherwise in the plain
"Human:/Assistant:" format DeepSpeed-Chat and Anthropic HH use::

    Human: What is 47 + 38?

    Assistant: 85<eos>

The prompt and the response are tokenized *separately* and concatenated, so the tokens the policy
sees at training time are exactly the tokens it is conditioned on at generation time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PLAIN_PROMPT = "Human: {prompt}\n\nAssistant:"


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model is conditioned on for ``prompt`` (chat template or plain format)."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT.format(prompt=prompt)


def render_response(tokenizer, response: str) -> str:
    """The text of a response as it follows the rendered prompt (no EOS; that is a token)."""
    return response if uses_chat_template(tokenizer) else " " + response.lstrip()


@dataclass(frozen=True)
class TokenizeConfig:
    """Length limits, in tokens.

    Attributes:
        max_prompt_len: longer prompts keep their *last* tokens (the question is at the end).
        max_response_len: longer responses keep their first tokens; the EOS is then dropped too,
            so the model is not taught to stop mid-answer.
    """

    max_prompt_len: int = 256
    max_response_len: int = 256

    def __post_init__(self) -> None:
        for name in ("max_prompt_len", "max_response_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")


def encode_prompt(tokenizer, prompt: str, cfg: TokenizeConfig = TokenizeConfig()) -> list[int]:
    """Token ids of the rendered prompt (with the tokenizer's BOS if it adds one)."""
    ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=not uses_chat_template(tokenizer))[
        "input_ids"
    ]
    return list(ids[-cfg.max_prompt_len :])


def encode_response(tokenizer, response: str, cfg: TokenizeConfig = TokenizeConfig()) -> list[int]:
    """Token ids of the response followed by EOS (EOS dropped if the response is truncated)."""
    ids = list(tokenizer(render_response(tokenizer, response), add_special_tokens=False)["input_ids"])
    if len(ids) >= cfg.max_response_len:
        return ids[: cfg.max_response_len]
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no eos_token; set one (tokenizer.eos_token = ...) before training")
    return ids + [tokenizer.eos_token_id]


def encode_pair(tokenizer, prompt: str, response: str, cfg: TokenizeConfig = TokenizeConfig()) -> dict:
    """``{"input_ids": prompt + response + eos, "prompt_len": len(prompt ids)}``."""
    p = encode_prompt(tokenizer, prompt, cfg)
    r = encode_response(tokenizer, response, cfg)
    return {"input_ids": p + r, "prompt_len": len(p)}


def train_demo_tokenizer(corpus: Iterable[str], vocab_size: int = 320):
    """Train a small byte-level BPE tokenizer in-process (about 0.1 s) for the demo task.

    Digits are split one per token so that arithmetic is learnable by a tiny model; everything
    between digits may merge, so the fixed chat scaffolding ("Human: What is ", "?\n\nAssistant:")
    becomes a handful of tokens and sequences stay short (about 11 tokens a sample).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<pad>`` and ``<eos>`` special tokens.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
