"""``guardfab tenant kp``: make, change and inspect key protectors.

The transport key a KP protects is never printed, logged or written in clear:
these commands only move wrappings around. Outputs are written last and
atomically, so a command that fails writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from guardfab.cli.common import (
    guardian_store,
    home_option,
    passphrase_file_option,
    read_passphrase,
)
from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.errors import NotAuthorizedError
from guardfab.formats import key_protector
from guardfab.formats.key_protector import KeyProtector, load_key_protector
from guardfab.tenant import kp as tenant_kp
from guardfab.tenant.guardians import GuardianKeys, GuardianStore


@click.group()
def kp() -> None:
    """Key protectors: a VM's transport key wrapped for each of its guardians.

    \b
    A key protector (KP) names an owner (your tenant guardian) and one or more
    fabric guardians (a fabric's HGS, imported with 'guardian import'). Any one
    of them can unwrap the VM's transport key; nobody else can. Only the owner's
    private keys can add or remove a guardian.
    """


_out_option = click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the key protector.",
)
_force_option = click.option("--force", is_flag=True, help="Replace --out if it exists.")
_kp_argument = click.argument(
    "kp_path", metavar="KP", type=click.Path(dir_okay=False, path_type=Path)
)


def _private_keys(store: GuardianStore, name: str, passphrase_file: Path | None) -> GuardianKeys:
    """Load guardian ``name``'s private keys; prompt for a passphrase only if they need one."""
    passphrase = read_passphrase(passphrase_file, prompt=False)
    try:
        return store.keys(name, passphrase)
    except NotAuthorizedError:
        if passphrase is not None:
            raise
        prompted = read_passphrase(None, prompt=True)
        if prompted is None:
            raise
        return store.keys(name, prompted)


def _rows(store: GuardianStore, protector: KeyProtector) -> dict[str, Any]:
    """The KP's public description plus what this machine knows of its guardians."""
    view = tenant_kp.local_view(store, protector)
    data = protector.summary()
    for row in data["guardians"]:
        row["local_name"] = view.local_names.get(row["id"])
    data["can_unwrap_here"] = view.can_unwrap
    return data


def _describe(data: dict[str, Any]) -> str:
    names = {g["id"]: g["name"] for g in data["guardians"]}
    signer_role = "the owner" if data["signer"] == data["owner"] else "a KPS re-key"
    lines = [
        f"key protector {data['kp_id']}  (generation {data['generation']},"
        f" format version {data['version']})",
        f"  owner:      {names[data['owner']]}  {data['owner']}",
        f"  signed by:  {names[data['signer']]}  {data['signer']}  ({signer_role})",
        f"  guardians ({len(data['guardians'])}):",
    ]
    for g in data["guardians"]:
        local = f"  local: {g['local_name']}" if g["local_name"] else ""
        lines.append(f"    {g['name']:<20} {g['kind']:<7} {g['role']:<9} {g['id']}{local}")
    unwrap = ", ".join(data["can_unwrap_here"]) or "none of them (no private keys here)"
    lines.append(f"  could unwrap here: {unwrap}")
    return "\n".join(lines)


def _finish(store: GuardianStore, data: bytes, out: Path, force: bool, as_json: bool) -> None:
    """Write the new KP and describe it."""
    tenant_kp.write_key_protector(out, data, force=force)
    rows = {**_rows(store, load_key_protector(data)), "path": str(out)}
    emit(as_json, rows, lambda: f"wrote {out}\n" + _describe(rows))


@kp.command("new")
@click.option("--owner", required=True, help="Your tenant guardian (its private keys sign).")
@click.option(
    "--guardian",
    "guardians",
    multiple=True,
    required=True,
    help="A guardian that may unwrap, e.g. a fabric's HGS guardian (repeat for several).",
)
@_out_option
@_force_option
@passphrase_file_option
@home_option
@json_option
@handle_errors
def new(
    owner: str,
    guardians: tuple[str, ...],
    out: Path,
    force: bool,
    passphrase_file: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Make a key protector for a fresh random transport key.

    The key is wrapped for --owner and every --guardian and then forgotten: the
    owner (or a guardian) unwraps it when it is needed.
    """
    store = guardian_store(home)
    tenant_kp.check_output(out, force=force)
    documents = tenant_kp.guardian_documents(store, guardians)
    owner_keys = _private_keys(store, owner, passphrase_file)
    data, _key = key_protector.create_key_protector(owner_keys, documents)
    _finish(store, data, out, force, as_json)


@kp.command("grant")
@_kp_argument
@click.option("--guardian", required=True, help="Local name of the guardian to add.")
@_out_option
@_force_option
@passphrase_file_option
@home_option
@json_option
@handle_errors
def grant(
    kp_path: Path,
    guardian: str,
    out: Path,
    force: bool,
    passphrase_file: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Write a new generation of KP with one more guardian (needs the owner's keys)."""
    store = guardian_store(home)
    tenant_kp.check_output(out, force=force)
    protector = tenant_kp.read_key_protector(kp_path)
    document = store.document(guardian)
    owner_keys = _private_keys(store, tenant_kp.owner_name(store, protector), passphrase_file)
    data = key_protector.grant(protector, owner_keys, document)
    _finish(store, data, out, force, as_json)


@kp.command("revoke")
@_kp_argument
@click.option(
    "--guardian", required=True, help="Guardian to remove: its id, or its local or KP name."
)
@_out_option
@_force_option
@passphrase_file_option
@home_option
@json_option
@handle_errors
def revoke(
    kp_path: Path,
    guardian: str,
    out: Path,
    force: bool,
    passphrase_file: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Write a new generation of KP without one guardian (needs the owner's keys).

    The transport key stays the same: the revoked guardian cannot unwrap the new
    KP, but copies of older KPs it was part of still name it.
    """
    store = guardian_store(home)
    tenant_kp.check_output(out, force=force)
    protector = tenant_kp.read_key_protector(kp_path)
    guardian_id = tenant_kp.resolve_guardian_id(store, protector, guardian)
    owner_keys = _private_keys(store, tenant_kp.owner_name(store, protector), passphrase_file)
    data = key_protector.revoke(protector, owner_keys, guardian_id)
    _finish(store, data, out, force, as_json)


@kp.command("upgrade")
@_kp_argument
@_out_option
@_force_option
@passphrase_file_option
@home_option
@json_option
@handle_errors
def upgrade(
    kp_path: Path,
    out: Path,
    force: bool,
    passphrase_file: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Re-sign KP's guardian set in the current format (a new generation, same key).

    A version-1 KP names each KPS by one of its encryption keys, so its KPS cannot
    move it to a rotated key; from version 2 on it can, with no action of yours.
    """
    store = guardian_store(home)
    tenant_kp.check_output(out, force=force)
    protector = tenant_kp.read_key_protector(kp_path)
    owner_keys = _private_keys(store, tenant_kp.owner_name(store, protector), passphrase_file)
    data = key_protector.upgrade(protector, owner_keys)
    _finish(store, data, out, force, as_json)


@kp.command("show")
@_kp_argument
@click.option(
    "--expect-owner",
    default=None,
    metavar="ID",
    help="Fail unless the KP's owner has this guardian id.",
)
@home_option
@json_option
@handle_errors
def show(kp_path: Path, expect_owner: str | None, home: Path | None, as_json: bool) -> None:
    """Verify KP and show its guardians (ids, kinds, who could unwrap here; no secrets)."""
    protector = tenant_kp.read_key_protector(kp_path, expected_owner=expect_owner)
    rows = _rows(guardian_store(home), protector)
    emit(as_json, rows, lambda: _describe(rows))
