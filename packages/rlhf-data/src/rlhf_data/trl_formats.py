"""TRL's standard dataset types, in plain (strings) and conversational (message lists) form.

The column names follow TRL's documentation of its dataset formats and types:

| type | plain | conversational |
|---|---|---|
| language modelling | ``text`` | ``messages`` |
| prompt-only | ``prompt`` | ``prompt`` (messages ending with a user turn) |
| prompt-completion | ``prompt``, ``completion`` | same, ``completion`` = one assistant message |
| preference, explicit prompt | ``prompt``, ``chosen``, ``rejected`` | same, each answer one assistant message |
| preference, implicit prompt | ``chosen``, ``rejected`` | same, whole conversations |
| unpaired preference | ``prompt``, ``completion``, ``label`` (bool) | same, as prompt-completion |

The type is read from the first row's columns (a TRL dataset has one type); the form from each
value (a string or a list of ``{"role", "content"}`` messages). A plain prompt is rendered as one
user turn like every other prompt here (chat template or "Human:/Assistant:"), not continued as raw
text; a ``text`` row is trained on as raw text (no prompt, no template).
"""

from __future__ import annotations

import re
from typing import Any

from .records import ChatRecord, PreferenceRecord, PromptRecord, SFTRecord, simplify_prompt
from .sources import DataError, RowError, SkipRow, SourceAdapter, check_pair, messages_field, text_field

# the columns of each type, in the order they are tested on the first row
TYPES = (
    ("preference", ("prompt", "chosen", "rejected")),
    ("implicit preference", ("chosen", "rejected")),
    ("unpaired preference", ("prompt", "completion", "label")),
    ("prompt-completion", ("prompt", "completion")),
    ("prompt-only", ("prompt",)),
    ("language modelling", ("messages",)),
    ("language modelling", ("text",)),
)
_SPACE = re.compile(r"\s")


def trl_type(row: dict) -> tuple[str, tuple[str, ...]]:
    """``(type, columns)`` of a TRL row (see the module docstring).

    Raises:
        DataError: the columns match no TRL type (the message lists each type's columns).
    """
    for name, cols in TYPES:
        if all(row.get(c) is not None for c in cols):
            return name, cols
    allowed = "; ".join(f"{n}: {', '.join(c)}" for n, c in TYPES)
    raise DataError(f"columns {', '.join(map(repr, row))} match no TRL dataset type; allowed column sets: {allowed}")


def _prompt(row: dict) -> Any:
    """The ``prompt`` field: a string, or messages ending with a user turn (one user turn -> str)."""
    if isinstance(row.get("prompt"), list):
        msgs = messages_field(row, "prompt")
        if msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
            raise RowError("prompt", f"must end with a non-empty user message, got a {msgs[-1]['role']!r} message")
        return simplify_prompt(msgs)
    return text_field(row, "prompt").strip()


