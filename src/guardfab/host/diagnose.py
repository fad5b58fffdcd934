"""``guardfab host diagnose``: every check between this host and a health certificate.

In the spirit of the reference's ``Get-HgsTrace``: each check says what it
found and, when it is not right, what to do. The checks follow the path of an
attestation: configuration, CA and keys, the TPM (reachable, EK, AK, SHA-256
bank), the event log (readable, parses, replays to the TPM's PCRs, shows the CI
policy), the HGS (reachable over TLS with the configured CA, the fallback too),
the clock (against the HGS's), and the agent. In host-key mode with the key on
a PKCS#11 token, the token must open with the PIN file, hold the key, and sign
something its public key verifies. Nothing here attests, and nothing
is written, except that the AK is created if it does not exist yet (the agent
would create the same one at its first attestation).
"""

from __future__ import annotations

import email.utils
import hashlib
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from cryptography import x509

from guardfab import diagnostics as diag
from guardfab.attestation.signing import verify_binding
from guardfab.diagnostics import Check, Status
from guardfab.errors import GuardfabError
from guardfab.host.attester import load_host_key, read_event_log
from guardfab.host.config import HostConfig, HostMode
from guardfab.host.identity import tpm_identity
from guardfab.host.localapi import AgentClient
from guardfab.host.manage.audit import ManagementAudit
from guardfab.host.manage.material import ROLES, ManagementFiles
from guardfab.host.signer import Pkcs11Signer, Pkcs11Uri, detached_jws
from guardfab.host.status import StateFiles
from guardfab.host.tpm import HostTpm
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.eventlog import EventLog, parse_event_log

#: The KPS tolerates this much clock skew (DEFAULT_LEEWAY of health certificates).
MAX_SKEW = 60.0
WARN_SKEW = 10.0


# ---------------------------------------------------------------------- files


