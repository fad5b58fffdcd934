"""The ``guardfab`` command: one entry point, one group per role."""

from __future__ import annotations

import click

import guardfab.cli.hgs_admin  # noqa: F401 - attaches the admin commands to 'hgs'
from guardfab import __version__
from guardfab.cli import (
    eventlog,
    hgs,
    hgs_kps,  # noqa: F401 - attaches the key protection commands to 'hgs'
    host,
    template,
    tenant,
    vm,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="guardfab")
def cli() -> None:
    """guardfab: a guarded fabric for Linux/KVM.

    Shielded VMs run only on hosts that the Host Guardian Service (HGS) has
    attested healthy; their keys stay wrapped for the tenant's chosen guardians.

    \b
    Role groups:
      tenant     guardians, key protectors and shielding data (on the tenant's machine)
      template   sign and verify template disks, volume signature catalogs
      hgs        run and administer the Host Guardian Service
      host       make this KVM host a guarded host (attestation agent, status, diagnose)
      eventlog   read a TCG PC Client boot event log
      vm         shielded VMs on this guarded host (provision, start, stop)
    """


cli.add_command(tenant.tenant)
cli.add_command(template.template)
cli.add_command(hgs.hgs)
cli.add_command(host.host)
cli.add_command(eventlog.eventlog)
cli.add_command(vm.vm)


def main() -> None:
    """Console-script entry point."""
    cli()
