"""``guardfab vm``: provision, start, stop and list shielded VMs on this guarded host.

Thin: parse, call :mod:`guardfab.hypervisor.provision` / :mod:`.power`, print.
Keys come from the host agent (``--config``: its Unix socket), which brings a
valid health certificate. VMs live under ``--vms`` (one directory each).

First slice (issue 6): the PDK's secrets are opened with a guardian from the
local guardian store (``--guardian``), standing in for the KPS, which opens
them in the reference; ``vm console`` is refused for shielded VMs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from guardfab.cli.common import guardian_store, home_option, passphrase_file_option, read_passphrase
from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.errors import NotAuthorizedError, UsageError
from guardfab.files import read_bounded
from guardfab.formats.shielding_data import MAX_SHIELDING_DATA_BYTES, SecurityPolicy
from guardfab.host.config import config_path, load_config
from guardfab.host.localapi import AgentClient
from guardfab.hypervisor.checkpoint import checkpoint_vm, restore_vm
from guardfab.hypervisor.migrate import attach, free_local_port, migrate_vm
from guardfab.hypervisor.power import power_off, power_on, running_pid
from guardfab.hypervisor.provision import ProvisionRequest, VmRecord, load_record, provision
from guardfab.hypervisor.spec import DirectKernel, VmSpec
from guardfab.hypervisor.vm import QemuVm, VmRuntime

_file = click.Path(dir_okay=False, exists=True, path_type=Path)
_MAX_SMALL = 1024 * 1024
DEFAULT_VMS = Path("/var/lib/guardfab/vms")

vms_option = click.option(
    "--vms",
    "vms_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_VMS,
    show_default=True,
    help="Directory holding this host's VMs.",
)
config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Host configuration (the agent's socket) [default: /etc/guardfab/host.json].",
)


@click.group()
def vm() -> None:
    """Shielded VMs on this guarded host (keys released through KPS)."""


def _agent(config_file: Path | None) -> AgentClient:
    return AgentClient(load_config(config_path(config_file)).socket)


def _boot(kernel: Path | None, initrd: Path | None, cmdline: str) -> DirectKernel | None:
    if (kernel is None) != (initrd is None):
        raise UsageError("give both --kernel and --initrd, or neither")
    if kernel is None or initrd is None:
        return None
    return DirectKernel(kernel.resolve(), initrd.resolve(), cmdline)


@vm.command("new")
@click.argument("name")
@click.option("--template", "template", type=_file, required=True, help="Template disk.")
@click.option("--template-sig", type=_file, required=True, help="The disk's signature file.")
@click.option("--pdk", type=_file, required=True, help="The VM's shielding data file.")
@click.option("--kp", type=_file, required=True, help="The VM's key protector.")
@click.option("--guardian", required=True, help="Guardian that opens the PDK (stands in for KPS).")
@click.option("--port", type=int, default=None, help="Host port (127.0.0.1) to the VM's page.")
@click.option("--kernel", type=_file, default=None, help="Direct boot kernel (test guest).")
@click.option("--initrd", type=_file, default=None, help="Direct boot initramfs.")
@click.option("--cmdline", default="quiet", show_default=True, help="Kernel command line.")
@vms_option
@config_option
@home_option
@passphrase_file_option
@json_option
@handle_errors
def new(
    name: str,
    template: Path,
    template_sig: Path,
    pdk: Path,
    kp: Path,
    guardian: str,
    port: int | None,
    kernel: Path | None,
    initrd: Path | None,
    cmdline: str,
    vms_dir: Path,
    config_file: Path | None,
    home: Path | None,
    passphrase_file: Path | None,
    as_json: bool,
) -> None:
    """Provision VM NAME: verify the template against the PDK, make its encrypted disks."""
    request = ProvisionRequest(
        name=name,
        template_disk=template,
        template_sig=read_bounded(template_sig, limit=_MAX_SMALL, what="template signature"),
        pdk=read_bounded(pdk, limit=MAX_SHIELDING_DATA_BYTES, what="shielding data"),
        kp=read_bounded(kp, limit=_MAX_SMALL, what="key protector"),
        boot=_boot(kernel, initrd, cmdline),
        host_port=port,
    )
    keys = guardian_store(home).keys(guardian, read_passphrase(passphrase_file, prompt=True))
    record = provision(
        request,
        vms_dir,
        reveal_secrets=lambda data: data.reveal(keys),
        key_source=_agent(config_file),
    )
    emit(as_json, _summary(record, vms_dir), f"VM {name} provisioned ({record.policy.value})")


@vm.command("start")
@click.argument("name")
@vms_option
@config_option
@json_option
@handle_errors
def start(name: str, vms_dir: Path, config_file: Path | None, as_json: bool) -> None:
    """Start VM NAME with keys the KPS releases to this host."""
    runtime = power_on(vms_dir / name, _agent(config_file))
    pid = getattr(runtime, "pid", None)
    emit(as_json, {"name": name, "pid": pid}, f"VM {name} started (QEMU pid {pid})")


@vm.command("stop")
@click.argument("name")
@vms_option
@handle_errors
def stop(name: str, vms_dir: Path) -> None:
    """Stop VM NAME."""
    load_record(vms_dir / name)
    stopped = power_off(vms_dir / name)
    click.echo(f"VM {name} stopped" if stopped else f"VM {name} was not running")


@vm.command("migrate")
@click.argument("name")
@click.option(
    "--to",
    "to_config",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The destination host's configuration (its agent brings its health certificate).",
)
@click.option(
    "--to-vms",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The destination host's VM directory (shared storage with --vms).",
)
@click.option("--port", type=int, default=None, help="127.0.0.1 port for the stream.")
@vms_option
@json_option
@handle_errors
def migrate(
    name: str, to_config: Path, to_vms: Path, port: int | None, vms_dir: Path, as_json: bool
) -> None:
    """Live-migrate running VM NAME to another guarded host (keys through its own release)."""
    source = attach(vms_dir / name)
    result = migrate_vm(
        source,
        vms_dir / name,
        to_vms / name,
        _agent(to_config),
        port=port if port is not None else free_local_port(),
    )
    stats = result.stats
    data = {
        "name": name,
        "pid": result.vm.pid,
        "total_time_ms": stats.total_time_ms,
        "downtime_ms": stats.downtime_ms,
        "transferred_bytes": stats.transferred_bytes,
    }
    text = (
        f"VM {name} migrated to {to_vms / name} (QEMU pid {result.vm.pid}, "
        f"{stats.total_time_ms} ms, downtime {stats.downtime_ms} ms)"
    )
    emit(as_json, data, text)


@vm.command("checkpoint")
@click.argument("name")
@vms_option
@config_option
@handle_errors
def checkpoint(name: str, vms_dir: Path, config_file: Path | None) -> None:
    """Save running VM NAME's state, encrypted, beside it, and stop it."""
    path = checkpoint_vm(attach(vms_dir / name), vms_dir / name, _agent(config_file))
    click.echo(f"VM {name} checkpointed to {path} ({path.stat().st_size} bytes) and stopped")


