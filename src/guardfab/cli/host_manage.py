"""``guardfab host manage`` and ``host audit``: the management API's set-up and its audit log.

Thin: each command loads the host configuration, calls :mod:`guardfab.host.manage`
and prints. Tokens are never printed: they are 0600 files for the fabric
administrator (``admin.token``) and a reviewer (``reviewer.token``).
"""

from __future__ import annotations

from pathlib import Path

import click

from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.errors import UsageError
from guardfab.host.config import config_path, load_config
from guardfab.host.manage.audit import ManagementAudit
from guardfab.host.manage.material import (
    ROLES,
    ManagementFiles,
    default_server_names,
    init_management,
    rotate_token,
)

config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Host configuration file [default: $GUARDFAB_HOST_CONFIG or /etc/guardfab/host.json].",
)


@click.group()
def manage() -> None:
    """The agent's management API: TLS material and role tokens (admin, reviewer)."""


@manage.command("init")
@config_option
@click.option(
    "--server-name",
    "server_names",
    multiple=True,
    help="A name or IP the API is reached by (repeat) [default: 127.0.0.1, localhost, hostname].",
)
@json_option
@handle_errors
def init(config_file: Path | None, server_names: tuple[str, ...], as_json: bool) -> None:
    """Create the management directory: a private CA, the API's certificate, two tokens.

    The agent serves the management API (what 'guardfab vm' talks to) only once
    this directory exists. Tokens are 0600 files, never printed.
    """
    config = load_config(config_path(config_file))
    files = init_management(config.management_dir, list(server_names) or default_server_names())
    data = {"dir": str(files.dir), "ca": str(files.ca)} | {
        f"{role}_token_file": str(files.token_file(role)) for role in ROLES
    }
    emit(as_json, data, "\n".join(f"{k}: {v}" for k, v in data.items()))


@manage.command("rotate")
@click.argument("role", type=click.Choice(ROLES))
@config_option
@handle_errors
def rotate(role: str, config_file: Path | None) -> None:
    """Give ROLE a new token; the old one is refused from the next request on."""
    config = load_config(config_path(config_file))
    path = rotate_token(ManagementFiles(config.management_dir), role)
    click.echo(f"new {role} token written to {path} (the old one is revoked)")


@click.group()
def audit() -> None:
    """The agent's audit log of management requests (hash-chained)."""


def _open_audit(config_file: Path | None) -> ManagementAudit:
    files = ManagementFiles(load_config(config_path(config_file)).management_dir)
    if not files.audit_db.exists():
        raise UsageError(
            f"no audit log at {files.audit_db} yet",
            hint="the agent creates it when it serves the management API",
        )
    return ManagementAudit(files.audit_db)


@audit.command("verify")
@config_option
@json_option
@handle_errors
def verify(config_file: Path | None, as_json: bool) -> None:
    """Check the whole chain: every record's hash and link, and the head."""
    log = _open_audit(config_file)
    try:
        report = log.verify()
    finally:
        log.close()
    data = {
        "records": report.records,
        "head_seq": report.head.seq,
        "head_hash": report.head.hash,
        "outcomes": report.outcomes,
    }
    emit(as_json, data, f"audit log OK: {report.records} records, head {report.head.hash[:16]}")


@audit.command("list")
@config_option
@json_option
@handle_errors
def list_records(config_file: Path | None, as_json: bool) -> None:
    """Print the records (role, operation, VM, outcome, reason), oldest first."""
    log = _open_audit(config_file)
    try:
        records = log.records()
    finally:
        log.close()
    rows = [
        {"seq": r.seq, "time": r.time, "actor": r.actor, "vm": r.subject, "outcome": r.outcome}
        | r.details
        for r in records
    ]
    lines = [
        f"{r['seq']}\t{r['time']}\t{r['actor']}\t{r['operation']}\t{r['vm']}\t{r['outcome']}\t"
        f"{r['reason']}"
        for r in rows
    ]
    emit(as_json, rows, "\n".join(lines) or "no records")
