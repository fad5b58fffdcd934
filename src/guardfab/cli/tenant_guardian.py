"""``guardfab tenant guardian``: create, export, import and list guardians."""

from __future__ import annotations

from pathlib import Path

import click

from guardfab.cli.common import (
    guardian_store,
    home_option,
    passphrase_file_option,
    read_passphrase,
)
from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.files import PUBLIC, atomic_write, read_bounded
from guardfab.formats.guardian import (
    MAX_GUARDIAN_BYTES,
    Guardian,
    KeyAlgorithm,
    load_guardian_document,
)


@click.group()
def guardian() -> None:
    """Guardians: named key pairs (encryption + signing) that may own or run a VM.

    Your own guardian (the owner) is made with 'new'; a fabric's HGS guardian is
    brought in with 'import' from the metadata its administrator publishes.
    """


def _describe(g: Guardian, *, private: bool) -> str:
    s = g.summary()
    return (
        f"{s['name']}  ({s['kind']}, {'private keys here' if private else 'public only'})\n"
        f"  id:              {s['id']}\n"
        f"  signing:         {s['signing_alg']}\n"
        f"  key wrapping:    {s['wrapping_alg']}  (recipient id {s['encryption_kid']})"
    )


@guardian.command("new")
@click.argument("name")
@click.option(
    "--algorithm",
    type=click.Choice([a.value for a in KeyAlgorithm]),
    default=KeyAlgorithm.EC_P384.value,
    show_default=True,
    help="Key family: ec-p384/ec-p256 (ES384/ES256 + ECDH-ES+A256KW) or rsa-3072 "
    "(PS256 + RSA-OAEP-256).",
)
@click.option(
    "--encrypt-keys/--no-encrypt-keys",
    default=False,
    help="Encrypt the private keys (PKCS#8) under a passphrase from --passphrase-file or a prompt.",
)
@passphrase_file_option
@home_option
@json_option
@handle_errors
def new(
    name: str,
    algorithm: str,
    encrypt_keys: bool,
    passphrase_file: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Create guardian NAME: two fresh key pairs, private keys written 0600."""
    passphrase = None
    if encrypt_keys or passphrase_file:
        passphrase = read_passphrase(passphrase_file, prompt=True, confirm=True)
        if not passphrase:
            raise click.UsageError("--encrypt-keys needs --passphrase-file or a terminal prompt")
    g = guardian_store(home).create(name, KeyAlgorithm(algorithm), passphrase)
    emit(as_json, g.summary(), lambda: "created guardian " + _describe(g, private=True))


@guardian.command("export")
@click.argument("name")
@click.option(
    "--out",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the public guardian document.",
)
@home_option
@json_option
@handle_errors
def export(name: str, out: Path, home: Path | None, as_json: bool) -> None:
    """Write the public, self-signed document of guardian NAME (no private keys)."""
    store = guardian_store(home)
    g = store.get(name)
    atomic_write(out, store.document(name), mode=PUBLIC)
    emit(as_json, {**g.summary(), "path": str(out)}, f"wrote {out} (guardian {g.name}, id {g.id})")


@guardian.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Store it under this name instead of its own.")
@click.option(
    "--expect-id",
    default=None,
    help="Refuse the import unless the guardian's id is this one (obtained out of band).",
)
@home_option
@json_option
@handle_errors
def import_(
    path: Path, name: str | None, expect_id: str | None, home: Path | None, as_json: bool
) -> None:
    """Import a public guardian document from PATH, e.g. a fabric's HGS guardian.

    Compare the id printed with the one the fabric's administrator gave you by
    another channel, or pass it as --expect-id.
    """
    data = read_bounded(path, limit=MAX_GUARDIAN_BYTES, what="guardian document")
    store = guardian_store(home)
    if expect_id is not None:
        found = load_guardian_document(data).id
        if found != expect_id:
            raise click.ClickException(f"guardian id is {found}, not the expected {expect_id}")
    g = store.add_public(data, name)
    emit(as_json, g.summary(), lambda: "imported guardian " + _describe(g, private=False))


@guardian.command("list")
@home_option
@json_option
@handle_errors
def list_(home: Path | None, as_json: bool) -> None:
    """List the guardians in the store."""
    store = guardian_store(home)
    rows = [
        {**store.get(n).summary(), "local_name": n, "private": store.has_private_keys(n)}
        for n in store.names()
    ]

    def human() -> str:
        if not rows:
            return "no guardians yet: create one with 'guardfab tenant guardian new NAME'"
        return "\n".join(
            f"{r['local_name']:<24} {r['kind']:<7} {'private' if r['private'] else 'public ':<8}"
            f" {r['id']}"
            for r in rows
        )

    emit(as_json, rows, human)


@guardian.command("show")
@click.argument("name")
@home_option
@json_option
@handle_errors
def show(name: str, home: Path | None, as_json: bool) -> None:
    """Show guardian NAME: id, kind and algorithms (never private keys)."""
    store = guardian_store(home)
    g = store.get(name)
    private = store.has_private_keys(name)
    emit(as_json, {**g.summary(), "private": private}, lambda: _describe(g, private=private))
