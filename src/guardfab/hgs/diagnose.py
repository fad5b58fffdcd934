"""``guardfab hgs diagnose``: every check of an HGS's health and configuration, with fixes.

Like the reference's Get-HgsTrace, it runs every check rather than stopping at
the first problem, and each result that is not OK says what to do. Checks run
in order of dependence: the state directory, its files and their modes, the
configuration, TLS, the keys, the store and its audit chain, what the active
attestation modes need registered, and finally whether the service answers
over HTTPS at its URL with its CA. A check whose input an earlier failure
removed is reported as SKIP (never as OK).

It reads the state directory and the store; it changes nothing (the store is
opened only if its file exists). An HGS on etcd gets the cluster's checks in
place of the state.db ones (:mod:`guardfab.hgs.diagnose_etcd`).
"""

from __future__ import annotations

import datetime
import ipaddress
import sqlite3
import ssl
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from guardfab import diagnostics as diag
from guardfab.attestation.admin_group_mode import DEPRECATION_WARNING
from guardfab.attestation.policies import effective_state, policy_named
from guardfab.attestation.trust import AttestationMode, PolicyState, TrustState
from guardfab.diagnostics import Check, Status
from guardfab.errors import GuardfabError
from guardfab.formats import jose
from guardfab.hgs.client import url_for_listen
from guardfab.hgs.diagnose_certs import key_match, validity
from guardfab.hgs.diagnose_etcd import EtcdDiagnosis
from guardfab.hgs.registry import Registry
from guardfab.hgs.state import ROLES, HgsState, token_digest
from guardfab.store.audit import AuditLog
from guardfab.store.base import Store
from guardfab.store.memory import MemoryStore
from guardfab.store.sqlite import SCHEMA_VERSION, SqliteStore

#: Files an initialized HGS directory holds, whether private (0600), and how to restore each.
FILES: tuple[tuple[str, bool, str], ...] = (
    ("hgs.json", False, "restore it from backup (see 'guardfab hgs init --help' for its fields)"),
    (
        "keys/attestation-signing.pem",
        True,
        "restore it from backup; a new key is a new signer that key protection must be told "
        "to trust (the old key's certificates stop verifying)",
    ),
    (
        "keys/nonce.key",
        True,
        "restore it, or write 32 random bytes (mode 0600): open challenges fail",
    ),
    ("tls/ca.pem", False, "restore it from backup: hosts and admins trust this CA"),
    ("tls/server.pem", False, "restore it, or issue a new server certificate from the HGS CA"),
    ("tls/server.key", True, "restore it, or issue a new server certificate and key"),
    ("tokens/admin.token", True, "restore it from backup (its SHA-256 is in access.json)"),
    ("tokens/reviewer.token", True, "restore it from backup (its SHA-256 is in access.json)"),
    ("access.json", True, "restore it from backup: it maps token digests to roles"),
)


#: How to fix what the attestation checks find.
FIX = {
    "tpm-hosts": "guardfab hgs host add-tpm --name H --ek-public FILE; or guardfab hgs ek-ca add "
    "VENDOR_CA.pem and guardfab hgs settings set --admit-certified-eks",
    "ek-cas": "guardfab hgs ek-ca add VENDOR_CA.pem",
    "base": "guardfab hgs baseline add --name NAME --log REFERENCE_HOST_LOG (or file-candidate "
    "and approve a host's verified boot)",
    "ci": "guardfab hgs ci-policy add --name NAME --file POLICY; or, if your hosts' boot loader "
    "measures none, guardfab hgs policy disable Hgs_CiPolicy",
    "host-keys": "guardfab hgs host add-key --name H --public-key FILE",
    "admin-group": "guardfab hgs mode set tpm (or host-key) once the hosts have moved",
    "groups": "guardfab hgs group add NAME; guardfab hgs group add-ca CA.pem",
    "store": "restore the store file from backup",
    "dir": "create it with 'guardfab hgs init --dir DIR', or give the right --dir",
    "tls": "restore tls/server.pem and tls/ca.pem from backup",
    "renew": "issue a new server certificate from the HGS CA for the same names, replace "
    "tls/server.pem and tls/server.key, and restart 'hgs serve'",
    "chain": "tls/ca.pem must be the CA that issued tls/server.pem: hosts verify with it",
}


