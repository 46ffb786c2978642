"""``rlhf chat --env NAME``: watch a model play episodes against a registered environment.

Each task (``--prompt``, or a line read from the terminal or piped stdin) is one episode, run by the
driver of training rollouts, :func:`rlhf_algos.trajectories.run_episodes` over the session
:func:`~rlhf_algos.trajectories.make_session` picks (a :class:`~rlhf_algos.trajectories.RePrefillSession`
here): the task rendered as a prompt exactly as in training, each model turn generated on the
trajectory's token sequence so far and ended at EOS or the per-turn cap, each text reply of the
environment tokenized once, for its turn, and appended as ids; the conversation is never
re-tokenized from text. So the model sees the token sequence it would see in a training rollout
(docs/environments.md, "Token and mask layout").

Shown on stdout: each model turn as it is generated (``model> ...``), each reply of the environment
as it was appended (``env> ...``, decoded from the appended ids), then how the episode ended (the
reason of :data:`rlhf_algos.environments.END_REASONS`), the rewards and the last step's ``info``
(the calculator's verifier result: ``answer``, ``correct``, ``tool_result``).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import typer
import yaml

from .chat import _note, _say, read_messages
from .chat_session import ChatSession, ContextError, GenerationSettings, TextStream, reply_text
from .errors import fail

__all__ = ["EnvOptions", "EpisodeRunner", "ShownSession", "StreamingLM", "chat_env", "check_env_flags",
           "environment_factory", "episode_loop", "parse_pairs"]

ENV_ONLY_FLAGS = {"env_args": "--env-arg", "meta": "--meta", "max_turns": "--max-turns",
                  "max_total_tokens": "--max-total-tokens"}


def parse_pairs(flag: str, items: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` strings as a dict, each VALUE read as YAML (``2`` an int, ``true`` a bool, text stays text).

    Raises:
        ValueError: an item is not ``KEY=VALUE`` with a non-empty KEY, or a KEY is given twice (named by ``flag``).
    """
    out: dict[str, object] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"{flag}: {item!r} is not allowed; allowed: KEY=VALUE with KEY a Python identifier")
        if key in out:
            raise ValueError(f"{flag}: {key!r} is given twice")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            out[key] = raw  # not YAML (e.g. "a: b: c"): the text itself
    return out


@dataclass(frozen=True)
class EnvOptions:
    """The episode settings of ``rlhf chat --env``; each field is the flag of the same name.

    Attributes:
        name: the registered environment (``--env``).
        env_args: keyword arguments of its constructor (``--env-arg``).
        meta: fields of the prompt record its ``reset`` gets, besides ``prompt`` (``--meta``).
        max_turns: model turns per episode at most (>= 1).
        max_total_tokens: tokens after the prompt per episode, model and environment together (>= 1);
            None: what the model's context leaves after the prompt.
    """

    name: str
    env_args: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    max_turns: int = 4
    max_total_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_turns", "max_total_tokens"):
            v = getattr(self, name)
            if v is None and name == "max_total_tokens":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{ENV_ONLY_FLAGS[name]}: {v!r} is not allowed; allowed: an integer >= 1")
        if "prompt" in self.meta:
            raise ValueError("--meta: 'prompt' is not allowed; the record's prompt is the task's rendered prompt")


def environment_factory(name: str, env_args: dict) -> Callable[[], object]:
    """A zero-argument constructor of the environment ``name`` with ``env_args``, tried once here so that a
    bad name or argument is a user error before any model is loaded.

    Raises:
        ValueError: an unknown name (``--env``, listing the registered ones), a plugin that does not
            load, or arguments its constructor refuses (``--env-arg``, listing its parameters).
    """
    from rlhf_algos.environments import EnvironmentLoadError, get_environment

    try:
        cls = get_environment(name)
    except (ValueError, EnvironmentLoadError) as e:
        raise ValueError(f"--env: {e}") from None
    try:
        signature = inspect.signature(cls)
        params = ", ".join(str(p) for p in signature.parameters.values()) or "none"
    except (TypeError, ValueError):  # no introspectable signature: let the call itself tell
        signature, params = None, "unknown"
    try:
        if signature is not None:
            signature.bind(**env_args)
        cls(**env_args)
    except Exception as e:  # noqa: BLE001 - whatever the plugin's constructor raises is the user's argument's fault
        raise ValueError(f"--env-arg: environment {name!r} refuses {env_args!r}: {type(e).__name__}: {e} "
                         f"(its arguments: {params})") from None
    return functools.partial(cls, **env_args)


