"""``guardfab host``: make this KVM host a guarded host, and see how it stands.

Thin: each command loads the configuration, calls :mod:`guardfab.host` and prints.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from guardfab import diagnostics as diag
from guardfab.cli.host_manage import audit as audit_group
from guardfab.cli.host_manage import manage as manage_group
from guardfab.cli.output import EXIT_INVALID, EXIT_TRANSPORT, emit, handle_errors, json_option
from guardfab.errors import FormatError, GuardfabError, UsageError
from guardfab.files import PUBLIC, atomic_write
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.host import diagnose as host_diag
from guardfab.host import signer as key_backends
from guardfab.host.attester import load_host_key, read_event_log, tpm_opener
from guardfab.host.config import (
    DEFAULT_EVENT_LOG,
    DEFAULT_MANAGE_LISTEN,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_TCTI,
    DEFAULT_VMS_DIR,
    HgsSite,
    HostConfig,
    HostMode,
    check_pin_source,
    check_signing_key,
    check_url,
    config_path,
    load_config,
    save_config,
)
from guardfab.host.identity import capture_baseline, host_key_identity, tpm_identity
from guardfab.host.keys import load_or_create_key
from guardfab.host.localapi import AgentClient, AgentUnavailableError
from guardfab.host.status import AgentStatus, HostStatus, StateFiles

_path = click.Path(dir_okay=False, path_type=Path)
_dir = click.Path(file_okay=False, path_type=Path)

config_option = click.option(
    "--config",
    "config_file",
    type=_path,
    default=None,
    help="Host configuration file [default: $GUARDFAB_HOST_CONFIG or /etc/guardfab/host.json].",
)


@click.group()
def host() -> None:
    """Make this KVM host a guarded host: attest to the HGS, get shielded VMs' keys.

    \b
    Set-up (fabric administrator, as root):
      configure   name the HGS, the attestation mode, the TPM and files
      identity    write what the HGS administrator registers for this host
      baseline    capture this host's boot as a TPM baseline for the HGS
      keygen      generate the host signing key on a PKCS#11 token (host-key mode)
    Operation:
      agent       the service (systemd unit guardfab-host-agent)
      status      is the host guarded, and if not, which policies failed
      attest      attest now (optionally through the fallback HGS)
      diagnose    every check from the TPM to the HGS's TLS, each with its fix
    Management API (the agent serves 'guardfab vm' over HTTPS):
      manage      its TLS material and role tokens (init, rotate)
      audit       its hash-chained audit log (verify, list)
    """


# --------------------------------------------------------------------- configure


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().absolute()


def _check_ca_file(path: Path) -> None:
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{path} is not a readable PEM CA certificate ({type(exc).__name__})",
            hint="use the HGS's tls/ca.pem (from the HGS administrator)",
        ) from exc


def _ensure_key(path: Path, algorithm: KeyAlgorithm) -> bool:
    """Create a host key if missing; return whether it was created."""
    if path.exists():
        load_host_key(path, "host key")
        return False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    load_or_create_key(path, algorithm)
    return True


def _signing_key_ref(value: str | None, here: Path) -> key_backends.SignerRef:
    """``--signing-key``: a token key URI, else a key file path (relative to the cwd)."""
    if value is None:
        return here / "host-signing.pem"
    if value.startswith("pkcs11:"):
        return check_signing_key(value, "--signing-key")
    return Path(value.removeprefix("file:")).expanduser().absolute()


def _ensure_signing_key(ref: key_backends.SignerRef) -> bool:
    """Create a signing key file if missing; a token key must exist and sign. Created?"""
    if isinstance(ref, key_backends.Pkcs11Uri):
        check_pin_source(ref)
        key_backends.open_signer(ref)
        return False
    return _ensure_key(ref, KeyAlgorithm.EC_P256)


def _site(attestation: str, key_protection: str, prefix: str = "") -> HgsSite:
    """A checked pair of URLs (the options' names in the errors)."""
    return HgsSite(
        check_url(attestation, f"--{prefix}attestation-url"),
        check_url(key_protection, f"--{prefix}key-protection-url"),
    )


def _fallback(attestation: str | None, key_protection: str | None) -> HgsSite | None:
    if attestation is None and key_protection is None:
        return None
    if attestation is None or key_protection is None:
        raise click.UsageError("give both fallback URLs, or neither")
    return _site(attestation, key_protection, "fallback-")


def _previous(path: Path) -> HostConfig | None:
    try:
        return load_config(path) if path.exists() else None
    except GuardfabError:
        return None


@host.command("configure")
@config_option
@click.option("--attestation-url", required=True, help="The HGS attestation URL (https).")
@click.option("--key-protection-url", required=True, help="The HGS key protection URL (https).")
@click.option("--fallback-attestation-url", help="A second HGS to attest to if the first is down.")
@click.option("--fallback-key-protection-url", help="Its key protection URL (give both or none).")
@click.option(
    "--mode",
    type=click.Choice([m.value for m in HostMode]),
    required=True,
    help="tpm: prove health with the TPM and boot log; host-key: with a host key.",
)
@click.option(
    "--ca",
    "ca_file",
    type=_path,
    required=True,
    help="The CA certificate the HGS's TLS certificate chains to (PEM).",
)
@click.option("--tcti", default=DEFAULT_TCTI, show_default=True, help="How to reach the TPM.")
@click.option(
    "--event-log",
    type=_path,
    default=DEFAULT_EVENT_LOG,
    show_default=True,
    help="The TCG boot event log.",
)
@click.option("--ci-policy", type=_path, help="The CI policy file measured at boot (optional).")
@click.option(
    "--encryption-key",
    type=_path,
    help="Host encryption key (created 0600 if missing) [default: next to the config].",
)
@click.option(
    "--signing-key",
    metavar="PATH|URI",
    help="host-key mode: the host signing key, a PEM file (created if missing) or a "
    "pkcs11: URI of a key on a token (must exist; PIN from its pin-source file) "
    "[default: host-signing.pem next to the config].",
)
@click.option(
    "--state-dir",
    type=_dir,
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="The agent's state (certificate cache, status).",
)
@click.option(
    "--socket",
    "socket_path",
    type=_path,
    default=DEFAULT_SOCKET,
    show_default=True,
    help="The agent's local API socket (its directory is made 0700).",
)
@click.option(
    "--allowed-uid",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="The only user id the local API serves (root by default).",
)
@click.option(
    "--vms-dir", type=_dir, default=DEFAULT_VMS_DIR, show_default=True, help="This host's VMs."
)
@click.option(
    "--manage-listen",
    default=DEFAULT_MANAGE_LISTEN,
    show_default=True,
    help="HOST:PORT of the agent's management API (HTTPS).",
)
@json_option
@handle_errors
def configure(
    config_file: Path | None,
    attestation_url: str,
    key_protection_url: str,
    fallback_attestation_url: str | None,
    fallback_key_protection_url: str | None,
    mode: str,
    ca_file: Path,
    tcti: str,
    event_log: Path,
    ci_policy: Path | None,
    encryption_key: Path | None,
    signing_key: str | None,
    state_dir: Path,
    socket_path: Path,
    allowed_uid: int,
    vms_dir: Path,
    manage_listen: str,
    as_json: bool,
) -> None:
    """Write the host configuration (Set-HgsClientConfiguration) and create the host keys.

    The host encryption key (the KPS wraps VM keys to it) and, in host-key mode,
    the host signing key are created 0600 if they do not exist. Renewal and
    retry settings already in the file are kept. Then give the output of
    'guardfab host identity' to the HGS administrator, and run 'guardfab host
    manage init' for the agent to serve the management API ('guardfab vm').
    """
    path = config_path(config_file)
    host_mode = HostMode(mode)
    here = path.absolute().parent
    config = HostConfig(
        mode=host_mode,
        primary=_site(attestation_url, key_protection_url),
        fallback=_fallback(fallback_attestation_url, fallback_key_protection_url),
        ca_file=ca_file.expanduser().absolute(),
        tcti=tcti,
        event_log=event_log.expanduser().absolute(),
        ci_policy=_absolute(ci_policy),
        encryption_key=_absolute(encryption_key) or here / "host-encryption.pem",
        signing_key=_signing_key_ref(signing_key, here) if host_mode is HostMode.HOST_KEY else None,
        state_dir=state_dir.expanduser().absolute(),
        socket=socket_path.expanduser().absolute(),
        allowed_uid=allowed_uid,
        vms_dir=vms_dir.expanduser().absolute(),
        manage_listen=manage_listen,
    )
    previous = _previous(path)
    if previous is not None:
        config = replace(
            config, renewal=previous.renewal, retry=previous.retry, manage_dir=previous.manage_dir
        )
    _check_ca_file(config.ca_file)
    created = []
    if _ensure_key(config.encryption_key, KeyAlgorithm.EC_P384):
        created.append(str(config.encryption_key))
    if config.signing_key is not None and _ensure_signing_key(config.signing_key):
        created.append(str(config.signing_key))
    save_config(path, config)
    StateFiles(config.state_dir).ensure()
    data = {"config": str(path), "created_keys": created, **config.to_dict()}
    emit(as_json, data, lambda: _configured_text(path, config, created))


def _configured_text(path: Path, config: HostConfig, created: list[str]) -> str:
    lines = [f"host configuration written to {path} (mode {config.mode.value})"]
    lines += [f"  created key: {key}" for key in created]
    lines += [
        "next:",
        f"  guardfab host identity --config {path} --out host-identity.pem",
        "  give host-identity.pem to the HGS administrator to register this host",
        "  systemctl enable --now guardfab-host-agent   (or: guardfab host agent)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------- status and attest


def _when(value: float | None, now: float) -> str:
    if value is None:
        return "-"
    stamp = datetime.datetime.fromtimestamp(value, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = int(value - now)
    rel = f"in {_span(delta)}" if delta >= 0 else f"{_span(-delta)} ago"
    return f"{stamp} ({rel})"


def _span(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s"


def _status_data(
    config: HostConfig, status: AgentStatus, agent: bool, now: float
) -> dict[str, Any]:
    fallback = config.fallback
    return {
        "mode": config.mode.value,
        "is_host_guarded": status.is_guarded(now),
        "attestation_url": config.primary.attestation_url,
        "key_protection_url": config.primary.key_protection_url,
        "fallback_attestation_url": fallback.attestation_url if fallback else None,
        "fallback_key_protection_url": fallback.key_protection_url if fallback else None,
        "agent_running": agent,
        **status.to_dict(),
    }


def _status_text(data: dict[str, Any], now: float) -> str:
    rows = [
        ("Mode", data["mode"]),
        ("Is host guarded", "yes" if data["is_host_guarded"] else "no"),
        ("Attestation URL", data["attestation_url"]),
        ("Key protection URL", data["key_protection_url"]),
        ("Fallback attestation URL", data["fallback_attestation_url"] or "-"),
        ("Fallback key protection URL", data["fallback_key_protection_url"] or "-"),
        ("Attestation status", data["attestation_status"]),
        ("Attestation sub-status", ", ".join(data["sub_status"]) or "-"),
        ("Certificate expires", _when(data["certificate_expires_at"], now)),
        (
            "Served by",
            (data["served_by"] or "-") + (" (fallback)" if data["using_fallback"] else ""),
        ),
        ("Last attempt", _when(data["last_attempt"], now)),
        ("Next attempt", _when(data["next_attempt"], now)),
        ("Agent", "running" if data["agent_running"] else "not running (last recorded status)"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name + ':':<{width + 1}} {value}" for name, value in rows]
    for failure in data["failures"]:
        lines.append(f"  failed: {failure['check']}: {failure['reason']}")
        if failure.get("hint"):
            lines.append(f"    fix: {failure['hint']}")
    return "\n".join(lines)


def _current_status(config: HostConfig) -> tuple[AgentStatus, bool]:
    """From the agent if it runs, else the last status it (or 'host attest') wrote."""
    try:
        return AgentClient(config.socket, timeout=10).status(), True
    except AgentUnavailableError:
        pass
    recorded = StateFiles(config.state_dir).load_status()
    return (recorded or AgentStatus(mode=config.mode.value)), False


@host.command("status")
@config_option
@json_option
@handle_errors
def status(config_file: Path | None, as_json: bool) -> None:
    """Show whether this host is guarded, and why not (Get-HgsClientConfiguration).

    Asks the running agent; without one, shows the last recorded result. The
    sub-status lists the attestation policies that failed; each failed check
    comes with what to do about it.
    """
    config = load_config(config_path(config_file))
    current, running = _current_status(config)
    now = time.time()
    data = _status_data(config, current, running, now)
    emit(as_json, data, lambda: _status_text(data, now))


def _attest_in_process(config: HostConfig, use_fallback: bool) -> AgentStatus:
    from guardfab.host.service import build_agent  # noqa: PLC0415 - only without an agent

    agent = build_agent(config)
    agent.recover()
    return agent.attest_now(use_fallback=use_fallback)


@host.command("attest")
@config_option
@click.option("--use-fallback", is_flag=True, help="Attest to the fallback HGS only (a test).")
@json_option
@handle_errors
def attest(config_file: Path | None, use_fallback: bool, as_json: bool) -> None:
    """Attest now and show the result.

    Through the running agent if there is one (it then uses the new certificate),
    else directly (the agent reuses the certificate when it starts). Exit status:
    0 guarded, 1 refused by the HGS or a host problem, 3 no HGS answered.
    """
    config = load_config(config_path(config_file))
    try:
        result, running = AgentClient(config.socket).attest(use_fallback=use_fallback), True
    except AgentUnavailableError:
        result, running = _attest_in_process(config, use_fallback), False
    now = time.time()
    data = _status_data(config, result, running, now)
    emit(as_json, data, lambda: _status_text(data, now))
    if result.attestation_status == HostStatus.TRANSIENT_ERROR:
        sys.exit(EXIT_TRANSPORT)
    if result.attestation_status != HostStatus.PASSED:
        sys.exit(EXIT_INVALID)


# --------------------------------------------------------------------- identity and baseline


@host.command("identity")
@config_option
@click.option("--out", type=_path, required=True, help="Where to write the identity.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pem", "json"]),
    default="pem",
    show_default=True,
    help="pem: what 'hgs host add-tpm/add-key' read; json: all facts.",
)
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@json_option
@handle_errors
def identity(config_file: Path | None, out: Path, fmt: str, force: bool, as_json: bool) -> None:
    """Write what the HGS administrator registers for this host (public data only).

    \b
    TPM mode: the EK public key (PEM; TPM2B_PUBLIC in base64url in the JSON form)
      and the EK certificate. Register with:
      guardfab hgs host add-tpm --name HOST --ek-public FILE --ek-cert FILE
    host-key mode: the host signing key's public key (PEM; JWK in the JSON form),
      read from the key file or from the PKCS#11 token. Register with:
      guardfab hgs host add-key --name HOST --public-key FILE
    """
    config = load_config(config_path(config_file))
    if config.mode is HostMode.TPM:
        tpm = tpm_opener(config)()
        try:
            ident = tpm_identity(tpm.read_ek())
        finally:
            tpm.close()
    else:
        assert config.signing_key is not None  # HostConfig guarantees it
        ident = host_key_identity(key_backends.open_signer(config.signing_key))
    atomic_write(
        out, ident.to_pem() if fmt == "pem" else ident.to_json(), mode=PUBLIC, overwrite=force
    )
    data = {"out": str(out), "mode": ident.mode, **ident.details}
    emit(as_json, data, f"wrote this host's {ident.mode} identity to {out}")


@host.command("keygen")
@click.option(
    "--pkcs11",
    "uri",
    required=True,
    metavar="URI",
    help="pkcs11:token=T;object=LABEL?module-path=/PATH/MODULE.so&pin-source=file:/PATH/PIN",
)
@click.option(
    "--type",
    "key_type",
    type=click.Choice(key_backends.TOKEN_KEY_TYPES),
    default="ec-p256",
    show_default=True,
    help="The key pair to generate.",
)
@json_option
@handle_errors
def keygen(uri: str, key_type: str, as_json: bool) -> None:
    """Generate the host signing key on a PKCS#11 token (never leaves it).

    \b
    The private key is sensitive and not extractable; the user PIN is read from
    the URI's pin-source file (never give it on the command line). Then:
      guardfab host configure --mode host-key --signing-key 'URI' ...
    """
    parsed = key_backends.Pkcs11Uri.parse(uri, what="--pkcs11")
    check_pin_source(parsed)
    signer = key_backends.generate_token_key(parsed, key_type)
    data = {"uri": str(parsed), "alg": signer.alg, "key_id": signer.key_id}
    emit(as_json, data, f"generated {signer.description} ({signer.alg}, kid {signer.key_id})")


@host.command("baseline")
@config_option
@click.option("--name", required=True, help="The baseline's name at the HGS.")
@click.option("--out", type=_path, required=True, help="Where to write the baseline document.")
@click.option(
    "--log-out", type=_path, help="Also copy the event log here ('hgs baseline add --log')."
)
@click.option("--event-log", type=_path, help="Read this log instead of the configured one.")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@json_option
@handle_errors
def baseline(
    config_file: Path | None,
    name: str,
    out: Path,
    log_out: Path | None,
    event_log: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Capture this host's boot as a TPM baseline (for a reference host the HGS trusts).

    Writes the baseline document (the PCR values and the events behind them) for
    review; the HGS administrator adds it with
    'guardfab hgs baseline add --name NAME --log LOG' from the log itself (--log-out).
    """
    log_path = event_log or load_config(config_path(config_file)).event_log
    log = read_event_log(log_path)
    try:
        document = capture_baseline(name, log)
    except UsageError as exc:
        raise FormatError(str(exc)) from exc
    text = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
    atomic_write(out, text, mode=PUBLIC, overwrite=force)
    if log_out is not None:
        atomic_write(log_out, log, mode=PUBLIC, overwrite=force)
    data = {
        "out": str(out),
        "log_out": None if log_out is None else str(log_out),
        "name": name,
        "pcrs": document["pcrs"],
    }
    emit(as_json, data, f"wrote baseline {name} ({len(document['events'])} events) to {out}")


# --------------------------------------------------------------------- diagnose and agent


@host.command("diagnose")
@config_option
@json_option
@handle_errors
def diagnose(config_file: Path | None, as_json: bool) -> None:
    """Check everything between this host and a health certificate; each with its fix.

    \b
    Configuration, HGS CA, host keys (present, 0600), state directory; the TPM
    (TCTI opens, EK and its certificate, AK present and fit, SHA-256 bank); the
    event log (readable, parses, replays to the TPM's PCRs, shows the CI policy);
    the HGS and the fallback over TLS with the configured CA; the clock against
    the HGS's; the agent. Exit status 1 if any check FAILs.
    """
    path = config_path(config_file)
    try:
        config = load_config(path)
    except GuardfabError as exc:
        checks = [diag.fail("config", str(exc), exc.hint)]
    else:
        checks = [diag.ok("config", f"{path} is valid")]
        checks += host_diag.run_checks(config, time.time)
    report = diag.report_dict(checks, config=str(path))
    emit(as_json, report, lambda: diag.report_text(f"host diagnose: {path}", checks))
    if not report["ok"]:
        sys.exit(EXIT_INVALID)


@host.command("agent")
@config_option
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning"]),
    default="info",
    show_default=True,
    help="What the agent logs to stderr (the journal).",
)
@handle_errors
def agent(config_file: Path | None, log_level: str) -> None:
    """Run the guarded-host agent in the foreground (what the systemd unit runs).

    It attests at start (or reuses a valid cached certificate), renews after 75%
    of the certificate's life, retries with backoff, fails over to the fallback
    HGS, and serves the hypervisor's key requests on its root-only socket.
    Stops on SIGTERM or SIGINT. Logs carry no key material.
    """
    from guardfab.host.service import run_foreground  # noqa: PLC0415 - keep the CLI quick

    config = load_config(config_path(config_file))
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    run_foreground(config)


host.add_command(manage_group)
host.add_command(audit_group)
