"""The CLI's one error boundary: a user's mistake is one ``error:`` line and exit 2; a bug is a traceback.

Every command that reads user input (``rlhf run``, ``rlhf chat``, ``rlhf data ...``) is wrapped in
:func:`user_errors`. What counts as the user's (or the environment's) mistake: a bad setting
(:class:`~rlhf_cli.config.ConfigError`), a problem with the run's inputs or outputs
(:class:`~rlhf_cli.context.PipelineError`, :class:`~rlhf_cli.preflight.PreflightError`), unreadable
data (``rlhf_data.DataError``), training that diverged (``rlhf_hybrid.NonFiniteError``), a file the
system refuses (``OSError``: missing, permission denied, disk full) and ``ValueError`` (the libraries'
checks of their arguments raise it, naming the field). Anything else is a bug of ours: its traceback
is printed, then one line asking to report it, and the exit status is 1. ``RLHF_DEBUG=1`` prints the
traceback of a user error too (before its line).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback

import typer

__all__ = ["fail", "nonfinite_message", "one_line", "user_errors"]

# the learning-rate key of the model each stage trains ("critic": the online algorithms' critic)
_LR_KEYS = {"sft": "sft.lr", "rm": "rm.lr", "actor": "rl.actor_lr", "critic": "rl.critic_lr", "offline": "pref.lr"}


def fail(msg: str, code: int = 2):
    """Print ``error: <msg>`` (each line of a multi-problem message as its own ``error:`` line) and exit."""
    for line in str(msg).splitlines() or [""]:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def one_line(e: BaseException) -> str:
    """A user error as one line: an OSError as ``path: problem``, anything else its message (whitespace
    collapsed: library messages may span lines)."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}" + (f" (and {e.filename2})" if e.filename2 else "")
    text = " ".join(str(e).split()) or type(e).__name__  # library messages may span lines
    return text if len(text) <= 2000 else text[:2000] + " ..."


def nonfinite_message(cfg, stage: str, err) -> str:
    """The error of a stage stopped by the non-finite guard: the stage, the step and the likely setting."""
    kind = getattr(cfg.algorithm(), "kind", "") if stage not in ("sft", "rm") else stage
    key = _LR_KEYS.get(err.name if kind == "online" else ("offline" if kind == "offline" else stage), "the learning rate")
    section, _, name = key.partition(".")
    value = getattr(getattr(cfg, section, None), name, None)
    what = f"loss {err.loss}" if err.loss is not None else "non-finite gradients"
    model = f"{stage} model" if err.name == "model" else err.name
    return (f"{stage}: training diverged: {err.consecutive} optimizer steps in a row of the {model} had a non-finite "
            f"loss or gradient norm (stopped at optimizer step {err.step}: {what}; train.max_nonfinite_steps="
            f"{cfg.train.max_nonfinite_steps}); each was skipped and nothing was saved for {stage}. Likely cause: "
            f"{key}={value!r} is too large; lower it")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from .config import ConfigError
    from .preflight import PreflightError

    types: list[type[BaseException]] = [ConfigError, PreflightError, OSError, ValueError, UnicodeError]
    for mod, name in (("rlhf_cli.context", "PipelineError"), ("rlhf_data", "DataError"),
                      ("rlhf_hybrid.guards", "NonFiniteError")):
        module = sys.modules.get(mod)  # only when loaded: a module that was never imported raised nothing
        if module is not None and hasattr(module, name):
            types.append(getattr(module, name))
    return tuple(types)


def user_errors(fn):
    """Wrap a Typer command: user errors -> one ``error:`` line, exit 2; bugs -> traceback + a report line, exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - this is the boundary
            if isinstance(e, _user_error_types()):
                if os.environ.get("RLHF_DEBUG") == "1":  # where a user error came from, for bug reports
                    traceback.print_exc()
                fail(one_line(e))
            traceback.print_exc()
            typer.echo(f"error: internal error ({type(e).__name__}): this is a bug in rlhf, not in your input; "
                       f"please report it to the rlhf project's issue tracker with the command, the output of "
                       f"`rlhf env` and the traceback above", err=True)
            raise typer.Exit(1) from None

    return wrapper