def _answer(row: dict, name: str) -> str:
    """A completion/chosen/rejected field: a string, or exactly one assistant message."""
    if isinstance(row.get(name), list):
        msgs = messages_field(row, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            roles = [m["role"] for m in msgs]
            raise RowError(name, f"expected one assistant message, got roles {roles}; allowed: "
                                 f"[{{\"role\": \"assistant\", \"content\": ...}}]")
        if not msgs[0]["content"].strip():
            raise RowError(name, "empty")
        return msgs[0]["content"].strip()
    return text_field(row, name).strip()


def _label(row: dict) -> bool:
    value = row.get("label")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV writes booleans as text
        return value.strip().lower() == "true"
    raise RowError("label", f"{value!r} is not allowed; allowed: true, false")


def _implicit_text(chosen: str, rejected: str) -> PreferenceRecord:
    """Plain implicit prompt: the common leading text, cut back to the last whitespace (so no word is
    split), is the prompt; the rest of each is the answer."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):  # up to the shorter one
        if a != b:
            break
        n += 1
    if all(n >= len(s) or s[n].isspace() for s in (chosen, rejected)):
        cut = n  # both words end here
    else:  # the prefix ends inside a word: back up to the whitespace before it
        cut = max((m.start() for m in _SPACE.finditer(chosen, 0, n)), default=0)
    prompt = chosen[:cut].strip()
    if not prompt:
        raise SkipRow("implicit prompt: chosen and rejected share no leading words")
    answers = chosen[cut:].strip(), rejected[cut:].strip()
    if not all(answers):
        raise SkipRow("implicit prompt: an answer is empty after the shared prompt")
    return PreferenceRecord(prompt, *answers)


def _implicit_messages(row: dict) -> PreferenceRecord:
    """Conversational implicit prompt: the shared leading messages are the prompt; what follows in
    each must be one assistant message."""
    chosen, rejected = messages_field(row, "chosen"), messages_field(row, "rejected")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    prompt = chosen[:n]
    if not any(m["role"] == "user" for m in prompt):
        raise SkipRow("implicit prompt: chosen and rejected share no user message")
    tails = chosen[n:], rejected[n:]
    if any(len(t) != 1 or t[0]["role"] != "assistant" for t in tails):
        raise SkipRow("implicit prompt: chosen or rejected is not one assistant message after the shared prompt")
    if prompt[-1]["role"] != "user":
        raise SkipRow("implicit prompt: the shared messages do not end with a user message")
    answers = tails[0][0]["content"].strip(), tails[1][0]["content"].strip()
    if not all(answers):
        raise SkipRow("empty answer")
    return PreferenceRecord(simplify_prompt(prompt), *answers)


class TRLAdapter(SourceAdapter):
    """TRL's dataset types (language modelling, prompt-only, prompt-completion, preference with an
    explicit or implicit prompt, unpaired preference), each plain or conversational."""

    name = "trl"
    record_kind = "mixed"
    description = ("TRL's dataset types, plain or conversational (message lists): `text`/`messages`, `prompt`, "
                   "`prompt`+`completion`, `prompt`+`chosen`+`rejected`, `chosen`+`rejected` (implicit prompt), "
                   "`prompt`+`completion`+`label` (unpaired); the type is read from the columns.")
    example = ('{"prompt": [{"role": "user", "content": "Name a dog breed."}], "chosen": [{"role": "assistant", '
               '"content": "The beagle."}], "rejected": [{"role": "assistant", "content": "A cat."}]}')

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self.type: str | None = None
        self.columns_used: tuple[str, ...] = ()

    def required_columns(self) -> tuple[str, ...]:
        return ()  # the type is read from the first row in convert; a later row missing a column is a row error

    def convert(self, row: dict) -> Any:
        if self.type is None:
            self.type, self.columns_used = trl_type(row)
        t = self.type
        if t == "language modelling":
            if "messages" in self.columns_used:
                msgs = messages_field(row, "messages")
                if not any(m["role"] == "user" for m in msgs):
                    raise RowError("messages", "has no user message")
                return ChatRecord(msgs)
            return SFTRecord("", text_field(row, "text"))  # no prompt: trained on as raw text
        if t == "implicit preference":
            if isinstance(row.get("chosen"), list) or isinstance(row.get("rejected"), list):
                return _implicit_messages(row)
            chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
            check_pair(chosen, rejected)
            return _implicit_text(chosen, rejected)
        prompt = _prompt(row)
        if t == "prompt-only":
            return PromptRecord(prompt)
        if t == "preference":
            chosen, rejected = _answer(row, "chosen"), _answer(row, "rejected")
            check_pair(chosen, rejected)
            return PreferenceRecord(prompt, chosen, rejected)
        meta = {"label": _label(row)} if t == "unpaired preference" else {}
        return SFTRecord(prompt, _answer(row, "completion"), meta)

    @classmethod
    def detect(cls, row: dict) -> bool:
        """TRL rows no other built-in format claims: a ``completion`` column, a conversational
        ``prompt``, a plain ``text`` row, or plain chosen/rejected without a prompt that are not HH
        transcripts. (Plain prompt-only and explicit-preference rows are the ``local`` format's,
        which gives the same records.)"""
        prompt, chosen, rejected = row.get("prompt"), row.get("chosen"), row.get("rejected")
        if "completion" in row or isinstance(prompt, list):
            return True
        if prompt is None and isinstance(chosen, str) and isinstance(rejected, str):
            return not (chosen.lstrip().startswith("Human:") and rejected.lstrip().startswith("Human:"))
        return prompt is None and isinstance(row.get("text"), str) and not ({"messages", "conversations"} & set(row))
