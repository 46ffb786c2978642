"""Prompt/response rendering and tokenization shared by every stage.

A prompt is rendered with the tokenizer's chat template when it has one; otherwise in the plain
"Human:/Assistant:" format DeepSpeed-Chat and Anthropic HH use::

    Human: What is 47 + 38?

    Assistant: 85<eos>

(multi-turn prompts repeat the ``Human:``/``Assistant:`` turns, separated by blank lines; a system
message is its text alone, first). An empty prompt (``""``: a language-modelling text) renders as
nothing and its response as the raw text: no template, no ``Human:``, the tokenizer's BOS if it adds one.

The prompt and the response are tokenized *separately* and concatenated, so the tokens the policy
sees at training time are exactly the tokens it is conditioned on at generation time.

:func:`tokenize_records` tokenizes a whole stage, applies the length limits with an explicit policy
(truncate or drop, counted), and caches the result by content fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .records import Prompt, prompt_messages

log = logging.getLogger(__name__)

PLAIN_PROMPT = "Human: {prompt}\n\nAssistant:"
TRUNCATION_POLICIES = ("truncate", "drop")
CACHE_VERSION = 1  # bump when the tokenized format or the rendering changes


# The plain format above as a chat template: the demo tokenizer is saved with it, so that
# ``tokenizer.apply_chat_template`` works on the demo's outputs (``rlhf chat``, TRL, vLLM ...). With
# ``add_generation_prompt=True`` it renders exactly :func:`render_plain`'s text, so the prompt's token ids
# are the training ones. A closing assistant turn (a whole training sample) gets " " + its text + EOS,
# the training *text*; its ids may still differ at the prompt/response seam, because training tokenizes
# the prompt and the response separately (the demo's BPE merges across the seam when given both).
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}{{ 'Human: ' + m['content'] }}"
    "{% elif m['role'] == 'assistant' and loop.last and not add_generation_prompt %}"
    "{{ 'Assistant: ' + m['content'].lstrip() + eos_token }}"
    "{% elif m['role'] == 'assistant' %}{{ 'Assistant: ' + m['content'] }}"
    "{% else %}{{ raise_exception('role ' + m['role'] + ' is not allowed; allowed: system, user, assistant') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)


def uses_chat_template(tokenizer) -> bool:
    """Whether prompts render through the tokenizer's own chat template. A tokenizer whose template is
    :data:`PLAIN_CHAT_TEMPLATE` renders through :func:`render_plain` instead: the same text, and its
    responses keep the plain format's leading space, so adding the template changed no training ids."""
    template = getattr(tokenizer, "chat_template", None)
    return bool(template) and template != PLAIN_CHAT_TEMPLATE


