"""``guardfab hgs`` administration: modes, settings, hosts, CAs and groups.

Thin commands over :class:`guardfab.hgs.client.AdminClient`: parse, call the
admin API over HTTPS, print. Each command's help names the reference cmdlet it
mirrors. Baselines, CI policies, attestation policies, reports, the audit log
and ``diagnose`` are in :mod:`guardfab.cli.hgs_admin_reports`, attached here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from guardfab.cli.common import IdArgumentCommand
from guardfab.cli.hgs import hgs
from guardfab.cli.hgs_admin_common import (
    ConnectionOptions,
    call,
    connection_options,
    read_input,
    table,
    with_notes,
)
from guardfab.cli.output import emit, handle_errors, json_option

_file = click.Path(exists=True, dir_okay=False, path_type=Path)
_MAX_KEY_FILE = 64 * 1024


# --------------------------------------------------------------------- mode and settings


@hgs.group("mode")
def mode() -> None:
    """Attestation modes the HGS accepts (Set-HgsServer -TrustTpm / -TrustHostKey)."""


@mode.command("show")
@connection_options
@json_option
@handle_errors
def mode_show(conn: ConnectionOptions, as_json: bool) -> None:
    """Show the active attestation modes (Get-HgsServer)."""
    data = call(conn, lambda c: c.modes())
    emit(as_json, data, lambda: with_notes("modes: " + ", ".join(data["modes"]), data))


@mode.command("set")
@click.argument(
    "modes", nargs=-1, required=True, type=click.Choice(["tpm", "host-key", "admin-group"])
)
@connection_options
@json_option
@handle_errors
def mode_set(modes: tuple[str, ...], conn: ConnectionOptions, as_json: bool) -> None:
    """Accept attestation in MODES from now on (Set-HgsServer -TrustTpm / -TrustHostKey /
    -TrustActiveDirectory).

    \b
    tpm          measured boot, TPM quote, baselines and CI policies (recommended)
    host-key     a registered host signing key (identity only, no boot measurements)
    admin-group  a CA-issued certificate naming the host's group (DEPRECATED)

    Several modes may be active while hosts move. Switching never invalidates the
    health certificates already issued: they are self-contained signed tokens,
    valid until they expire.
    """
    data = call(conn, lambda c: c.set_modes(list(modes)))
    emit(as_json, data, lambda: with_notes("modes: " + ", ".join(data["modes"]), data))


@hgs.group("settings")
def settings() -> None:
    """Trust settings: admit vendor-certified EKs, the CI policy PCR."""


def _settings_text(data: dict[str, Any]) -> str:
    return "\n".join(f"{key}: {value}" for key, value in sorted(data.items()))


@settings.command("show")
@connection_options
@json_option
@handle_errors
def settings_show(conn: ConnectionOptions, as_json: bool) -> None:
    """Show the trust settings (Get-HgsServer shows the reference's)."""
    data = call(conn, lambda c: c.settings())
    emit(as_json, data, lambda: _settings_text(data))


@settings.command("set")
@click.option(
    "--admit-certified-eks/--no-admit-certified-eks",
    default=None,
    help="Admit unregistered TPMs whose EK certificate chains to a registered vendor CA "
    "(see 'hgs ek-ca').",
)
@click.option(
    "--ci-policy-pcr",
    type=click.IntRange(0, 23),
    default=None,
    help="PCR the boot loader measures CI policy files into [default 9: GRUB].",
)
@connection_options
@json_option
@handle_errors
def settings_set(
    admit_certified_eks: bool | None,
    ci_policy_pcr: int | None,
    conn: ConnectionOptions,
    as_json: bool,
) -> None:
    """Change trust settings; options not given keep their value.

    Admitting vendor-certified EKs has no reference counterpart: the reference
    registers every TPM host (Add-HgsAttestationTpmHost) and its TrustedTpm
    stores only vouch for EK certificates.
    """
    data = call(
        conn,
        lambda c: c.update_settings(
            admit_certified_eks=admit_certified_eks, ci_policy_pcr=ci_policy_pcr
        ),
    )
    emit(as_json, data, lambda: _settings_text(data))


# --------------------------------------------------------------------- hosts


@hgs.group("host")
def host() -> None:
    """Registered hosts: TPM hosts, host keys, revocation, status."""


def _last(row: dict[str, Any]) -> tuple[str, str]:
    last = row.get("last") or {}
    return str(last.get("status") or "-"), str(last.get("verified_at") or "-")


@host.command("list")
@connection_options
@json_option
@handle_errors
def host_list(conn: ConnectionOptions, as_json: bool) -> None:
    """Every known host, how it is registered, and its last attestation status and time
    (Get-HgsAttestationTpmHost / Get-HgsAttestationHostKey, plus status).
    """
    rows = call(conn, lambda c: c.hosts())

    def human() -> str:
        return table(
            (
                (
                    r["host_id"],
                    ",".join(sorted({g["kind"] for g in r["registrations"]})) or "-",
                    "yes" if r["revoked"] else "no",
                    *_last(r),
                )
                for r in rows
            ),
            ("HOST", "REGISTERED", "REVOKED", "LAST STATUS", "ATTESTED AT"),
        )

    emit(as_json, rows, human)


@host.command("add-tpm")
@click.option("--name", required=True, help="The host's name (its host id in results).")
@click.option(
    "--ek-public",
    type=_file,
    help="EK public key: TPM2B_PUBLIC (tpm2_createek -u / tpm2_readpublic) or PEM.",
)
@click.option("--ek-cert", type=_file, help="EK certificate, DER or PEM (from the TPM's NV index).")
@connection_options
@json_option
@handle_errors
def host_add_tpm(
    name: str,
    ek_public: Path | None,
    ek_cert: Path | None,
    conn: ConnectionOptions,
    as_json: bool,
) -> None:
    """Register a TPM host by its endorsement key (Add-HgsAttestationTpmHost).

    Give the EK public key, the EK certificate, or both (they must agree). The
    host then proves its AK lives in that TPM on first contact
    (MakeCredential/ActivateCredential).
    """
    if ek_public is None and ek_cert is None:
        raise click.UsageError("give --ek-public FILE, --ek-cert FILE, or both")
    public = None if ek_public is None else read_input(ek_public, limit=_MAX_KEY_FILE, what="EK")
    cert = None if ek_cert is None else read_input(ek_cert, limit=_MAX_KEY_FILE, what="EK cert")
    data = call(conn, lambda c: c.add_tpm_host(name, ek_public=public, ek_certificate=cert))
    emit(as_json, data, f"registered TPM host {name} (EK sha256:{data['ek_digest']})")


@host.command("remove-tpm")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def host_remove_tpm(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Remove a TPM host and its AK bindings (Remove-HgsAttestationTpmHost)."""
    data = call(conn, lambda c: c.remove_tpm_host(name))
    emit(as_json, data, f"removed TPM host {name}")


@host.command("add-key")
@click.option("--name", required=True, help="The host's name (its host id in results).")
@click.option(
    "--public-key", type=_file, required=True, help="The host's public signing key: PEM or JWK."
)
@connection_options
@json_option
@handle_errors
def host_add_key(name: str, public_key: Path, conn: ConnectionOptions, as_json: bool) -> None:
    """Register a host key for host-key mode (Add-HgsAttestationHostKey).

    The key's id is its RFC 7638 thumbprint; the host signs each challenge with it.
    """
    key = read_input(public_key, limit=_MAX_KEY_FILE, what="public key")
    data = call(conn, lambda c: c.add_host_key(name, key))
    emit(as_json, data, f"registered host key {data['key_id']} for host {name}")


@host.command("keys")
@connection_options
@json_option
@handle_errors
def host_keys(conn: ConnectionOptions, as_json: bool) -> None:
    """Registered host keys (Get-HgsAttestationHostKey)."""
    rows = call(conn, lambda c: c.host_keys())
    emit(
        as_json,
        rows,
        lambda: table(
            ((r["key_id"], r["host_id"], "yes" if r["revoked"] else "no") for r in rows),
            ("KEY ID", "HOST", "REVOKED"),
        ),
    )


@host.command("revoke-key", cls=IdArgumentCommand)
@click.argument("key_id")
@connection_options
@json_option
@handle_errors
def host_revoke_key(key_id: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Refuse one host key from now on, keeping it on record (the reference removes it:
    Remove-HgsAttestationHostKey; see 'remove-key').

    KEY_ID is the key's thumbprint ('hgs host keys'); one that starts with '-'
    goes after '--', e.g. 'guardfab hgs host revoke-key --dir D -- -kXm...'.
    """
    data = call(conn, lambda c: c.revoke_host_key(key_id))
    emit(as_json, data, f"revoked host key {key_id} of host {data['host_id']}")


@host.command("remove-key", cls=IdArgumentCommand)
@click.argument("key_id")
@connection_options
@json_option
@handle_errors
def host_remove_key(key_id: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Forget a host key (Remove-HgsAttestationHostKey).

    KEY_ID is the key's thumbprint; one that starts with '-' goes after '--'.
    """
    data = call(conn, lambda c: c.remove_host_key(key_id))
    emit(as_json, data, f"removed host key {key_id} of host {data['host_id']}")


@host.command("revoke")
@click.argument("host_id")
@click.option("--reason", default="", help="Why (kept with the revocation and in the audit log).")
@connection_options
@json_option
@handle_errors
def host_revoke(host_id: str, reason: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Refuse HOST_ID in every attestation mode until unrevoked.

    The reference has no revocation list: it removes the host's registration
    (Remove-HgsAttestationTpmHost / -HostKey). A revocation keeps the
    registration, can be lifted, and also covers hosts admitted by a
    vendor-certified EK or a group certificate.
    """
    data = call(conn, lambda c: c.revoke_host(host_id, reason))
    emit(as_json, data, lambda: with_notes(f"revoked host {host_id}", data))


@host.command("unrevoke")
@click.argument("host_id")
@connection_options
@json_option
@handle_errors
def host_unrevoke(host_id: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Lift HOST_ID's revocation (no reference counterpart: the reference re-registers the
    host with Add-HgsAttestationTpmHost / -HostKey).
    """
    data = call(conn, lambda c: c.unrevoke_host(host_id))
    emit(as_json, data, f"host {host_id} is no longer revoked")


@host.command("revocations")
@connection_options
@json_option
@handle_errors
def host_revocations(conn: ConnectionOptions, as_json: bool) -> None:
    """Revoked hosts, with when and why (no reference counterpart; see 'revoke')."""
    rows = call(conn, lambda c: c.revocations())
    emit(
        as_json,
        rows,
        lambda: table(
            ((r["host_id"], r["revoked_at"], r.get("reason", "")) for r in rows),
            ("HOST", "REVOKED AT", "REASON"),
        ),
    )


# --------------------------------------------------------------------- CAs and groups


def _ca_table(rows: list[dict[str, Any]]) -> str:
    return table(
        ((r["id"], r["kind"], r["not_after"], r["subject"]) for r in rows),
        ("ID (SHA-256 OF DER)", "KIND", "NOT AFTER", "SUBJECT"),
    )


@hgs.group("ek-ca")
def ek_ca() -> None:
    """TPM vendor CAs that EK certificates chain to (the reference's TrustedTpm_RootCA and
    TrustedTpm_IntermediateCA stores, filled from Microsoft's TrustedTpm.cab).
    """


@ek_ca.command("add")
@click.argument("certificate", type=_file)
@click.option("--intermediate", is_flag=True, help="An intermediate CA, not a root.")
@connection_options
@json_option
@handle_errors
def ek_ca_add(
    certificate: Path, intermediate: bool, conn: ConnectionOptions, as_json: bool
) -> None:
    """Trust a TPM vendor CA certificate (PEM or DER) for EK certificates (the reference
    installs it into its TrustedTpm_RootCA or TrustedTpm_IntermediateCA store).

    Registered TPM hosts do not need one. With 'hgs settings set
    --admit-certified-eks', any TPM whose EK certificate chains to one is admitted.
    """
    data_in = read_input(certificate, limit=_MAX_KEY_FILE, what="CA certificate")
    data = call(conn, lambda c: c.add_ca("ek", data_in, intermediate=intermediate))
    emit(as_json, data, lambda: with_notes(f"trusted {data['kind']} CA {data['id']}", data))


@ek_ca.command("list")
@connection_options
@json_option
@handle_errors
def ek_ca_list(conn: ConnectionOptions, as_json: bool) -> None:
    """Trusted TPM vendor CAs (the reference's TrustedTpm_RootCA/_IntermediateCA stores)."""
    rows = call(conn, lambda c: c.cas("ek"))
    emit(as_json, rows, lambda: _ca_table(rows))


@ek_ca.command("remove", cls=IdArgumentCommand)
@click.argument("cert_id")
@connection_options
@json_option
@handle_errors
def ek_ca_remove(cert_id: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Stop trusting a TPM vendor CA (CERT_ID: the SHA-256 shown by 'list'); the reference
    removes it from its TrustedTpm_RootCA or _IntermediateCA store.
    """
    data = call(conn, lambda c: c.remove_ca("ek", cert_id))
    emit(as_json, data, f"removed {data['kind']} CA {cert_id}")


@hgs.group("group")
def group() -> None:
    """Host groups and host CAs of admin-group mode (DEPRECATED, as in the reference)."""


@group.command("add")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def group_add(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Trust hosts whose certificate names group NAME (Add-HgsAttestationHostGroup).

    Deprecated: group membership says nothing about a host's health.
    """
    data = call(conn, lambda c: c.add_host_group(name))
    emit(as_json, data, lambda: with_notes(f"trusted host group {name}", data))


@group.command("remove")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def group_remove(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Stop trusting a host group (Remove-HgsAttestationHostGroup)."""
    data = call(conn, lambda c: c.remove_host_group(name))
    emit(as_json, data, f"removed host group {name}")


@group.command("list")
@connection_options
@json_option
@handle_errors
def group_list(conn: ConnectionOptions, as_json: bool) -> None:
    """Trusted host groups (Get-HgsAttestationHostGroup)."""
    names = call(conn, lambda c: c.host_groups())
    emit(as_json, names, lambda: "\n".join(names) or "(none)")


@group.command("add-ca")
@click.argument("certificate", type=_file)
@connection_options
@json_option
@handle_errors
def group_add_ca(certificate: Path, conn: ConnectionOptions, as_json: bool) -> None:
    """Trust a host CA whose client certificates name a host's group (PEM or DER). The
    reference trusts Active Directory instead (Add-HgsAttestationHostGroup with a group SID).
    """
    data_in = read_input(certificate, limit=_MAX_KEY_FILE, what="CA certificate")
    data = call(conn, lambda c: c.add_ca("group", data_in))
    emit(as_json, data, lambda: with_notes(f"trusted host CA {data['id']}", data))


@group.command("list-cas")
@connection_options
@json_option
@handle_errors
def group_list_cas(conn: ConnectionOptions, as_json: bool) -> None:
    """Trusted host CAs (the reference trusts Active Directory; see 'add-ca')."""
    rows = call(conn, lambda c: c.cas("group"))
    emit(as_json, rows, lambda: _ca_table(rows))


@group.command("remove-ca", cls=IdArgumentCommand)
@click.argument("cert_id")
@connection_options
@json_option
@handle_errors
def group_remove_ca(cert_id: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Stop trusting a host CA (CERT_ID: the SHA-256 shown by 'list-cas'); no reference
    counterpart (see 'add-ca').
    """
    data = call(conn, lambda c: c.remove_ca("group", cert_id))
    emit(as_json, data, f"removed host CA {cert_id}")


# The rest of the admin commands register themselves on import.
from guardfab.cli import hgs_admin_reports  # noqa: E402, F401