class StreamingLM:
    """The ``generate`` of a :class:`~rlhf_algos.protocols.TrainablePolicy` over a Hugging Face causal LM,
    one row at a time, streaming the new tokens' text to ``on_text`` (what a turn session needs).

    Log-probs as ``rlhf_hybrid.HybridEngine``'s ``hf`` path returns them (:func:`rlhf_hybrid.generation.generated_logprobs`).
    """

    def __init__(self, model, tokenizer) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.on_text: Callable[[str], None] = lambda _text: None

    def generate(self, input_ids, attention_mask, *, max_new_tokens: int, do_sample: bool = True,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, return_logprobs: bool = False):
        import torch
        from rlhf_hybrid.generation import generated_logprobs

        if input_ids.shape[0] != 1:
            raise ValueError(f"StreamingLM streams one row; got {input_ids.shape[0]}")
        device = next(self.model.parameters()).device
        stream = TextStream(self.tokenizer, self.on_text)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), max_new_tokens=max_new_tokens,
                do_sample=do_sample, temperature=temperature if do_sample else None,
                top_k=(top_k or None) if do_sample else None, top_p=top_p if do_sample else None,
                eos_token_id=eos_token_id, pad_token_id=pad_token_id, streamer=stream,
                return_dict_in_generate=True, output_logits=True)
        seqs = out.sequences  # (1, P + R)
        if not return_logprobs:
            return seqs
        new = seqs[:, input_ids.shape[1]:]
        return seqs, generated_logprobs(out.logits, new, temperature if do_sample else 1.0, eos_token_id)


class ShownSession:
    """A turn session that shows the conversation: the environment's reply (the ids appended before a
    turn, decoded) as ``env> ...``, then the model's turn streamed as ``model> ...``; ``inner`` does the work.
    ``turn_ends`` collects the index (after the prompt) of each turn's last token."""

    def __init__(self, inner, lm: StreamingLM, tokenizer) -> None:
        self.inner, self.tokenizer = inner, tokenizer
        self.turn_ends: list[int] = []
        self._length = 0  # trajectory tokens so far
        lm.on_text = lambda piece: _say(piece, nl=False)

    def turn(self, rows, appended, caps):
        if appended[0]:
            _say("env> " + reply_text(self.tokenizer, appended[0]))
        _say("model> ", nl=False)
        out = self.inner.turn(rows, appended, caps)
        _say("")
        self._length += len(appended[0]) + len(out[0][0])
        self.turn_ends.append(self._length - 1)
        return out


def _summary(batch, ends: list[int]) -> list[str]:
    """The episode's end, rewards and last ``info`` as printed lines (row 0 of ``batch``); ``ends``:
    the index of each model turn's last token (the per-turn rewards sit there, the last turn's is final)."""
    P = batch.prompt_len
    n = int(batch.attention_mask[0, P:].sum())
    model = batch.loss_mask[0, :n].tolist()
    turns = int(batch.num_turns[0])
    detail = batch.end_details[0] if batch.end_details else ""
    lines = [f"end: {batch.end_reasons[0]} after {turns} model turn{'s' * (turns != 1)}; {int(sum(model))} model + "
             f"{n - int(sum(model))} environment tokens after the prompt" + (f" ({detail})" if detail else "")]
    turn_rewards = [f"{float(batch.turn_rewards[0, j]):.6g}" for j in ends[:-1]]
    lines.append(f"reward: {float(batch.scores[0]):.6g}" + (f" (turn rewards: {', '.join(turn_rewards)})"
                                                           if turn_rewards else ""))
    info = batch.final_info[0] if batch.final_info else {}
    if info:
        lines.append("info: " + " ".join(f"{k}={v!r}" for k, v in info.items()))
    return lines


