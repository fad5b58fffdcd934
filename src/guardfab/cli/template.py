"""``guardfab template``: template disk signing and verification."""

from __future__ import annotations

import click


@click.group()
def template() -> None:
    """Sign and verify template disks; write volume signature catalogs."""
