"""``guardfab tenant``: the VM owner's tools (guardians, key protectors, PDKs)."""

from __future__ import annotations

import click

from guardfab.cli import tenant_guardian, tenant_kp, tenant_pdk


@click.group()
def tenant() -> None:
    """Tools a VM owner runs on their own machine: guardians, KPs, shielding data.

    Nothing here talks to a fabric: guardians, key protectors (KP) and
    shielding data files (PDK) are made offline and handed to the fabric.
    """


tenant.add_command(tenant_guardian.guardian)
tenant.add_command(tenant_kp.kp)
tenant.add_command(tenant_pdk.pdk)
