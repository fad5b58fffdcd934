"""``guardfab tenant pdk``: shielding data files.

Secrets never come from the command line (``ps`` and shell history would show
them): the administrator password is read from a file or a hidden prompt, and
everything else from files.
"""

from __future__ import annotations

import sys
import textwrap
import time
from datetime import UTC, datetime
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
from guardfab.errors import NotAuthorizedError, UsageError
from guardfab.files import PRIVATE, atomic_write
from guardfab.formats.shielding_data import (
    SecurityPolicy,
    ShieldingDataHeader,
    load_shielding_data,
)
from guardfab.formats.shielding_secrets import (
    AdminCredentials,
    AnswerFile,
    AnswerFileKind,
    HostCertificate,
    HostCertificateKind,
    ShieldingSecrets,
)
from guardfab.tenant import pdk as tenant_pdk
from guardfab.tenant.guardians import GuardianKeys, GuardianStore

_PATH = click.Path(dir_okay=False, path_type=Path)


@click.group()
def pdk() -> None:
    """Shielding data files (PDK): a VM's secrets, readable only by its guardians.

    A PDK holds the administrator credentials, an answer file (unattend.xml or
    cloud-init user-data), other small files, an RDP/SSH host certificate, the
    security policy and the volume ID qualifiers of the template disks the VM may
    be made from. It is sealed for you (the owner) and the fabrics you name, and
    signed by you. A fabric can read its public header, never its secrets.

    \b
    Example:
      guardfab tenant pdk new --name web01 --owner me --guardian contoso-hgs \\
          --policy shielded --admin-user Administrator \\
          --admin-password-file pw.txt --answer-file unattend.xml \\
          --answer-file-kind unattend --qualifier ws2022.qualifier.json \\
          --out web01.pdk
      guardfab tenant pdk show web01.pdk
    """


def _load_keys(store: GuardianStore, name: str, passphrase_file: Path | None) -> GuardianKeys:
    """The private keys of guardian ``name``; prompt for a passphrase only if they need one."""
    if passphrase_file is not None:
        return store.keys(name, read_passphrase(passphrase_file, prompt=False))
    try:
        return store.keys(name, None)
    except NotAuthorizedError:
        if not sys.stdin.isatty():
            raise
        passphrase: Any = click.prompt(f"Passphrase of guardian {name!r}", hide_input=True)
        return store.keys(name, str(passphrase))


def _admin_password(path: Path | None) -> str:
    if path is not None:
        return tenant_pdk.read_admin_password(path)
    if not sys.stdin.isatty():
        raise UsageError(
            "no administrator password: give --admin-password-file or run on a terminal",
            hint="passwords are never taken as option values",
        )
    value: Any = click.prompt("Administrator password", hide_input=True, confirmation_prompt=True)
    return str(value)


def _answer_file(path: Path | None, kind: str | None) -> AnswerFile | None:
    if (path is None) != (kind is None):
        raise UsageError("--answer-file and --answer-file-kind go together")
    if path is None or kind is None:
        return None
    return tenant_pdk.read_answer_file(path, AnswerFileKind(kind))


def _host_certificate(
    certificate: Path | None, key: Path | None, kind: str | None
) -> HostCertificate | None:
    given = [value is not None for value in (certificate, key, kind)]
    if any(given) and not all(given):
        raise UsageError("--host-certificate, --host-key and --host-cert-kind go together")
    if certificate is None or key is None or kind is None:
        return None
    return tenant_pdk.read_host_certificate(certificate, key, HostCertificateKind(kind))


