"""``guardfab tenant pdk``: shielding data files."""

from __future__ import annotations

import click


@click.group()
def pdk() -> None:
    """Shielding data files (PDK): a VM's secrets, readable only by its guardians."""
