"""The built-in source adapters (registered under ``rlhf.data.sources`` in pyproject.toml).

Each class documents its format with one raw example row (``example``); docs/data.md shows them and
the tests build their local files from the same schemas.
"""

from __future__ import annotations

from typing import Any

from .records import (
    ChatRecord,
    PreferenceRecord,
    PromptRecord,
    SFTRecord,
    parse_transcript,
    simplify_prompt,
    split_conversation,
)
from .sources import (
    DataError,
    RowError,
    SkipRow,
    SourceAdapter,
    check_pair,
    messages_field,
    number_field,
    text_field,
)


def _transcript(row: dict, name: str) -> tuple[dict[str, str], ...]:
    try:
        return parse_transcript(text_field(row, name))
    except ValueError as e:
        raise RowError(name, str(e)) from None


def _looks_like_transcript(value: Any) -> bool:
    return isinstance(value, str) and value.lstrip().startswith("Human:")


def _by_score(prompt: str, a: str, score_a: float, b: str, score_b: float) -> PreferenceRecord:
    """The pair of two scored answers with the higher-scored one chosen (the caller has dropped ties)."""
    chosen, rejected = (a, b) if score_a > score_b else (b, a)
    check_pair(chosen, rejected)
    return PreferenceRecord(prompt, chosen, rejected)


class HHAdapter(SourceAdapter):
    """Anthropic HH-RLHF: two full transcripts that differ only in the final assistant answer."""

    name = "hh"
    hub_id = "Anthropic/hh-rlhf"
    columns = ("chosen", "rejected")
    description = ("Anthropic HH-RLHF: `chosen`/`rejected` are whole \"\\n\\nHuman: ...\\n\\nAssistant: ...\" "
                   "transcripts; the prompt is everything before the last Assistant turn.")
    example = ('{"chosen": "\\n\\nHuman: What is a dog?\\n\\nAssistant: A domesticated canine.", '
               '"rejected": "\\n\\nHuman: What is a dog?\\n\\nAssistant: No idea."}')

    def convert(self, row: dict) -> PreferenceRecord:
        answers, prompts = [], []
        for name in ("chosen", "rejected"):
            msgs = _transcript(row, name)
            if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]:
                raise SkipRow("empty final answer")
            prompts.append(msgs[:-1])
            answers.append(msgs[-1]["content"])
        if prompts[0] != prompts[1]:
            raise SkipRow("chosen and rejected transcripts differ before the final answer")
        check_pair(*answers)
        return PreferenceRecord(simplify_prompt(prompts[0]), answers[0], answers[1])

    @classmethod
    def detect(cls, row: dict) -> bool:
        return "prompt" not in row and _looks_like_transcript(row.get("chosen")) and \
            _looks_like_transcript(row.get("rejected"))


class RMStaticAdapter(SourceAdapter):
    """Dahoas/rm-static: an HH transcript prompt plus separate chosen/rejected answers."""

    name = "rm-static"
    hub_id = "Dahoas/rm-static"
    columns = ("prompt", "chosen", "rejected")
    description = ("Dahoas/rm-static (HH-derived): `prompt` is the \"\\n\\nHuman: ...\\n\\nAssistant:\" transcript, "
                   "`chosen`/`rejected` the two answers (`response` is ignored).")
    example = ('{"prompt": "\\n\\nHuman: What is a dog?\\n\\nAssistant:", "response": " A domesticated canine.", '
               '"chosen": " A domesticated canine.", "rejected": " No idea."}')

    def convert(self, row: dict) -> PreferenceRecord:
        prompt = _transcript(row, "prompt")
        if prompt[-1]["role"] != "user":
            raise RowError("prompt", "must end with a Human turn (optionally followed by an empty 'Assistant:')")
        chosen, rejected = (self._answer(row, n) for n in ("chosen", "rejected"))
        check_pair(chosen, rejected)
        return PreferenceRecord(simplify_prompt(prompt), chosen, rejected)

    @staticmethod
    def _answer(row: dict, name: str) -> str:
        text = text_field(row, name).strip()
        # some derived sets repeat the role marker in the answer ("Assistant: Sure, ...")
        if text.startswith("Assistant:"):
            text = text[len("Assistant:") :].strip()
        if not text:
            raise SkipRow("empty answer")
        return text

    @classmethod
    def detect(cls, row: dict) -> bool:
        return _looks_like_transcript(row.get("prompt")) and isinstance(row.get("chosen"), str) and \
            isinstance(row.get("rejected"), str)