@dataclass
class EpisodeRunner:
    """Runs one episode per task with a loaded model; ``__call__`` prints it and returns the batch (None
    when the task does not fit the model's context)."""

    tokenizer: object
    model: object
    settings: GenerationSettings
    options: EnvOptions
    factory: Callable[[], object]
    system: str | None = None
    show_prompt: bool = False

    def budget(self, prompt_len: int, context: int | None):
        from rlhf_algos.environments import EpisodeBudget

        total = self.options.max_total_tokens
        if total is None:
            if context is None:
                raise ContextError("--max-total-tokens: the model's context length is unknown; give it")
            total = context - prompt_len
        elif context is not None and prompt_len + total > context:
            raise ContextError(f"--max-total-tokens: {total} tokens after a prompt of {prompt_len} exceed the "
                               f"model's context of {context} tokens; lower it (at most {context - prompt_len})")
        return EpisodeBudget(max_turns=self.options.max_turns, max_turn_tokens=self.settings.max_new_tokens,
                             max_total_tokens=total)

    def __call__(self, task: str):
        import torch
        from rlhf_algos.trajectories import make_session, run_episodes

        tok, gen = self.tokenizer, self.settings
        chat = ChatSession(tok, self.model, gen, system=self.system)
        try:
            ids, _ = chat.prompt_ids(task)  # rendered as in training; no history to drop
            budget = self.budget(len(ids), chat.context)
        except ContextError as e:
            _note(f"error: {e}")
            return None
        if self.show_prompt:
            _note(f"prompt ({len(ids)} tokens): {tok.decode(ids)!r}")
        prompt = torch.tensor([ids])  # (1, P)
        mask = torch.ones_like(prompt)
        lm = StreamingLM(self.model, tok)
        decode = functools.partial(tok.decode, skip_special_tokens=True)
        session = make_session(lm, prompt, mask, max_total_tokens=budget.max_total_tokens,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                               do_sample=gen.temperature > 0, temperature=gen.temperature or 1.0, top_k=0,
                               top_p=gen.top_p)
        record = {**self.options.meta, "prompt": decode(ids)}  # as a training rollout's record
        shown = ShownSession(session, lm, tok)
        batch = run_episodes(shown, [self.factory()], [record], budget=budget,
                             decode=decode, encode=lambda text: tok.encode(text, add_special_tokens=False),
                             prompt_ids=prompt, prompt_mask=mask, pad_token_id=tok.pad_token_id,
                             vocab_size=len(tok))
        for line in _summary(batch, shown.turn_ends):
            _say(line)
        return batch


def episode_loop(run: Callable[[str], object], read: Callable[[str], str]) -> None:
    """Read a task with ``read("you> ")`` (EOFError or ``/exit`` ends; an empty line is skipped) and run
    one episode on it."""
    for text in read_messages(read):
        if text.startswith("/") and " " not in text:
            _note(f"unknown command {text!r}; commands: /exit")
        else:
            run(text)


def chat_env(tokenizer, model, settings: GenerationSettings, options: EnvOptions, factory: Callable[[], object],
             prompt: str | None, system: str | None = None, show_prompt: bool = False) -> None:
    """One episode on ``prompt`` (exit status 2 when it does not fit), or one per line read from stdin."""
    import sys

    run = EpisodeRunner(tokenizer, model, settings, options, factory, system, show_prompt)
    if prompt is not None:
        if run(prompt) is None:
            raise typer.Exit(2)
        return
    _note(f"Episodes against the environment {options.name!r}: each message is a new task; the model's turns "
          "and the environment's replies follow until the episode ends. /exit or Ctrl-D ends the session.")
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input() on a terminal)
    episode_loop(run, input)


def check_env_flags(env: dict) -> tuple[EnvOptions, Callable[[], object]] | None:
    """``rlhf chat``'s environment flags (``name``, ``env_args``, ``meta``, ``max_turns``, ``max_total_tokens``)
    as options and the environment's factory; None without ``--env`` (then no other of them may be given)."""
    if env.get("name") is None:
        given = [flag for key, flag in ENV_ONLY_FLAGS.items() if env.get(key) not in (None, [], ())]
        if given:
            fail(f"{given[0]}: only with --env NAME (an environment to play against; `rlhf envs list`)")
        return None
    try:
        options = EnvOptions(env["name"], parse_pairs("--env-arg", env.get("env_args") or []),
                             parse_pairs("--meta", env.get("meta") or []),
                             4 if env.get("max_turns") is None else env["max_turns"], env.get("max_total_tokens"))
        return options, environment_factory(options.name, options.env_args)
    except ValueError as e:
        fail(str(e))