@dataclass(frozen=True)
class DiagnoseReport:
    """Every check of one run."""

    directory: Path
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return diag.passed(self.checks)

    def failures(self) -> list[Check]:
        """The failed checks."""
        return [check for check in self.checks if check.status is Status.FAIL]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the shape every diagnose command prints, :mod:`guardfab.diagnostics`)."""
        return diag.report_dict(self.checks, directory=str(self.directory))

    def explain(self) -> str:
        """One line per check, the fix under each that is not OK, and a summary."""
        return diag.report_text(f"HGS diagnose: {self.directory}", self.checks)


@dataclass
class _Context:
    """What the checks learn as they go (None: not available, an earlier check failed)."""

    directory: Path
    now: datetime.datetime
    url: str | None
    state: HgsState | None = None
    store: Store | None = None


# --------------------------------------------------------------------- files and config


def check_files(ctx: _Context) -> Iterator[Check]:
    """The state directory exists and holds every file, private ones 0600."""
    if not ctx.directory.is_dir():
        yield diag.fail("state-directory", f"{ctx.directory} is not a directory", FIX["dir"])
        return
    yield diag.ok("state-directory", f"{ctx.directory} exists")
    missing = [(name, fix) for name, _private, fix in FILES if not (ctx.directory / name).is_file()]
    for name, fix in missing:
        yield diag.fail(f"file {name}", "missing", fix)
    if not missing:
        yield diag.ok("files", f"all {len(FILES)} files are present")
    yield from _check_modes(ctx)


def _check_modes(ctx: _Context) -> Iterator[Check]:
    private = [name for name, is_private, _fix in FILES if is_private]
    store_file = ctx.directory / "state.db"
    if store_file.exists():
        private.append("state.db")
    loose = []
    for name in private:
        path = ctx.directory / name
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) & 0o077:
            loose.append((name, stat.S_IMODE(path.stat().st_mode)))
    for name, mode in loose:
        yield diag.fail(
            f"mode {name}",
            f"mode {mode:04o}: readable or writable by group or others",
            f"chmod 600 {ctx.directory / name} (and find out who could read it: "
            "a leaked key or token must be replaced)",
        )
    if not loose:
        yield diag.ok("file-modes", "private files are 0600")


def check_config(ctx: _Context) -> Iterator[Check]:
    """hgs.json loads and is valid."""
    try:
        ctx.state = HgsState(ctx.directory)
    except GuardfabError as exc:
        yield diag.fail("config", f"hgs.json: {exc}", exc.hint or "fix hgs.json")
        return
    config = ctx.state.config
    if ctx.url is None:
        ctx.url = url_for_listen(config.listen)
    yield diag.ok(
        "config", f"hgs.json is valid (service {config.service_name!r}, listen {config.listen})"
    )


# --------------------------------------------------------------------- TLS


def _url_host(url: str) -> str:
    host = urlsplit(url).hostname or ""
    return host.strip("[]")


def _names_cover(cert: x509.Certificate, host: str) -> bool:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in san.get_values_for_type(x509.IPAddress)
    except ValueError:
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        return host.lower() in names or any(
            n.startswith("*.") and host.lower().split(".", 1)[-1] == n[2:] for n in names
        )


def check_tls(ctx: _Context) -> Iterator[Check]:
    """The server certificate: loads, is valid now and for 30 days, names the URL's host,
    chains to the HGS CA, and matches its key.
    """
    server, ca_file = ctx.directory / "tls" / "server.pem", ctx.directory / "tls" / "ca.pem"
    try:
        chain = x509.load_pem_x509_certificates(server.read_bytes())
        ca = x509.load_pem_x509_certificate(ca_file.read_bytes())
    except (OSError, ValueError) as exc:
        yield diag.fail("tls-certificate", f"cannot load the TLS certificates ({exc})", FIX["tls"])
        return
    yield validity("tls-validity", chain[0], ctx.now, FIX["renew"])
    yield _names(ctx, chain[0])
    yield _chain(chain, ca)
    yield key_match(
        "tls-key", ctx.directory / "tls" / "server.key", chain[0],
        label="tls/server.key", cert="tls/server.pem",
    )  # fmt: skip


def _names(ctx: _Context, leaf: x509.Certificate) -> Check:
    if ctx.url is None:
        return diag.skip("tls-names", "no URL (hgs.json did not load)")
    host = _url_host(ctx.url)
    if _names_cover(leaf, host):
        return diag.ok("tls-names", f"the certificate names {host}")
    return diag.fail(
        "tls-names",
        f"the certificate does not name {host} (from {ctx.url})",
        f"issue a certificate whose subjectAltName includes {host}, or listen on / "
        "use a name the certificate has",
    )


def _chain(chain: list[x509.Certificate], ca: x509.Certificate) -> Check:
    issuer = chain[1] if len(chain) > 1 else ca
    try:
        chain[0].verify_directly_issued_by(issuer)
        if issuer is not ca and issuer != ca:
            issuer.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        return diag.fail("tls-chain", f"it does not chain to tls/ca.pem ({exc})", FIX["chain"])
    return diag.ok("tls-chain", "the certificate chains to tls/ca.pem")


# --------------------------------------------------------------------- keys and tokens


def check_keys(ctx: _Context) -> Iterator[Check]:
    """The attestation signing key and the nonce key load; the token files match access.json."""
    if ctx.state is None:
        yield diag.skip("keys", "hgs.json did not load")
        return
    try:
        key = ctx.state.attestation_signing_key()
        yield diag.ok(
            "signing-key",
            f"the attestation signing key loads ({jose.signing_alg_for(key)}, "
            f"kid {jose.thumbprint(key)[:16]}...)",
        )
    except GuardfabError as exc:
        yield diag.fail("signing-key", f"the attestation signing key: {exc}", FILES[1][2])
    try:
        size = len(ctx.state.nonce_key())
        status = Status.OK if size >= 32 else Status.FAIL
        yield Check("nonce-key", status, f"the nonce MAC key has {size} bytes", FILES[2][2])
    except GuardfabError as exc:
        yield diag.fail("nonce-key", f"the nonce key: {exc}", FILES[2][2])
    yield from _tokens(ctx.state)


def _tokens(state: HgsState) -> Iterator[Check]:
    try:
        table = state.access()
    except (GuardfabError, ValueError, KeyError, TypeError) as exc:
        yield diag.fail(
            "access-tokens",
            f"access.json does not load ({type(exc).__name__})",
            FILES[-1][2],
        )
        return
    for role in ROLES:
        path = state.path("tokens", f"{role}.token")
        try:
            token = path.read_text().strip()
        except OSError:
            continue  # reported as a missing file
        if table.entries.get(token_digest(token)) != role:
            yield diag.fail(
                f"token {role}",
                f"tokens/{role}.token is not the {role} token of access.json",
                "restore the token file, or put its SHA-256 with this role in access.json "
                "and restart 'hgs serve'",
            )
        else:
            yield diag.ok(f"token {role}", f"tokens/{role}.token is the {role} token")


# --------------------------------------------------------------------- store and audit


def _schema_version(path: Path) -> int | None:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row is not None and str(row[0]).isdigit() else None


def check_store(ctx: _Context) -> Iterator[Check]:
    """The store opens, its schema is current, and the audit chain verifies.

    For an HGS on etcd the cluster is checked instead of ``state.db``
    (:mod:`guardfab.hgs.diagnose_etcd`), then the same audit chain.
    """
    if ctx.state is None:
        yield diag.skip("store", "hgs.json did not load")
        return
    if ctx.state.config.store.get("backend") == "etcd":
        etcd = EtcdDiagnosis(ctx.state, ctx.now)
        yield from etcd.checks()
        ctx.store = etcd.store
        if ctx.store is not None:
            yield _audit(ctx.store)
        return
    path = ctx.state.store_path()
    if not path.exists():
        ctx.store = MemoryStore()
        yield diag.warn(
            "store",
            f"{path.name} does not exist yet (nothing registered)",
            f"'guardfab hgs serve --dir {ctx.directory}' creates it",
        )
        return
    try:
        ctx.store = SqliteStore(path)
        version = _schema_version(path)
    except (GuardfabError, sqlite3.Error) as exc:
        hint = getattr(exc, "hint", "") or "restore the store file from backup"
        yield diag.fail("store", f"the store does not open: {exc}", hint)
        return
    if version == SCHEMA_VERSION:
        yield diag.ok("store", f"{path.name} opens, schema version {version} (current)")
    else:
        yield diag.warn(
            "store",
            f"schema version {version}; this guardfab writes {SCHEMA_VERSION}",
            "'hgs serve' migrates it on start",
        )
    yield _audit(ctx.store)


def _audit(store: Store) -> Check:
    try:
        report = AuditLog(store).verify()
    except GuardfabError as exc:
        return diag.fail("audit-chain", str(exc), exc.hint)
    except Exception as exc:  # noqa: BLE001 - a corrupt store must be reported, not crash diagnose
        return diag.fail(
            "audit-chain",
            f"the audit log does not read ({type(exc).__name__})",
            "the store file was edited outside guardfab: compare it with a backup",
        )
    return diag.ok("audit-chain", f"{report.records} records verify (head {report.head.hash[:16]})")


# --------------------------------------------------------------------- attestation config


def _enforced(trust: TrustState, name: str) -> bool:
    return effective_state(trust, policy_named(name)) is not PolicyState.DISABLED


def check_attestation(ctx: _Context) -> Iterator[Check]:
    """At least one mode is active and each active mode has what it needs registered."""
    if ctx.store is None:
        yield diag.skip("attestation", "the store did not open")
        return
    try:
        trust = Registry(ctx.store).trust()
    except GuardfabError as exc:
        yield diag.fail("trust-state", f"the stored trust state does not load: {exc}", FIX["store"])
        return
    modes = sorted(trust.modes)
    if not modes:
        yield diag.fail("modes", "no attestation mode is active", "guardfab hgs mode set tpm")
        return
    yield diag.ok("modes", "active: " + ", ".join(m.value for m in modes))
    checks: dict[AttestationMode, Callable[[TrustState], Iterator[Check]]] = {
        AttestationMode.TPM: _tpm_mode,
        AttestationMode.HOST_KEY: _host_key_mode,
        AttestationMode.ADMIN_GROUP: _admin_group_mode,
    }
    for mode in modes:
        yield from checks[mode](trust)


def _tpm_mode(trust: TrustState) -> Iterator[Check]:
    if trust.tpm_hosts:
        yield diag.ok("tpm-hosts", f"{len(trust.tpm_hosts)} TPM host(s) registered")
    elif trust.admit_certified_eks and trust.ek_roots:
        yield diag.ok(
            "tpm-hosts", f"TPMs certified by {len(trust.ek_roots)} vendor CA(s) are admitted"
        )
    else:
        yield diag.fail("tpm-hosts", "no TPM host is registered or admitted", FIX["tpm-hosts"])
    if trust.admit_certified_eks and not trust.ek_roots:
        yield diag.warn(
            "ek-cas", "admit_certified_eks is on; no vendor CA is trusted", FIX["ek-cas"]
        )
    if not _enforced(trust, "Hgs_PcrBaseline"):
        yield diag.ok("tpm-baselines", "Hgs_PcrBaseline is disabled")
    elif trust.baselines:
        yield diag.ok("tpm-baselines", f"{len(trust.baselines)} baseline(s) registered")
    else:
        yield diag.fail(
            "tpm-baselines", "no TPM baseline: TPM hosts fail Hgs_PcrBaseline", FIX["base"]
        )
    if not _enforced(trust, "Hgs_CiPolicy"):
        yield diag.ok("ci-policies", "Hgs_CiPolicy is disabled")
    elif trust.ci_policies:
        yield diag.ok("ci-policies", f"{len(trust.ci_policies)} CI policy(ies) registered")
    else:
        yield diag.fail("ci-policies", "no CI policy: TPM hosts fail Hgs_CiPolicy", FIX["ci"])


def _host_key_mode(trust: TrustState) -> Iterator[Check]:
    usable = [k for k in trust.host_keys if not k.revoked]
    if usable:
        yield diag.ok("host-keys", f"{len(usable)} host key(s) registered")
    else:
        yield diag.fail("host-keys", "no usable host key is registered", FIX["host-keys"])


def _admin_group_mode(trust: TrustState) -> Iterator[Check]:
    yield diag.warn("admin-group", DEPRECATION_WARNING, FIX["admin-group"])
    if not trust.host_groups or not trust.group_roots:
        yield diag.fail("host-groups", "no host group or no host CA is registered", FIX["groups"])
    else:
        yield diag.ok(
            "host-groups", f"{len(trust.host_groups)} group(s), {len(trust.group_roots)} host CA(s)"
        )


# --------------------------------------------------------------------- the service


def check_service(ctx: _Context, timeout: float = 5.0) -> Iterator[Check]:
    """The service answers /healthz over HTTPS at its URL, verified with the HGS CA."""
    if ctx.url is None:
        yield diag.skip("service", "no URL (hgs.json did not load)")
        return
    try:
        context = ssl.create_default_context(cafile=str(ctx.directory / "tls" / "ca.pem"))
        with httpx.Client(verify=context, timeout=timeout) as client:
            response = client.get(ctx.url.rstrip("/") + "/healthz")
    except (OSError, ssl.SSLError) as exc:
        yield diag.fail("service", f"cannot load tls/ca.pem ({exc})", FILES[3][2])
        return
    except httpx.ConnectError as exc:
        tls = "certificate" in str(exc).lower()
        fix = (
            "the TLS certificate does not verify for this URL: see the tls-* checks"
            if tls
            else f"start it: guardfab hgs serve --dir {ctx.directory} (check hgs.json 'listen' "
            "and the firewall)"
        )
        yield diag.fail("service", f"{ctx.url} does not answer over HTTPS ({exc})", fix)
        return
    except httpx.HTTPError as exc:
        yield diag.fail(
            "service",
            f"{ctx.url}: {type(exc).__name__}",
            "check the service's log; restart 'hgs serve'",
        )
        return
    if response.status_code != 200:
        yield diag.fail(
            "service",
            f"{ctx.url}/healthz answered {response.status_code}",
            "check that this URL is the HGS and look at its log",
        )
        return
    yield diag.ok("service", f"{ctx.url} answers over HTTPS, verified with tls/ca.pem")


_CHECKS: tuple[Callable[[_Context], Iterator[Check]], ...] = (
    check_files,
    check_config,
    check_tls,
    check_keys,
    check_store,
    check_attestation,
    check_service,
)


def run_checks(
    directory: Path, *, url: str | None = None, now: datetime.datetime | None = None
) -> DiagnoseReport:
    """Run every check on the HGS state in ``directory`` (and its service at ``url``, by
    default the one hgs.json names).
    """
    ctx = _Context(Path(directory), now or datetime.datetime.now(datetime.UTC), url)
    checks: list[Check] = []
    try:
        for check in _CHECKS:
            checks += list(check(ctx))
            if not ctx.directory.is_dir():
                break  # nothing else can be checked
    finally:
        if ctx.store is not None:
            ctx.store.close()
    return DiagnoseReport(ctx.directory, tuple(checks))