class FullHHAdapter(RMStaticAdapter):
    """Dahoas/full-hh-rlhf: the rm-static schema over the whole HH set."""

    name = "full-hh-rlhf"
    hub_id = "Dahoas/full-hh-rlhf"
    description = "Dahoas/full-hh-rlhf: the same columns as rm-static (`prompt`, `response`, `chosen`, `rejected`)."

    @classmethod
    def detect(cls, row: dict) -> bool:
        return False  # same schema as rm-static; name it to choose it


class YitingxieAdapter(RMStaticAdapter):
    """yitingxie/rlhf-reward-datasets: rm-static-like; answers may start with "Assistant:"."""

    name = "yitingxie"
    hub_id = "yitingxie/rlhf-reward-datasets"
    description = ("yitingxie/rlhf-reward-datasets: `prompt` transcript, `chosen`/`rejected` answers that may repeat "
                   "the \"Assistant:\" marker (stripped).")
    example = ('{"prompt": "\\n\\nHuman: What is a dog?\\n\\n", "chosen": "Assistant: A domesticated canine.", '
               '"rejected": "Assistant: No idea."}')

    @classmethod
    def detect(cls, row: dict) -> bool:
        return False


class SyntheticInstructAdapter(SourceAdapter):
    """Dahoas/synthetic-instruct-gptj-pairwise: a plain instruction and two answers; train split only."""

    name = "synthetic-instruct-gptj-pairwise"
    hub_id = "Dahoas/synthetic-instruct-gptj-pairwise"
    columns = ("prompt", "chosen", "rejected")
    eval_split = None
    description = ("Dahoas/synthetic-instruct-gptj-pairwise: plain-text `prompt` (an instruction), `chosen`, "
                   "`rejected`; only a train split (the eval part is held out from it).")
    example = '{"prompt": "Name a dog breed.", "chosen": "The beagle.", "rejected": "A cat."}'

    def convert(self, row: dict) -> PreferenceRecord:
        prompt = text_field(row, "prompt").strip()
        chosen, rejected = text_field(row, "chosen").strip(), text_field(row, "rejected").strip()
        check_pair(chosen, rejected)
        return PreferenceRecord(prompt, chosen, rejected)


class WebGPTAdapter(SourceAdapter):
    """openai/webgpt_comparisons: two scored answers per question; ties dropped."""

    name = "webgpt"
    hub_id = "openai/webgpt_comparisons"
    columns = ("question", "answer_0", "answer_1", "score_0", "score_1")
    eval_split = None
    description = ("openai/webgpt_comparisons: `question` (`{\"full_text\": ...}` or text), `answer_0`/`answer_1` with "
                   "`score_0`/`score_1`; the higher score is chosen, ties are dropped; only a train split.")
    example = ('{"question": {"full_text": "Why is the sky blue?"}, "answer_0": "Rayleigh scattering.", '
               '"score_0": 1.0, "answer_1": "Because it is.", "score_1": -1.0}')

    def convert(self, row: dict) -> PreferenceRecord:
        q = row.get("question")
        if isinstance(q, dict):
            if not isinstance(q.get("full_text"), str) or not q["full_text"].strip():
                raise RowError("question", "needs a non-empty 'full_text'")
            question = q["full_text"].strip()
        else:
            question = text_field(row, "question").strip()
        s0, s1 = number_field(row, "score_0"), number_field(row, "score_1")
        if s0 == s1:
            raise SkipRow("tie")
        a0, a1 = (text_field(row, n, allow_empty=True).strip() for n in ("answer_0", "answer_1"))
        if not a0 or not a1:
            raise SkipRow("empty answer")
        return _by_score(question, a0, s0, a1, s1)

    @classmethod
    def detect(cls, row: dict) -> bool:
        return all(c in row for c in cls.columns)