def _qemu(spec: VmSpec, state_dir: Path) -> VmRuntime:
    return QemuVm(spec, state_dir)


@vm.command("restore")
@click.argument("name")
@vms_option
@config_option
@handle_errors
def restore(name: str, vms_dir: Path, config_file: Path | None) -> None:
    """Start VM NAME from its checkpoint with keys the KPS releases to this host."""
    runtime = restore_vm(vms_dir / name, _agent(config_file), _qemu)
    click.echo(f"VM {name} restored (QEMU pid {runtime.pid})")


def _summary(record: VmRecord, vms_dir: Path) -> dict[str, Any]:
    return {
        "name": record.name,
        "policy": record.policy.value,
        "pdk_id": record.pdk_id,
        "template": record.template,
        "host_port": record.host_port,
        "running": running_pid(vms_dir / record.name) is not None,
    }


@vm.command("list")
@vms_option
@json_option
@handle_errors
def list_vms(vms_dir: Path, as_json: bool) -> None:
    """List the VMs on this host."""
    names = sorted(p.parent.name for p in vms_dir.glob("*/vm.json")) if vms_dir.is_dir() else []
    rows = [_summary(load_record(vms_dir / n), vms_dir) for n in names]
    lines = [f"{r['name']}\t{r['policy']}\t{'running' if r['running'] else 'off'}" for r in rows]
    emit(as_json, rows, "\n".join(lines) or "no VMs")


@vm.command("show")
@click.argument("name")
@vms_option
@json_option
@handle_errors
def show(name: str, vms_dir: Path, as_json: bool) -> None:
    """Show VM NAME (public facts only)."""
    data = _summary(load_record(vms_dir / name), vms_dir)
    emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


@vm.command("console")
@click.argument("name")
@vms_option
@handle_errors
def console(name: str, vms_dir: Path) -> None:
    """Attach to VM NAME's console (never for a shielded VM)."""
    record = load_record(vms_dir / name)
    if record.policy is SecurityPolicy.SHIELDED:
        raise NotAuthorizedError(
            f"VM {name} is shielded: it has no console, serial port or debugger",
            hint="reach it through its own network services (its page, SSH or RDP)",
        )
    raise UsageError(f"VM {name}: consoles for encryption-supported VMs are not built yet")
