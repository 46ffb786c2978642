"""Canonical record types: every loaded sample is one of these.

A *prompt* is either a single user message (``str``) or a conversation so far: a tuple of
``{"role": ..., "content": ...}`` messages ending with a user turn (multi-turn data such as
Anthropic HH or UltraFeedback). :func:`rlhf_data.render_prompt` renders both with the model's chat
template, or in the plain "Human:/Assistant:" format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Union

Message = dict[str, str]
Prompt = Union[str, tuple[Message, ...]]  # noqa: UP007  (kept as a runtime alias for Python 3.10)
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class SFTRecord:
    """A prompt with one demonstration response."""

    prompt: Prompt
    response: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) response."""

    prompt: Prompt
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PromptRecord:
    """A prompt alone, for online RL (the policy writes the response)."""

    prompt: Prompt
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ChatRecord:
    """A multi-turn conversation: a tuple of ``{"role": ..., "content": ...}`` messages."""

    messages: tuple[Message, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


Record = Union[SFTRecord, PreferenceRecord, PromptRecord, ChatRecord]  # noqa: UP007

RECORD_KINDS = {SFTRecord: "sft", PreferenceRecord: "preference", PromptRecord: "prompt", ChatRecord: "chat"}


def record_kind(record: Record) -> str:
    """``"sft"``, ``"preference"``, ``"prompt"`` or ``"chat"``."""
    return RECORD_KINDS[type(record)]


def prompt_messages(prompt: Prompt) -> tuple[Message, ...]:
    """The prompt as a message tuple (a plain string is one user message)."""
    return ({"role": "user", "content": prompt},) if isinstance(prompt, str) else tuple(prompt)


def simplify_prompt(prompt: Prompt) -> Prompt:
    """A prompt that is one user message as a plain string (it renders the same and reads better)."""
    if isinstance(prompt, str):
        return prompt
    return prompt[0]["content"] if len(prompt) == 1 and prompt[0]["role"] == "user" else tuple(prompt)


def prompt_text(prompt: Prompt) -> str:
    """The last user message of a prompt (for tables and logs)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else ""


# "\n\nHuman: ... \n\nAssistant: ..." transcripts (Anthropic HH-RLHF and the datasets derived from it).
_TURN = re.compile(r"(?:^\s*|\n\n)(Human|Assistant):[ \t]?")


def parse_transcript(text: str) -> tuple[Message, ...]:
    """Split an HH-style transcript into messages (``Human`` -> user, ``Assistant`` -> assistant).

    Turn markers are recognised at the start of the text or after a blank line, as Anthropic writes
    them (a "Human:" inside a message is text). A trailing empty ``Assistant:`` turn is dropped (it
    opens the response).

    Raises:
        ValueError: the text has no ``Human:`` turn.
    """
    parts = _TURN.split(text)
    # parts = [before, role, content, role, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH transcript: expected it to start with 'Human:' (after blank lines)")
    messages = []
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not any(m["role"] == "user" for m in messages):
        raise ValueError("not an HH transcript: no 'Human:' turn")
    return tuple(messages)


def split_conversation(messages: tuple[Message, ...]) -> tuple[tuple[Message, ...], str]:
    """``(prompt messages, final assistant answer)`` of a conversation that ends with the assistant.

    Raises:
        ValueError: the conversation does not end with a non-empty assistant message after a user turn.
    """
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the conversation does not end with an assistant message")
    prompt = tuple(messages[:-1])
    if not any(m["role"] == "user" for m in prompt):
        raise ValueError("the conversation has no user message before the final assistant message")
    return prompt, messages[-1]["content"]