class SHPAdapter(SourceAdapter):
    """stanfordnlp/SHP: a Reddit post and two top-level comments; the higher-scored one is chosen."""

    name = "shp"
    hub_id = "stanfordnlp/SHP"
    columns = ("history", "human_ref_A", "human_ref_B", "score_A", "score_B")
    description = ("stanfordnlp/SHP: `history` (the post), comments `human_ref_A`/`human_ref_B` with scores "
                   "`score_A`/`score_B`; the higher score is chosen, ties dropped. Option `min_score_ratio` "
                   "(e.g. 2, as the SHP authors suggest) drops pairs whose score ratio is lower.")
    example = ('{"post_id": "abc", "domain": "askscience_train", "history": "Why is the sky blue?", '
               '"human_ref_A": "Rayleigh scattering.", "human_ref_B": "Magic.", "score_A": 52, "score_B": 3, '
               '"labels": 1, "score_ratio": 17.3}')

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("min_score_ratio",)

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        raw = self.options.get("min_score_ratio", 1.0)
        try:
            self.min_ratio = float(raw)
        except (TypeError, ValueError):
            raise DataError(f"source 'shp': option min_score_ratio={raw!r} is not a number") from None
        if self.min_ratio < 1.0:
            raise DataError(f"source 'shp': option min_score_ratio={raw!r} must be >= 1")

    def convert(self, row: dict) -> PreferenceRecord:
        post = text_field(row, "history").strip()
        a, b = text_field(row, "human_ref_A").strip(), text_field(row, "human_ref_B").strip()
        sa, sb = number_field(row, "score_A"), number_field(row, "score_B")
        if sa == sb:
            raise SkipRow("tie")
        hi, lo = max(sa, sb), min(sa, sb)
        if self.min_ratio > 1 and (lo <= 0 or hi / lo < self.min_ratio):
            raise SkipRow("score ratio below min_score_ratio")
        return _by_score(post, a, sa, b, sb)

    @classmethod
    def detect(cls, row: dict) -> bool:
        return "human_ref_A" in row and "history" in row


class UltraFeedbackAdapter(SourceAdapter):
    """HuggingFaceH4/ultrafeedback_binarized: chosen/rejected as message lists."""

    name = "ultrafeedback"
    hub_id = "HuggingFaceH4/ultrafeedback_binarized"
    columns = ("chosen", "rejected")
    train_split = "train_prefs"
    eval_split = "test_prefs"
    description = ("HuggingFaceH4/ultrafeedback_binarized: `chosen`/`rejected` are message lists "
                   "(`[{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]`) sharing the prompt turns; hub "
                   "splits train_prefs/test_prefs.")
    example = ('{"prompt": "Name a dog breed.", "chosen": [{"role": "user", "content": "Name a dog breed."}, '
               '{"role": "assistant", "content": "The beagle."}], "rejected": [{"role": "user", "content": '
               '"Name a dog breed."}, {"role": "assistant", "content": "A cat."}], "score_chosen": 8.0, '
               '"score_rejected": 2.0}')

    def convert(self, row: dict) -> PreferenceRecord:
        prompts, answers = [], []
        for name in ("chosen", "rejected"):
            try:
                prompt, answer = split_conversation(messages_field(row, name))
            except ValueError as e:
                if isinstance(e, RowError):
                    raise
                raise RowError(name, str(e)) from None
            prompts.append(prompt)
            answers.append(answer.strip())
        if prompts[0] != prompts[1]:
            raise SkipRow("chosen and rejected conversations differ before the final answer")
        if not answers[0] or not answers[1]:
            raise SkipRow("empty answer")
        check_pair(*answers)
        return PreferenceRecord(simplify_prompt(prompts[0]), answers[0], answers[1])

    @classmethod
    def detect(cls, row: dict) -> bool:
        # a conversational `prompt` (a list) is TRL's explicit-prompt preference format: `trl`
        return isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list) and \
            not isinstance(row.get("prompt"), list)


