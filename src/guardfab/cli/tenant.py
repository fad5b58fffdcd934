"""``guardfab tenant``: the VM owner's tools (guardians, key protectors, PDKs)."""

from __future__ import annotations

import click


@click.group()
def tenant() -> None:
    """Tools a VM owner runs on their own machine: guardians, KPs, shielding data."""