def check_ca(config: HostConfig, now: float) -> Check:
    """The HGS CA file exists, holds certificates, and they are within their validity."""
    try:
        certs = x509.load_pem_x509_certificates(config.ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        return diag.fail(
            "hgs-ca",
            f"{config.ca_file}: not a readable PEM CA file ({exc})",
            "copy the HGS's tls/ca.pem here, or set 'ca_file' with 'host configure --ca'",
        )
    expired = [c for c in certs if c.not_valid_after_utc.timestamp() < now]
    if expired:
        return diag.fail(
            "hgs-ca",
            f"{len(expired)} certificate(s) in {config.ca_file} expired",
            "get the HGS's current CA certificate from the HGS administrator",
        )
    return diag.ok("hgs-ca", f"{config.ca_file}: {len(certs)} CA certificate(s)")


def check_key(path: Path, what: str) -> Check:
    """A host key exists, is 0600 (owner only) and loads."""
    name = what.replace(" ", "-")
    try:
        load_host_key(path, what)
    except GuardfabError as exc:
        return diag.fail(name, str(exc), exc.hint or "run 'guardfab host configure' to create it")
    mode = path.stat().st_mode & 0o777
    return diag.ok(name, f"{path} (mode {mode:04o})")


def check_token_key(uri: Pkcs11Uri) -> Check:
    """The token opens with the PIN file, the key is found, and it signs verifiably."""
    name = "host-signing-key"
    try:
        signer = Pkcs11Signer(uri)
        token = detached_jws(signer, b"guardfab diagnose", typ="guardfab-diagnose+jws")
        verify_binding(token, signer.public_key, b"guardfab diagnose", typ="guardfab-diagnose+jws")
    except GuardfabError as exc:
        fix = exc.hint or "check the token, the module and the URI in 'signing_key'"
        return diag.fail(name, str(exc), fix)
    return diag.ok(name, f"{signer.description} opened, signs {signer.alg} (kid {signer.key_id})")


def check_signing_key(config: HostConfig) -> Check:
    """The host signing key: a key file (0600, loads) or a key on a PKCS#11 token."""
    if isinstance(config.signing_key, Pkcs11Uri):
        return check_token_key(config.signing_key)
    assert config.signing_key is not None  # HostConfig guarantees it in host-key mode
    return check_key(config.signing_key, "host signing key")


def check_state_dir(config: HostConfig) -> Check:
    """The agent's state directory exists and is private."""
    directory = config.state_dir
    if not directory.exists():
        return diag.warn("state-dir", f"{directory} does not exist yet", "the agent creates it")
    mode = directory.stat().st_mode & 0o777
    if mode & 0o077:
        return diag.fail("state-dir", f"{directory} is mode {mode:04o}", f"chmod 700 {directory}")
    return diag.ok("state-dir", f"{directory} (mode {mode:04o})")


# ---------------------------------------------------------------------- TPM and log


def _tpm_fix(tcti: str) -> str:
    if tcti.startswith("swtpm:") or tcti.startswith("mssim:"):
        return f"start the TPM simulator that '{tcti}' names, or fix 'tcti' in the configuration"
    return (
        "check that the kernel TPM driver is loaded (ls /dev/tpm*; modprobe tpm_crb or "
        "tpm_tis), that the TPM is enabled in the firmware, and that the agent runs as root"
    )


def _check_tpm_contents(tpm: HostTpm, config: HostConfig, last_ak: str | None) -> list[Check]:
    results = []
    ek = tpm.read_ek()
    identity = tpm_identity(ek)
    if ek.certificate is None:
        results.append(
            diag.warn(
                "ek",
                f"{ek.profile} readable, no EK certificate in NV",
                "register the host at the HGS by its EK public key",
            )
        )
    elif identity.details["ek_certificate_matches"] is False:
        results.append(
            diag.fail(
                "ek",
                "the EK certificate is for another key",
                "ask the TPM vendor; register by EK public key meanwhile",
            )
        )
    else:
        results.append(
            diag.ok(
                "ek",
                f"{ek.profile}, certificate present; EK sha256:{identity.details['ek_digest']}",
            )
        )
    ak = tpm.ensure_ak()
    detail = f"AK at 0x{config.ak_handle:08x} is a restricted signing key (Name {ak.name.hex()})"
    if last_ak is not None and last_ak != ak.name.hex():
        results.append(
            diag.warn(
                "ak",
                detail + " but not the one that attested last",
                "expected after a TPM clear; the HGS activates the new AK once",
            )
        )
    else:
        results.append(diag.ok("ak", detail))
    if TpmAlg.SHA256 not in tpm.pcr_banks():
        results.append(
            diag.fail(
                "pcr-bank",
                "the SHA-256 PCR bank is not allocated",
                "allocate the SHA-256 bank in the firmware's TPM settings",
            )
        )
    else:
        results.append(diag.ok("pcr-bank", "SHA-256 bank allocated"))
    return results


def check_tpm(config: HostConfig, last_ak: str | None) -> tuple[list[Check], HostTpm | None]:
    """TCTI opens, EK readable, AK present and fit, SHA-256 bank; returns the open TPM."""
    try:
        tpm = HostTpm(config.tcti, ak_handle=config.ak_handle, ek_profile=config.ek_profile)
    except GuardfabError as exc:
        return [
            diag.fail(
                "tpm", f"cannot open the TPM at '{config.tcti}': {exc}", _tpm_fix(config.tcti)
            )
        ], None
    results = [diag.ok("tpm", f"TCTI '{config.tcti}' opened")]
    try:
        results += _check_tpm_contents(tpm, config, last_ak)
    except GuardfabError as exc:
        results.append(diag.fail("tpm-use", str(exc), exc.hint or _tpm_fix(config.tcti)))
    return results, tpm


def check_event_log(config: HostConfig) -> tuple[Check, EventLog | None]:
    """The log is readable, parses and has a SHA-256 bank."""
    try:
        log = parse_event_log(read_event_log(config.event_log))
    except GuardfabError as exc:
        return diag.fail("event-log", str(exc), exc.hint or "the log is corrupt: report it"), None
    if TpmAlg.SHA256 not in log.replayable_banks:
        return diag.fail(
            "event-log",
            f"{config.event_log} has no SHA-256 bank",
            "enable the SHA-256 PCR bank in the firmware",
        ), log
    return diag.ok("event-log", f"{config.event_log}: {len(log.events)} events"), log


def check_replay(tpm: HostTpm, log: EventLog) -> Check:
    """The log replays to the TPM's SHA-256 PCRs (else the HGS answers InvalidEvidence)."""
    replayed = log.replay([TpmAlg.SHA256])[TpmAlg.SHA256]
    try:
        actual = tpm.read_pcrs(sorted(replayed))
    except GuardfabError as exc:
        return diag.fail("log-replay", str(exc), exc.hint)
    wrong = sorted(pcr for pcr, value in replayed.items() if actual.get(pcr) != value)
    if wrong:
        return diag.fail(
            "log-replay",
            f"PCR(s) {wrong} differ from the log's replay",
            "something was measured that the log does not show (or the log is not "
            "this boot's): the HGS will refuse with InvalidEvidence; reboot, and "
            "report it if it persists",
        )
    return diag.ok("log-replay", f"the log replays to the TPM's PCRs {sorted(replayed)}")


def check_ci_policy(config: HostConfig, log: EventLog | None) -> Check:
    """The configured CI policy file is readable and was measured at boot."""
    if config.ci_policy is None:
        return Check("ci-policy", Status.SKIP, "no CI policy file configured")
    try:
        digest = hashlib.sha256(config.ci_policy.read_bytes()).digest()
    except OSError as exc:
        return diag.fail(
            "ci-policy",
            f"{config.ci_policy}: {exc.strerror}",
            "fix 'ci_policy' in the configuration (host configure --ci-policy)",
        )
    measured = log is not None and any(
        event.digests.get(TpmAlg.SHA256) == digest for event in log.events
    )
    if not measured:
        return diag.warn(
            "ci-policy",
            f"sha256:{digest.hex()} is not in this boot's event log",
            "the boot loader must measure the policy (GRUB's tpm module) and the "
            "HGS must register it ('hgs ci-policy add'); reboot after changing it",
        )
    return diag.ok("ci-policy", f"sha256:{digest.hex()} measured at boot (register it at the HGS)")


# ---------------------------------------------------------------------- HGS and clock


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    while exc is not None:
        if isinstance(exc, ssl.SSLError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def probe_hgs(url: str, config: HostConfig, name: str) -> tuple[Check, float | None]:
    """TLS to ``url`` with the configured CA, then /healthz; returns the HGS's Date."""
    try:
        context = ssl.create_default_context(cafile=str(config.ca_file))
        with httpx.Client(verify=context, timeout=config.retry.http_timeout) as client:
            response = client.get(url.rstrip("/") + "/healthz")
    except (OSError, ssl.SSLError, ValueError) as exc:
        return diag.fail(name, f"cannot use the CA file ({exc})", "fix 'ca_file'"), None
    except httpx.HTTPError as exc:
        tls = _tls_failure(exc)
        if isinstance(tls, ssl.SSLCertVerificationError):
            return diag.fail(
                name,
                f"{url}: TLS verification failed ({tls.verify_message})",
                "the HGS's certificate does not chain to the configured CA, or its "
                "names do not include this URL's host: get the HGS's CA (tls/ca.pem) "
                "and use a URL whose host name the certificate lists",
            ), None
        if tls is not None:
            return diag.fail(
                name,
                f"{url}: TLS handshake failed ({tls})",
                "the URL may point at a non-TLS port or a proxy",
            ), None
        return diag.fail(
            name,
            f"{url}: unreachable ({type(exc).__name__})",
            "check the URL, the network and firewall, and that the HGS runs",
        ), None
    if response.status_code != 200:
        return diag.fail(
            name,
            f"{url}: /healthz answered {response.status_code}",
            "the HGS is unhealthy: ask its administrator ('hgs diagnose')",
        ), None
    date = response.headers.get("date")
    when = email.utils.parsedate_to_datetime(date).timestamp() if date else None
    return diag.ok(name, f"{url}: TLS verified with {config.ca_file}, healthy"), when


def check_clock(hgs_time: float | None, now: float) -> Check:
    """This host's clock against the HGS's (the KPS tolerates a minute)."""
    if hgs_time is None:
        return Check("clock", Status.SKIP, "no HGS answered with its time")
    skew = now - hgs_time
    detail = f"this host's clock is {skew:+.0f} s from the HGS's"
    fix = "synchronize the clock with NTP (timedatectl set-ntp true; chronyc tracking)"
    if abs(skew) > MAX_SKEW:
        return diag.fail("clock", detail, fix)
    if abs(skew) > WARN_SKEW:
        return diag.warn("clock", detail, fix)
    return diag.ok("clock", detail)


def check_agent(config: HostConfig) -> Check:
    """Whether the agent answers on its socket, and its attestation status."""
    try:
        status = AgentClient(config.socket, timeout=5).status()
    except GuardfabError as exc:
        return diag.warn("agent", str(exc), "start it: systemctl enable --now guardfab-host-agent")
    detail = f"running; attestation status {status.attestation_status}"
    if status.attestation_status != "Passed":
        return diag.warn("agent", detail, "see 'guardfab host status' for the failed policies")
    return diag.ok("agent", detail)


# ---------------------------------------------------------------------- management API

#: Warn this long before the management API's certificate expires.
MANAGE_CERT_WARN_DAYS = 30


def _private_files(files: ManagementFiles) -> list[Path]:
    tokens = [files.token_file(role) for role in ROLES]
    return [f for f in (files.server_key, files.access_file, *tokens) if f.exists()]


def check_management(config: HostConfig, now: float) -> Iterator[Check]:
    """The management API's directory: private files 0600, its certificate, its audit chain."""
    files = ManagementFiles(config.management_dir)
    if not files.ready():
        yield Check(
            "manage",
            Status.SKIP,
            f"{files.dir}: no management API set up (guardfab host manage init)",
        )
        return
    if not files.access_file.exists():
        yield diag.fail(
            "manage-files",
            f"{files.access_file} is missing: the API accepts no token",
            "move the directory away and run 'guardfab host manage init' (new tokens and TLS)",
        )
    wide = [
        f"{f.name} {f.stat().st_mode & 0o777:04o}"
        for f in _private_files(files)
        if f.stat().st_mode & 0o077
    ]
    if wide:
        yield diag.fail(
            "manage-files",
            f"readable by others: {', '.join(wide)}",
            f"chmod 600 {files.dir}/*.token {files.server_key} {files.access_file}",
        )
    elif files.access_file.exists():
        yield diag.ok("manage-files", f"{files.dir}: key, tokens and access table are 0600")
    yield _manage_certificate(files, now)
    yield _manage_audit(files)


def _manage_certificate(files: ManagementFiles, now: float) -> Check:
    try:
        leaf = x509.load_pem_x509_certificates(files.server_cert.read_bytes())[0]
    except (OSError, ValueError, IndexError) as exc:
        return diag.fail(
            "manage-tls",
            f"{files.server_cert}: unreadable ({exc})",
            "run 'guardfab host manage init' again",
        )
    left = leaf.not_valid_after_utc.timestamp() - now
    detail = f"certificate valid until {leaf.not_valid_after_utc:%Y-%m-%d}"
    fix = "issue a new one: move the directory away and run 'guardfab host manage init'"
    if left < 0:
        return diag.fail("manage-tls", detail + " (expired)", fix)
    if left < MANAGE_CERT_WARN_DAYS * 86400:
        return diag.warn("manage-tls", detail, fix)
    return diag.ok("manage-tls", detail)


def _manage_audit(files: ManagementFiles) -> Check:
    if not files.audit_db.exists():
        return Check("manage-audit", Status.SKIP, "no audit log yet (the agent creates it)")
    audit = ManagementAudit(files.audit_db)
    try:
        report = audit.verify()
    except GuardfabError as exc:
        return diag.fail(
            "manage-audit",
            str(exc),
            "keep the database for investigation; see 'guardfab host audit list'",
        )
    finally:
        audit.close()
    return diag.ok("manage-audit", f"hash chain intact: {report.records} record(s)")


# ---------------------------------------------------------------------- all


def _host_checks(config: HostConfig, last_ak: str | None) -> Iterator[Check]:
    if config.mode is HostMode.HOST_KEY:
        yield check_signing_key(config)
        return
    tpm_results, tpm = check_tpm(config, last_ak)
    yield from tpm_results
    try:
        log_result, log = check_event_log(config)
        yield log_result
        if tpm is not None and log is not None and log_result.status is Status.OK:
            yield check_replay(tpm, log)
        yield check_ci_policy(config, log)
    finally:
        if tpm is not None:
            tpm.close()


def _last_ak(config: HostConfig) -> str | None:
    try:
        status = StateFiles(config.state_dir).load_status()
    except GuardfabError:
        return None
    return None if status is None else status.ak_name


def run_checks(config: HostConfig, now: Callable[[], float]) -> list[Check]:
    """Every check for ``config``, in the order an attestation needs them."""
    results = [
        check_ca(config, now()),
        check_key(config.encryption_key, "host encryption key"),
        check_state_dir(config),
    ]
    results += _host_checks(config, _last_ak(config))
    primary, hgs_time = probe_hgs(config.primary.attestation_url, config, "hgs")
    results.append(primary)
    if config.fallback is not None:
        fallback, fallback_time = probe_hgs(config.fallback.attestation_url, config, "hgs-fallback")
        results.append(fallback)
        hgs_time = hgs_time if hgs_time is not None else fallback_time
    else:
        results.append(Check("hgs-fallback", Status.SKIP, "no fallback HGS configured"))
    results.append(check_clock(hgs_time, now()))
    results.append(check_agent(config))
    results += check_management(config, now())
    return results