def _describe_header(header: ShieldingDataHeader) -> str:
    s = header.summary()
    created = datetime.fromtimestamp(header.created_at, UTC).isoformat().replace("+00:00", "Z")
    guardians = "\n".join(f"    {g['name']}  ({g['kind']}, id {g['id']})" for g in s["guardians"])
    qualifiers = "\n".join(
        f"    {q['name']} {q['rule']} {q['disk_version']}  (publisher {q['publisher']})"
        for q in s["qualifiers"]
    )
    return (
        f"shielding data {header.name!r}\n"
        f"  pdk id:       {header.pdk_id}\n"
        f"  policy:       {header.policy.value}\n"
        f"  owner:        {s['owner']['name']}  (id {s['owner']['id']})\n"
        f"  guardians:\n{guardians}\n"
        f"  KP guardians: {', '.join(header.kp_guardians)}\n"
        f"  qualifiers:\n{qualifiers or '    none (no template disk qualifies)'}\n"
        f"  created:      {created}\n"
        f"  answer file:  {header.answer_file_kind.value}\n"
        f"  secrets:      sealed for the owner and {len(header.guardians)} guardian(s)"
    )


@pdk.command("new")
@click.option("--name", required=True, help="A label for the VM or its role (1-255 characters).")
@click.option(
    "--owner",
    required=True,
    help="Your guardian (private keys in this store): it signs the file and can always open it.",
)
@click.option(
    "--guardian",
    "guardians",
    multiple=True,
    required=True,
    help="The imported HGS guardian of a fabric that may run the VM; repeat for each fabric.",
)
@click.option(
    "--policy",
    type=click.Choice([p.value for p in SecurityPolicy]),
    required=True,
    help="shielded: every protection locked on (no console, serial or debugger); "
    "encryption-supported: protections a trusted fabric administrator may configure.",
)
@click.option("--admin-user", required=True, help="Name of the VM's administrator account.")
@click.option(
    "--admin-password-file",
    type=_PATH,
    default=None,
    help="File holding the administrator password (one trailing newline is dropped). "
    "Without it the password is asked for on the terminal; it is never an option value.",
)
@click.option("--answer-file", type=_PATH, default=None, help="unattend.xml or user-data file.")
@click.option(
    "--answer-file-kind",
    type=click.Choice([AnswerFileKind.UNATTEND.value, AnswerFileKind.CLOUD_INIT.value]),
    default=None,
    help="What --answer-file is: a Windows unattend.xml or cloud-init user-data.",
)
@click.option(
    "--file",
    "files",
    type=_PATH,
    multiple=True,
    help="Another file for the VM, kept under its base name; repeatable. The answer file "
    "and these files take 384 KiB at most.",
)
@click.option("--host-certificate", type=_PATH, default=None, help="RDP or SSH host certificate.")
@click.option("--host-key", type=_PATH, default=None, help="Its unencrypted private key.")
@click.option(
    "--host-cert-kind",
    type=click.Choice([k.value for k in HostCertificateKind]),
    default=None,
    help="ssh: OpenSSH host certificate + key; rdp: PEM X.509 certificate + key.",
)
@click.option(
    "--qualifier",
    "qualifiers",
    type=_PATH,
    multiple=True,
    help="Volume ID qualifier file: a template disk the VM may be made from; repeatable. "
    "With none, no template disk qualifies.",
)
@click.option("--out", "-o", type=_PATH, required=True, help="Where to write the PDK.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@passphrase_file_option
@home_option
@json_option
@handle_errors
def new(
    name: str,
    owner: str,
    guardians: tuple[str, ...],
    policy: str,
    admin_user: str,
    admin_password_file: Path | None,
    answer_file: Path | None,
    answer_file_kind: str | None,
    files: tuple[Path, ...],
    host_certificate: Path | None,
    host_key: Path | None,
    host_cert_kind: str | None,
    qualifiers: tuple[Path, ...],
    out: Path,
    force: bool,
    passphrase_file: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Create a shielding data file sealed for --owner and every --guardian.

    Nothing is written unless every input reads and checks out.
    """
    if out.exists() and not force:
        raise UsageError(f"{out} already exists", hint="choose another --out or pass --force")
    store = guardian_store(home)
    request = tenant_pdk.PdkRequest(
        name=name,
        guardians=guardians,
        policy=SecurityPolicy(policy),
        qualifiers=tuple(tenant_pdk.read_qualifiers(qualifiers)),
    )
    secrets = ShieldingSecrets(
        admin=AdminCredentials(admin_user, _admin_password(admin_password_file)),
        answer_file=_answer_file(answer_file, answer_file_kind),
        files=tenant_pdk.read_other_files(files),
        host_certificate=_host_certificate(host_certificate, host_key, host_cert_kind),
    )
    owner_keys = _load_keys(store, owner, passphrase_file)
    data = tenant_pdk.build_shielding_data(
        store, owner_keys, request, secrets, created_at=int(time.time())
    )
    # Check our own output before it touches the disk.
    header = load_shielding_data(data, expected_owner=owner_keys.guardian.id).header
    atomic_write(out, data, mode=PRIVATE, overwrite=force)
    emit(
        as_json,
        {**header.summary(), "path": str(out)},
        lambda: f"wrote {out}\n" + _describe_header(header),
    )


def _describe_secrets(secrets: ShieldingSecrets, guardian: str) -> str:
    lines = [
        f"secrets (opened with guardian {guardian!r}):",
        f"  administrator: {secrets.admin.username}",
        f"  password:      {secrets.admin.password}",
    ]
    if secrets.answer_file is not None:
        content = secrets.answer_file.content
        lines.append(f"  answer file:   {secrets.answer_file.kind.value}, {len(content)} bytes")
        try:
            lines.append(textwrap.indent(content.decode("utf-8").rstrip("\n"), "    | "))
        except UnicodeDecodeError:
            lines.append("  (binary content: see --json)")
    for file_name, data in secrets.files.items():
        lines.append(f"  file:          {file_name}  ({len(data)} bytes)")
    if secrets.host_certificate is not None:
        cert = secrets.host_certificate
        lines.append(
            f"  host cert:     {cert.kind.value}, certificate {len(cert.certificate)} bytes,"
            f" private key {len(cert.private_key)} bytes"
        )
    lines.append("  (--json shows every file, certificate and key in base64url)")
    return "\n".join(lines)


@pdk.command("show")
@click.argument("path", type=_PATH)
@click.option(
    "--expect-owner",
    default=None,
    help="Refuse the file unless its owner's guardian id is this one (obtained out of band).",
)
@click.option(
    "--reveal",
    is_flag=True,
    help="Also decrypt and print the secrets; needs the private keys of the owner or a "
    "listed guardian in this store.",
)
@click.option(
    "--guardian",
    default=None,
    help="With --reveal: the local guardian whose keys open the secrets "
    "[default: the owner if its keys are here, else the first listed guardian that is].",
)
@passphrase_file_option
@home_option
@json_option
@handle_errors
def show(
    path: Path,
    expect_owner: str | None,
    reveal: bool,
    guardian: str | None,
    passphrase_file: Path | None,
    home: Path | None,
    as_json: bool,
) -> None:
    """Verify the owner's signature on PATH and show its public header.

    Without --reveal nothing is decrypted and no key is needed: this is what a
    fabric administrator sees.
    """
    if not reveal and (guardian is not None or passphrase_file is not None):
        raise UsageError("--guardian and --passphrase-file are only for --reveal")
    shielding = tenant_pdk.read_shielding_data(path, expected_owner=expect_owner)
    header = shielding.header
    result: dict[str, Any] = {"path": str(path), "header": header.summary()}
    if not reveal:
        emit(as_json, result, lambda: _describe_header(header))
        return
    store = guardian_store(home)
    name = guardian or tenant_pdk.revealing_guardian(store, header)
    secrets = shielding.reveal(_load_keys(store, name, passphrase_file))
    if sys.stdout.isatty():
        click.echo("warning: printing the secrets of this shielding data", err=True)
    result.update(revealed_with=name, secrets=secrets.to_dict())
    emit(
        as_json,
        result,
        lambda: _describe_header(header) + "\n" + _describe_secrets(secrets, name),
    )
