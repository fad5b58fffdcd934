"""``guardfab vm``: the fabric administrator's VM commands, as a client of the agent's API.

Thin: parse, read the tenant's files, call the guarded-host agent's management
API (:mod:`guardfab.host.manage`) over HTTPS, print. The agent runs every
operation in its own process, with itself as the key source, so no VM key
reaches this command. By default the API's URL, CA and the admin token file
come from the host configuration (``--config``); each can be overridden. The
token is read from a 0600 file, never from the command line.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.errors import UsageError
from guardfab.files import read_bounded
from guardfab.formats.encoding import b64url_encode
from guardfab.formats.shielding_data import MAX_SHIELDING_DATA_BYTES
from guardfab.host.config import config_path, load_config
from guardfab.host.manage import orchestrate
from guardfab.host.manage.client import ManagementClient, ManagementConnection

_file = click.Path(dir_okay=False, exists=True, path_type=Path)
_path = click.Path(dir_okay=False, path_type=Path)
_MAX_SMALL = 1024 * 1024


def _connection_options(func: Any) -> Any:
    options = [
        click.option(
            "--config",
            "config_file",
            type=_path,
            default=None,
            help="Host configuration (the API's address, CA and token files) "
            "[default: $GUARDFAB_HOST_CONFIG or /etc/guardfab/host.json].",
        ),
        click.option("--url", default=None, help="The management API's URL (overrides --config)."),
        click.option("--ca", "ca", type=_file, default=None, help="The API's CA certificate."),
        click.option(
            "--token-file",
            type=_file,
            default=None,
            help="A 0600 file holding the access token [default: the admin token of --config].",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _client(kwargs: dict[str, Any]) -> ManagementClient:
    """The API client from the connection options (popped from ``kwargs``)."""
    config_file = kwargs.pop("config_file")
    url, ca, token_file = kwargs.pop("url"), kwargs.pop("ca"), kwargs.pop("token_file")
    if url is not None and ca is not None and token_file is not None:
        return ManagementClient(ManagementConnection(url, ca, token_file))
    config = load_config(config_path(config_file))
    connection = ManagementConnection.of_host(config, url=url, ca=ca, token_file=token_file)
    return ManagementClient(connection)


@click.group()
def vm() -> None:
    """Shielded VMs on a guarded host, through its agent's management API.

    \b
    admin token:    new, start, stop, migrate, checkpoint, restore, settings,
                    console (where the VM's policy allows), key-protector
    reviewer token: list, show
    """


def _absolute(path: Path | None) -> str | None:
    return None if path is None else str(path.resolve())


@vm.command("new")
@click.argument("name")
@click.option("--template", type=_file, required=True, help="Template disk (a path on the host).")
@click.option("--template-sig", type=_file, required=True, help="The disk's signature file.")
@click.option("--pdk", type=_file, required=True, help="The VM's shielding data file.")
@click.option("--kp", type=_file, required=True, help="The VM's key protector.")
@click.option("--port", type=click.IntRange(1, 65535), help="Host port (127.0.0.1) to the VM.")
@click.option("--kernel", type=_file, default=None, help="Direct boot kernel (test guest).")
@click.option("--initrd", type=_file, default=None, help="Direct boot initramfs.")
@click.option("--cmdline", default="quiet", show_default=True, help="Kernel command line.")
@_connection_options
@json_option
@handle_errors
def new(name: str, as_json: bool, **kwargs: Any) -> None:
    """Provision VM NAME: the template checked against the PDK, encrypted disks made.

    The agent asks the KPS to open the PDK for this host: the secrets in it are
    never in this command's hands.
    """
    if (kwargs["kernel"] is None) != (kwargs["initrd"] is None):
        raise UsageError("give both --kernel and --initrd, or neither")
    body = {
        "name": name,
        "template": _absolute(kwargs.pop("template")),
        "template_sig": _encoded(kwargs.pop("template_sig"), _MAX_SMALL, "template signature"),
        "pdk": _encoded(kwargs.pop("pdk"), MAX_SHIELDING_DATA_BYTES, "shielding data"),
        "kp": _encoded(kwargs.pop("kp"), _MAX_SMALL, "key protector"),
        "port": kwargs.pop("port"),
        "kernel": _absolute(kwargs.pop("kernel")),
        "initrd": _absolute(kwargs.pop("initrd")),
        "cmdline": kwargs.pop("cmdline"),
    }
    record = _client(kwargs).provision(body)
    emit(as_json, record, f"VM {name} provisioned ({record['policy']})")


def _encoded(path: Path, limit: int, what: str) -> str:
    return b64url_encode(read_bounded(path, limit=limit, what=what))


def _simple(operation: str, help_text: str, done: str) -> None:
    @click.argument("name")
    @_connection_options
    @json_option
    @handle_errors
    def command(name: str, as_json: bool, **kwargs: Any) -> None:
        answer = _client(kwargs).action(name, operation)
        emit(as_json, answer, done.format_map({**answer, "name": name}))

    command.__doc__ = help_text
    vm.command(operation)(command)


_simple(
    "start",
    "Start VM NAME with keys the KPS releases to the host.",
    "VM {name} started (QEMU pid {pid})",
)
_simple("stop", "Stop VM NAME.", "VM {name} stopped (was running: {was_running})")
_simple(
    "checkpoint",
    "Save running VM NAME's state, encrypted, beside it, and stop it.",
    "VM {name} checkpointed to {checkpoint} ({bytes} bytes) and stopped",
)
_simple(
    "restore",
    "Start VM NAME from its checkpoint with keys the KPS releases to the host.",
    "VM {name} restored (QEMU pid {pid})",
)


def _destination(kwargs: dict[str, Any]) -> ManagementClient:
    """The destination's client, from its own options (never the source's token)."""
    config_file, url = kwargs.pop("to_config"), kwargs.pop("to_url")
    ca, token_file = kwargs.pop("to_ca"), kwargs.pop("to_token_file")
    if url is not None and ca is not None and token_file is not None:
        return ManagementClient(ManagementConnection(url, ca, token_file))
    if config_file is None:
        raise UsageError(
            "say where the destination is: --to-config FILE, or --to-url, --to-ca and "
            "--to-token-file"
        )
    config = load_config(config_file)
    return ManagementClient(
        ManagementConnection.of_host(config, url=url, ca=ca, token_file=token_file)
    )


@vm.command("migrate")
@click.argument("name")
@click.option(
    "--to-config",
    "--to",
    "to_config",
    type=_file,
    default=None,
    help="The destination host's configuration (its API's URL, CA and admin token file).",
)
@click.option("--to-url", default=None, help="The destination's management API URL.")
@click.option("--to-ca", type=_file, default=None, help="The destination API's CA certificate.")
@click.option(
    "--to-token-file", type=_file, default=None, help="A 0600 file: the destination's admin token."
)
@click.option("--port", type=click.IntRange(1, 65535), help="Port the destination listens on.")
@click.option(
    "--abort",
    "abort_only",
    is_flag=True,
    help="Finish an interrupted migration: the destination's key pair back to the source.",
)
@_connection_options
@json_option
@handle_errors
def migrate(name: str, port: int | None, abort_only: bool, as_json: bool, **kwargs: Any) -> None:
    """Live-migrate running VM NAME to another guarded host.

    This command drives both agents, each through its own API with its own
    admin token: the destination releases the VM's keys with its own health
    certificate; only public or sealed data passes through here.
    """
    dest = _destination(kwargs)
    source = _client(kwargs)
    if abort_only:
        answer = orchestrate.abort(source, dest, name)
        emit(as_json, answer, f"VM {name}: key pair taken back from the destination (pending)")
        return
    report = orchestrate.migrate(source, dest, name, port=port)
    text = (
        f"VM {name} migrated to {report.destination} (QEMU pid {report.pid}, "
        f"{report.total_time_ms} ms, downtime {report.downtime_ms} ms)"
    )
    emit(as_json, dataclasses.asdict(report), text)
    if report.warnings:
        raise orchestrate.MovedWithErrorsError(
            f"VM {name} moved, but: " + "; ".join(report.warnings)
        )


@vm.command("list")
@_connection_options
@json_option
@handle_errors
def list_vms(as_json: bool, **kwargs: Any) -> None:
    """List the VMs on the host (reviewer token is enough)."""
    rows = _client(kwargs).list()
    lines = [f"{r['name']}\t{r['policy']}\t{'running' if r['running'] else 'off'}" for r in rows]
    emit(as_json, rows, "\n".join(lines) or "no VMs")


@vm.command("show")
@click.argument("name")
@_connection_options
@json_option
@handle_errors
def show(name: str, as_json: bool, **kwargs: Any) -> None:
    """Show VM NAME (public facts only; reviewer token is enough)."""
    data = _client(kwargs).show(name)
    emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


@vm.command("settings")
@click.argument("name")
@click.option(
    "--console/--no-console",
    required=True,
    help="Give VM NAME a console (serial port), or take it away. Refused for a shielded VM.",
)
@_connection_options
@json_option
@handle_errors
def settings(name: str, console: bool, as_json: bool, **kwargs: Any) -> None:
    """Change VM NAME's settings where its policy allows (refusals are audited)."""
    data = _client(kwargs).settings(name, console=console)
    emit(as_json, data, f"VM {name}: console {'on' if console else 'off'}")


@vm.command("console")
@click.argument("name")
@_connection_options
@handle_errors
def console(name: str, **kwargs: Any) -> None:
    """Attach to VM NAME's console, where its policy allows (never for a shielded VM)."""
    answer = _client(kwargs).action(name, "console")
    from guardfab.hypervisor.console import relay  # noqa: PLC0415 - only once allowed

    relay(Path(answer["socket"]), sys.stdin.buffer, sys.stdout.buffer)


@vm.command("key-protector")
@click.argument("name")
@click.option(
    "--restore-last-known-good",
    is_flag=True,
    required=True,
    help="Go back to the VM's last known good key protector (after a failed re-key).",
)
@_connection_options
@json_option
@handle_errors
def key_protector(name: str, restore_last_known_good: bool, as_json: bool, **kwargs: Any) -> None:
    """Manage VM NAME's key protector."""
    if not restore_last_known_good:
        raise UsageError("say what to do: --restore-last-known-good")
    data = _client(kwargs).action(name, "key-protector/restore-last-known-good")
    emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))
