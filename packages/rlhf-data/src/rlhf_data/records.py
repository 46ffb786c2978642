"""Canonical record types: every loaded sample is one of these."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SFTRecord:
    """A prompt with one demonstration response."""

    prompt: str
    response: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (chosen) and a dispreferred (rejected) response."""

    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class PromptRecord:
    """A prompt alone, for online RL (the policy writes the response)."""

    prompt: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ChatRecord:
    """A multi-turn conversation: a list of ``{"role": ..., "content": ...}`` messages."""

    messages: tuple[dict[str, str], ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
