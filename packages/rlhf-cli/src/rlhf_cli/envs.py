"""``rlhf envs``: the environments of multi-turn rollouts (entry-point group ``rlhf.environments``)."""

from __future__ import annotations

import typer

from .errors import fail as _fail

__all__ = ["envs_app"]

envs_app = typer.Typer(help="Registered environments for multi-turn / tool-use rollouts (docs/environments.md).",
                       no_args_is_help=True)


@envs_app.command("list", help="Every environment registered under the entry-point group rlhf.environments.")
def envs_list() -> None:
    from rlhf_algos.environments import ENVIRONMENT_GROUP, EnvironmentLoadError, available_environments

    try:
        envs = available_environments()
    except (EnvironmentLoadError, ValueError) as e:
        _fail(str(e))
    if not envs:
        typer.echo(f"no environments registered under the entry-point group {ENVIRONMENT_GROUP!r}")
        return
    for name, cls in envs.items():
        typer.echo(f"{name}\t{cls.__module__}:{cls.__qualname__}\t{cls.description}")
