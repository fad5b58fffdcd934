"""``guardfab eventlog``: show a TCG PC Client event log to a person."""

from __future__ import annotations

import click


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
def eventlog(path: str) -> None:  # noqa: ARG001 - placeholder
    """Parse and replay the event log at PATH."""
    raise click.ClickException("not implemented yet")
