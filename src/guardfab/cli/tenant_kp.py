"""``guardfab tenant kp``: key protectors."""

from __future__ import annotations

import click


@click.group()
def kp() -> None:
    """Key protectors: a VM's transport key wrapped for each of its guardians."""