class ShareGPTAdapter(SourceAdapter):
    """ShareGPT conversations: ``conversations`` of ``{"from": "human"|"gpt"|"system", "value": ...}``."""

    name = "sharegpt"
    columns = ("conversations",)
    eval_split = None
    record_kind = "chat"
    ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "assistant": "assistant",
             "system": "system"}
    description = ("ShareGPT / Vicuna conversations: `conversations` is a list of `{\"from\": \"human\"|\"gpt\"|"
                   "\"system\", \"value\": ...}`; no default dataset (give a file or a hub id).")
    example = ('{"id": "x1", "conversations": [{"from": "human", "value": "Name a dog breed."}, '
               '{"from": "gpt", "value": "The beagle."}]}')

    def convert(self, row: dict) -> ChatRecord:
        msgs = messages_field(row, "conversations", role_key="from", content_key="value", role_map=self.ROLES)
        return _chat(msgs, "conversations")

    @classmethod
    def detect(cls, row: dict) -> bool:
        return isinstance(row.get("conversations"), list)


class MessagesAdapter(SourceAdapter):
    """OpenAI-style ``messages`` conversations (``{"role", "content"}`` dicts)."""

    name = "messages"
    columns = ("messages",)
    eval_split = None
    record_kind = "chat"
    description = ("Chat conversations: `messages` is a list of `{\"role\": \"system\"|\"user\"|\"assistant\", "
                   "\"content\": ...}`; no default dataset (give a file or a hub id).")
    example = ('{"messages": [{"role": "user", "content": "Name a dog breed."}, '
               '{"role": "assistant", "content": "The beagle."}]}')

    def convert(self, row: dict) -> ChatRecord:
        return _chat(messages_field(row, "messages"), "messages")

    @classmethod
    def detect(cls, row: dict) -> bool:
        return isinstance(row.get("messages"), list) and "chosen" not in row


def _chat(msgs: tuple, field: str) -> ChatRecord:
    if not any(m["role"] == "user" for m in msgs):
        raise RowError(field, "has no user message")
    return ChatRecord(msgs)