def render_plain(messages: Sequence[dict]) -> str:
    """Messages in the plain format; ends with ``"\\n\\nAssistant:"`` when the last turn is the user's."""
    turns = []
    for m in messages:
        if m["role"] == "system":
            turns.append(m["content"])
        elif m["role"] == "user":
            turns.append(f"Human: {m['content']}")
        else:
            turns.append(f"Assistant: {m['content']}")
    text = "\n\n".join(turns)
    if messages and messages[-1]["role"] != "assistant":
        text += "\n\nAssistant:"
    return text


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the model is conditioned on for ``prompt`` (chat template or plain format; "" for "")."""
    if prompt == "":
        return ""
    messages = prompt_messages(prompt)
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return render_plain(messages)


def render_response(tokenizer, response: str, raw: bool = False) -> str:
    """The text of a response as it follows the rendered prompt (no EOS; that is a token); ``raw``
    (a language-modelling text, after the empty prompt): the text as it is."""
    return response if raw or uses_chat_template(tokenizer) else " " + response.lstrip()


@dataclass(frozen=True)
class TokenizeConfig:
    """Length limits, in tokens, and what happens to samples over them.

    Attributes:
        max_prompt_len: prompt limit; a longer prompt keeps its *last* tokens (the question is at
            the end) or, with ``truncation="drop"``, drops the sample.
        max_response_len: response limit (EOS included); a longer response keeps its first tokens
            and loses its EOS, so the model is not taught to stop mid-answer; or drops the sample.
        truncation: "truncate" or "drop" (either way the samples affected are counted).
        add_eos: end every response with the tokenizer's EOS token.
    """

    max_prompt_len: int = 256
    max_response_len: int = 256
    truncation: str = "truncate"
    add_eos: bool = True

    def __post_init__(self) -> None:
        for name in ("max_prompt_len", "max_response_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.truncation not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation: {self.truncation!r} is not allowed; allowed: "
                             f"{', '.join(map(repr, TRUNCATION_POLICIES))}")


def _prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    text = render_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=prompt == "" or not uses_chat_template(tokenizer))["input_ids"])


def _response_ids(tokenizer, response: str, add_eos: bool = True, raw: bool = False) -> list[int]:
    ids = list(tokenizer(render_response(tokenizer, response, raw), add_special_tokens=False)["input_ids"])
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no eos_token; set one (tokenizer.eos_token = ...) before training")
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_prompt(tokenizer, prompt: Prompt, cfg: TokenizeConfig = TokenizeConfig()) -> list[int]:
    """Token ids of the rendered prompt (with the tokenizer's BOS if it adds one), last
    ``max_prompt_len`` kept."""
    return _prompt_ids(tokenizer, prompt)[-cfg.max_prompt_len :]


def encode_response(tokenizer, response: str, cfg: TokenizeConfig = TokenizeConfig(), raw: bool = False) -> list[int]:
    """Token ids of the response followed by EOS (EOS dropped if the response is truncated); ``raw``:
    the text as it is (after an empty prompt)."""
    ids = _response_ids(tokenizer, response, cfg.add_eos, raw)
    return ids[: cfg.max_response_len] if len(ids) > cfg.max_response_len else ids


def encode_pair(tokenizer, prompt: Prompt, response: str, cfg: TokenizeConfig = TokenizeConfig()) -> dict:
    """``{"input_ids": prompt + response + eos, "prompt_len": len(prompt ids)}``."""
    p = encode_prompt(tokenizer, prompt, cfg)
    r = encode_response(tokenizer, response, cfg, raw=prompt == "")
    return {"input_ids": p + r, "prompt_len": len(p)}


# ----------------------------------------------------------------------------------------------
# whole stages, with counts and a cache
# ----------------------------------------------------------------------------------------------
@dataclass
class TokenizeStats:
    """What length limits did to a stage: sample counts and token lengths (before truncation)."""

    samples: int = 0
    kept: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    dropped_prompt: int = 0
    dropped_response: int = 0
    prompt_lens: list[int] = field(default_factory=list)
    response_lens: list[int] = field(default_factory=list)
    cache_hit: bool = False

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if isinstance(v, int) and not isinstance(v, bool)}


@dataclass
class TokenizedSet:
    """Tokenized examples of one stage, ready for the collators, and their :class:`TokenizeStats`.

    ``examples`` hold, by stage: "sft" ``input_ids`` + ``prompt_len``; "rm" ``chosen_ids`` +
    ``rejected_ids`` + ``prompt_len`` + ``meta``; "rl" ``input_ids`` + ``meta``.
    """

    examples: list[dict]
    stats: TokenizeStats


STAGE_FIELDS = {"sft": ("response",), "rm": ("chosen", "rejected"), "rl": ()}


def _fit_prompt(ids: list[int], cfg: TokenizeConfig, st: TokenizeStats) -> list[int] | None:
    if len(ids) <= cfg.max_prompt_len:
        return ids
    if cfg.truncation == "drop":
        st.dropped_prompt += 1
        return None
    st.truncated_prompt += 1
    return ids[-cfg.max_prompt_len :]


def tokenize_records(tokenizer, records: Sequence, stage: str, cfg: TokenizeConfig = TokenizeConfig(), *,
                     cache_dir: str | Path | None = None) -> TokenizedSet:
    """Tokenize one stage's records (SFT records for "sft", pairs for "rm", prompts for "rl").

    With ``cache_dir``, the result is stored under a fingerprint of the records, the tokenizer,
    ``cfg`` and the stage, and a later call with the same inputs loads it instead of tokenizing.

    Raises:
        ValueError: unknown stage, or a tokenizer without an EOS token when ``cfg.add_eos``.
    """
    if stage not in STAGE_FIELDS:
        raise ValueError(f"stage: {stage!r} is not allowed; allowed: {', '.join(map(repr, STAGE_FIELDS))}")
    path = None
    if cache_dir is not None:
        key = fingerprint(records, tokenizer, cfg, stage)
        path = Path(cache_dir).expanduser() / f"{stage}-{key[:32]}.json"
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
                stats = TokenizeStats(**saved["stats"])
                stats.cache_hit = True
                return TokenizedSet(saved["examples"], stats)
            except (json.JSONDecodeError, KeyError, TypeError) as e:  # a damaged cache file is rebuilt
                log.warning("tokenization cache %s is unreadable (%s); tokenizing again", path, e)
    out = _tokenize(tokenizer, records, stage, cfg)
    if path is not None:
        _write_atomic(path, json.dumps({"examples": out.examples, "stats": asdict(out.stats)}))
    return out


def _tokenize(tokenizer, records: Sequence, stage: str, cfg: TokenizeConfig) -> TokenizedSet:
    st = TokenizeStats(samples=len(records))
    examples = []
    for r in records:
        p_full = _prompt_ids(tokenizer, r.prompt)
        st.prompt_lens.append(len(p_full))
        responses = [_response_ids(tokenizer, getattr(r, f), cfg.add_eos, r.prompt == "") for f in STAGE_FIELDS[stage]]
        st.response_lens += [len(x) for x in responses]
        p = _fit_prompt(p_full, cfg, st)
        if p is None:
            continue
        if any(len(x) > cfg.max_response_len for x in responses):
            if cfg.truncation == "drop":
                st.dropped_response += 1
                continue
            st.truncated_response += 1
            responses = [x[: cfg.max_response_len] for x in responses]
        meta = dict(r.meta)
        if stage == "sft":
            examples.append({"input_ids": p + responses[0], "prompt_len": len(p)})
        elif stage == "rm":
            examples.append({"chosen_ids": p + responses[0], "rejected_ids": p + responses[1],
                             "prompt_len": len(p), "meta": meta})
        else:
            examples.append({"input_ids": p, "meta": meta})
    st.kept = len(examples)
    return TokenizedSet(examples, st)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything about a tokenizer that changes its output."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = [getattr(tokenizer, "chat_template", None), tokenizer.eos_token, tokenizer.bos_token,
               tokenizer.pad_token, getattr(tokenizer, "add_bos_token", None), len(tokenizer)]
    h.update(json.dumps(special, default=str).encode())
    return h.hexdigest()


def fingerprint(records: Iterable, tokenizer, cfg: TokenizeConfig, stage: str) -> str:
    """Content fingerprint of a tokenization job (records, tokenizer, limits, stage, format version)."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, stage, asdict(cfg), tokenizer_fingerprint(tokenizer)]).encode())
    for r in records:
        h.update(json.dumps(asdict(r), sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    """``$RLHF_CACHE_DIR/tokenized`` or ``~/.cache/rlhf/tokenized``."""
    root = os.environ.get("RLHF_CACHE_DIR") or Path.home() / ".cache" / "rlhf"
    return Path(root) / "tokenized"


# Longest corpus text the in-process tokenizer trains on. The pre-tokenizer splits only at digits, so
# a text is one BPE "word" and training time grows with its length squared (measured on the 2-core
# machine: 32K characters 1-5 s, 100K 14 s, 200K 66 s); longer texts train on their first part.
MAX_TOKENIZER_TEXT_CHARS = 16_384


def train_demo_tokenizer(corpus: Iterable[str], vocab_size: int = 320,
                         max_chars: int = MAX_TOKENIZER_TEXT_CHARS):
    """Train a small byte-level BPE tokenizer in-process (about 0.1 s) for tiny models.

    Texts longer than ``max_chars`` characters train on their first ``max_chars`` (a warning gives the
    count): the tokenizer learns merges from them, it does not need all of a long document.

    Digits are split one per token so that arithmetic is learnable by a tiny model; everything
    between digits may merge, so the fixed chat scaffolding ("Human: What is ", "?\\n\\nAssistant:")
    becomes a handful of tokens and sequences stay short (about 11 tokens a demo sample).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<pad>`` and ``<eos>`` special tokens and
        :data:`PLAIN_CHAT_TEMPLATE` as its chat template.
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
    texts = list(corpus)
    long = sum(len(t) > max_chars for t in texts)
    if long:
        logging.getLogger(__name__).warning(
            "tokenizer training: %d of %d texts are longer than %d characters; it trains on their first %d",
            long, len(texts), max_chars, max_chars)
        texts = [t[:max_chars] for t in texts]
    tok.train_from_iterator(texts, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    out.chat_template = PLAIN_CHAT_TEMPLATE  # saved by save_pretrained (chat_template.jinja)
    return out
