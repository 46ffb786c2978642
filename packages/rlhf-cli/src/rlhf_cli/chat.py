"""``rlhf chat``: one answer, or a multi-turn session, with a model directory written by ``rlhf run``.

With ``--prompt`` the answer to that one message is printed (streamed) and the command exits. Without
it, messages are read line by line from the terminal (or from piped stdin) and answered in turn, each
with the conversation so far; ``/reset`` forgets the conversation, ``/exit`` or end of input (Ctrl-D)
ends the session. The conversation is rendered with the tokenizer's chat template, or in the plain
"Human:/Assistant:" format when the tokenizer has none (what training used for it; see
:mod:`rlhf_cli.chat_session`). With ``--env NAME`` each message is instead a task the model works on
against that environment, turn by turn (:mod:`rlhf_cli.chat_env`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import typer

from .chat_session import ChatSession, ContextError, GenerationSettings
from .errors import fail
from .preflight import preflight_chat

__all__ = ["COMMANDS", "chat", "run_turn", "session_loop"]

COMMANDS = {"/reset": "forget the conversation so far", "/exit": "end the session (so does Ctrl-D)"}
WELCOME = ("Multi-turn chat; each answer sees the conversation so far. " +
           "; ".join(f"{c}: {what}" for c, what in COMMANDS.items()) + ".")


def _say(text: str, nl: bool = True) -> None:
    typer.echo(text, nl=nl)
    sys.stdout.flush()


def _note(text: str) -> None:
    typer.echo(text, err=True)


def run_turn(session: ChatSession, text: str, show_prompt: bool, lead: str = "") -> bool:
    """Answer ``text``: notices on stderr, ``lead`` + the streamed answer + a newline on stdout.
    Returns False (nothing printed on stdout, history unchanged) when the message cannot fit."""
    try:
        ids, dropped = session.prompt_ids(text)
    except ContextError as e:
        _note(f"error: {e}")
        return False
    if dropped:
        _note(f"(history: dropped the oldest {dropped} turn(s) to fit the model's context of {session.context} "
              f"tokens with --max-new-tokens {session.settings.max_new_tokens})")
    if show_prompt:
        _note(f"prompt ({len(ids)} tokens): {session.tokenizer.decode(ids)!r}")
    _say(lead, nl=False)
    session.reply(text, on_text=lambda piece: _say(piece, nl=False))
    _say("")
    return True


def read_messages(read: Callable[[str], str]):
    """The user's messages, each read with ``read("you> ")`` and stripped, until EOFError (Ctrl-D) or
    ``/exit``; empty lines are skipped. Shared by the chat and the environment episodes."""
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            _say("")
            return
        if text == "/exit":
            return
        if text:
            yield text


def session_loop(session: ChatSession, read: Callable[[str], str], show_prompt: bool) -> None:
    """Read a message with ``read("you> ")`` (EOFError ends), answer it as ``model> ...``; the commands of
    :data:`COMMANDS` act on the session; an empty line is skipped."""
    for text in read_messages(read):
        if text == "/reset":
            session.reset()
            _note("(history cleared)")
        elif text.startswith("/") and " " not in text:  # a one-word "/..." that is no command
            _note(f"unknown command {text!r}; commands: {', '.join(COMMANDS)}")
        else:
            run_turn(session, text, show_prompt, lead="model> ")


def chat(model: str, prompt: str | None, settings: dict, system: str | None = None, show_prompt: bool = False,
         env: dict | None = None) -> None:
    """Check the settings and the model directory, then answer ``prompt`` or run a session on stdin.

    ``settings``: the :class:`~rlhf_cli.chat_session.GenerationSettings` fields, as given on the command line.
    ``env``: the environment flags (:func:`rlhf_cli.chat_env.check_env_flags`); with a ``name``, episodes
    against that environment instead of a conversation.
    """
    from .chat_env import chat_env, check_env_flags

    try:
        gen = GenerationSettings(**settings)
    except ValueError as e:
        fail(str(e))
    if system is not None and not system.strip():
        fail("--system: an empty system prompt is not allowed; leave --system out for none")
    episodes = check_env_flags(env or {})
    preflight_chat(model)
    import torch
    from rlhf_hybrid import load_causal_lm, load_tokenizer, trained_reward_head

    head = trained_reward_head(model)
    if head:  # it would load as a causal LM with an untrained output layer and answer gibberish
        fail(f"--model: {model!r} is a reward model ({head.replace('_', ' ')} head): it scores text and does not "
             f"write any; chat with a policy, e.g. <out>/sft or <out>/<algo> of a run")

    tok = load_tokenizer(model)
    # CUDA path written for GPU machines; the tests run it on the CPU only
    lm = load_causal_lm(model).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    if episodes is not None:
        chat_env(tok, lm, gen, *episodes, prompt, system=system, show_prompt=show_prompt)
        return
    session = ChatSession(tok, lm, gen, system=system)
    if prompt is not None:
        if not run_turn(session, prompt, show_prompt):
            raise typer.Exit(2)
        return
    _note(WELCOME)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input() on a terminal)
    session_loop(session, input, show_prompt)