class LocalAdapter(SourceAdapter):
    """Any local json/jsonl/parquet/csv file, with a column mapping.

    Options map canonical fields to the file's columns: ``prompt``, ``response`` (SFT), ``chosen`` and
    ``rejected`` (preference), ``messages`` (chat). The record kind follows from which mapped columns
    the file has: chosen+rejected -> preference; response -> SFT; messages -> chat; prompt only ->
    prompt. Unmapped fields use their canonical names.
    """

    name = "local"
    eval_split = None
    record_kind = "mixed"
    FIELDS = ("prompt", "response", "chosen", "rejected", "messages")
    description = ("Generic local file (.jsonl/.json/.parquet/.csv) with plain-text columns; map names with "
                   "`local:./x.csv[prompt=question,chosen=good,rejected=bad]`. Kind by columns: "
                   "prompt+chosen+rejected (pairs), prompt+response (SFT), messages (chat), prompt (prompts).")
    example = '{"question": "Name a dog breed.", "good": "The beagle.", "bad": "A cat."}'

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return cls.FIELDS

    def __init__(self, options: dict[str, str] | None = None) -> None:
        super().__init__(options)
        self.col = {f: self.options.get(f, f) for f in self.FIELDS}
        self.kind: str | None = None

    def _kind(self, row: dict) -> str:
        has = {f for f, c in self.col.items() if c in row}
        if {"chosen", "rejected"} <= has and "prompt" in has:
            return "preference"
        if {"prompt", "response"} <= has:
            return "sft"
        if "messages" in has:
            return "chat"
        if "prompt" in has:
            return "prompt"
        mapping = ", ".join(f"{f}={c}" for f, c in self.col.items())
        raise DataError(f"columns {', '.join(map(repr, row))} match no record kind with the mapping "
                        f"[{mapping}]; need prompt+chosen+rejected, prompt+response, messages or prompt")

    def required_columns(self) -> tuple[str, ...]:
        # the columns the spec maps by name must exist (a missing one would silently change the record
        # kind: pairs read as prompts); the kind itself is decided from the first row in convert
        return tuple(self.options[f] for f in self.FIELDS if f in self.options)

    def convert(self, row: dict) -> Any:
        if self.kind is None:
            self.kind = self._kind(row)
        c = self.col
        if self.kind == "chat":
            return _chat(messages_field(row, c["messages"]), c["messages"])
        prompt = text_field(row, c["prompt"]).strip()
        if self.kind == "prompt":
            return PromptRecord(prompt)
        if self.kind == "sft":
            return SFTRecord(prompt, text_field(row, c["response"]).strip())
        chosen, rejected = text_field(row, c["chosen"]).strip(), text_field(row, c["rejected"]).strip()
        check_pair(chosen, rejected)
        return PreferenceRecord(prompt, chosen, rejected)

    @classmethod
    def detect(cls, row: dict) -> bool:
        prompt = row.get("prompt")
        # a `completion` column is TRL's prompt-completion / unpaired format: `trl`
        return isinstance(prompt, str) and not _looks_like_transcript(prompt) and \
            not isinstance(row.get("chosen"), list) and "completion" not in row


class DemoSource(SourceAdapter):
    """The built-in demo task (two-digit addition with a verifier); generated, needs no file.

    Its stage pools are the task's own (``stage_split``, default 4,3,3) unless ``data.split`` is
    given; held-out eval and validation prompts are separate, fixed-size sets.
    """

    name = "demo"
    eval_split = None
    record_kind = "mixed"
    description = ("The built-in demo task: two-digit addition in chat form, generated in-process with a "
                   "ground-truth verifier (docs/demo-task.md).")
    example = '{"prompt": "What is 47 + 38?", "response": "85"}'
    reads_data = False
    OPTIONS = {"num_eval": int, "num_valid": int, "sft_carry_error": float, "label_noise": float,
               "pairs_per_prompt": int, "stage_split": str}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(cls.OPTIONS)

    def read(self, location: str, split: str | None):
        raise DataError("source 'demo' is generated in-process; it takes no file or dataset")

    def load_stages(self, seed: int):
        from .demo import AdditionTask, AdditionTaskConfig
        from .stages import StagedParts, StageSplit

        kw: dict[str, Any] = {}
        for key, value in self.options.items():
            if key == "stage_split":
                if value in ("", None):
                    continue
                s = value if isinstance(value, StageSplit) else StageSplit.parse(value)
                if min(s.sft, s.rm, s.rl) <= 0:
                    raise DataError(f"data.split: {s} is not allowed for the demo source; every part must be > 0")
                kw["stage_split"] = (s.sft, s.rm, s.rl)
                continue
            try:
                kw[key] = self.OPTIONS[key](value)
            except (TypeError, ValueError):
                raise DataError(f"source 'demo': option {key}={value!r} is not a {self.OPTIONS[key].__name__}") from None
        try:
            task = AdditionTask(AdditionTaskConfig(seed=seed, **kw))
        except ValueError as e:
            raise DataError(str(e)) from None
        return StagedParts(
            sft=task.sft_records("sft"), rm=task.preference_records("rm"), rl=task.prompt_records("rl"),
            sft_eval=task.sft_records("eval"), rm_eval=task.preference_records("eval"),
            rl_valid=task.prompt_records("valid"), rl_eval=task.prompt_records("eval"),
            corpus=task.corpus(), verifier=task.verify,
        )
