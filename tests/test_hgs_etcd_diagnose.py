"""``guardfab hgs diagnose`` on an HGS whose state is in etcd: the cluster is checked, not state.db.

Against real etcd members: a healthy 3-member TLS cluster with client certificates
passes every etcd check; a member killed is named (a warning: the others serve);
hgs.json naming fewer members than the cluster has is named; the wrong CA fails
at the handshake with the fix; a loose password file fails without the password
showing; an expiring client certificate warns and an expired one fails; a
configured max_txn_ops the cluster refuses fails with the etcd flag to set.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

from etcd_harness import (  # noqa: F401 -- the *_fixture names are fixtures
    EtcdCluster,
    TlsFiles,
    etcd_server_fixture,
    new_prefix,
)
from guardfab.attestation.trust import AttestationMode, HostKey
from guardfab.cli.main import cli
from guardfab.diagnostics import Status
from guardfab.formats import jose
from guardfab.hgs import registry as reg
from guardfab.hgs.diagnose import DiagnoseReport, run_checks
from guardfab.hgs.server import open_store
from guardfab.hgs.state import EtcdStoreSettings, HgsConfig, HgsState, init_state
from guardfab.store import AuditLog, EtcdStore
from test_store_etcd import issue, make_ca

CLIENT_DAYS = 90

NOW = datetime.datetime.now(datetime.UTC)
DEAD_URL = "https://127.0.0.1:9"  # no HGS is served in these tests: only the store is checked


@dataclass(frozen=True)
class TlsCluster:
    cluster: EtcdCluster
    ca: Path
    other_ca: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsCluster]:
    """Three https members that require client certificates from the fabric's etcd CA."""
    directory = tmp_path_factory.mktemp("etcd-diag")
    ca = make_ca("fabric-etcd-ca", directory)
    other_ca = make_ca("some-other-ca", directory)
    server_cert, server_key = issue(ca, "etcd-member", directory)
    client_cert, client_key = issue_for_days(ca, "hgs-node", directory, CLIENT_DAYS)
    client_key.chmod(0o600)
    files = TlsFiles(ca=ca[2], cert=server_cert, key=server_key, client_ca=ca[2])
    cluster = EtcdCluster(directory / "cluster", 3, tls=files).start()
    yield TlsCluster(cluster, ca[2], other_ca[2], client_cert, client_key)
    cluster.stop()


def issue_for_days(
    ca: tuple[str, ec.EllipticCurvePrivateKey, Path], name: str, directory: Path, days: int
) -> tuple[Path, Path]:
    """A client certificate from ``ca`` valid for ``days`` (the harness's last one day)."""
    cert_path, key_path = issue(ca, name, directory)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    longer = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(NOW + datetime.timedelta(days=days))
    )
    for extension in cert.extensions:
        longer = longer.add_extension(extension.value, extension.critical)
    cert_path.write_bytes(
        longer.sign(ca[1], hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    return cert_path, key_path


def etcd_hgs(directory: Path, endpoints: list[str], **settings: object) -> Path:
    settings.setdefault("max_txn_ops", 512)
    store = EtcdStoreSettings(tuple(endpoints), new_prefix(), **settings).to_dict()  # type: ignore[arg-type]
    init_state(directory, HgsConfig(service_name="diag-etcd", store=store))
    return directory


def with_a_host_key(directory: Path) -> Path:
    """Host-key mode with one host registered, audited, as the admin API would."""
    register_host_key(directory)
    return directory


def register_host_key(directory: Path) -> ECKey:
    """Host-key mode with host-a registered, audited as the admin API would; its signing key."""
    signing = ECKey.generate_key("P-256")
    key = HostKey(jose.thumbprint(signing), "host-a", jose.public_jwk(signing))
    store = open_store(HgsState(directory))
    try:
        txn = reg.Registry.trust_txn(
            [
                (reg.MODES_KEY, [AttestationMode.HOST_KEY.value]),
                (reg.HOST_KEYS + key.key_id, key.to_dict()),
            ]
        )
        AuditLog(store).append(
            kind="admin", actor="admin", subject="setup", outcome="success", txn=txn
        )
    finally:
        store.close()
    return signing


def checks_of(report: DiagnoseReport, start: str) -> dict[str, tuple[Status, str, str]]:
    return {c.name: (c.status, c.message, c.fix) for c in report.checks if c.name.startswith(start)}


def status_of(report: DiagnoseReport, name: str) -> Status:
    found = [c.status for c in report.checks if c.name == name]
    assert found, f"no check {name}: {[c.name for c in report.checks]}"
    return found[0]


def tls_hgs(tmp_path: Path, tls: TlsCluster, **settings: object) -> Path:
    settings.setdefault("ca_file", str(tls.ca))
    settings.setdefault("cert_file", str(tls.client_cert))
    settings.setdefault("key_file", str(tls.client_key))
    return etcd_hgs(tmp_path / "hgs", tls.cluster.endpoints, **settings)


def test_a_healthy_etcd_hgs_passes_every_etcd_check(
    tmp_path: Path, tls_cluster: TlsCluster
) -> None:
    directory = with_a_host_key(tls_hgs(tmp_path, tls_cluster))
    report = run_checks(directory, url=DEAD_URL, now=NOW)
    etcd = checks_of(report, "etcd")
    not_ok = {n: c for n, c in etcd.items() if c[0] is not Status.OK}
    assert not not_ok, not_ok
    for endpoint in tls_cluster.cluster.endpoints:
        assert f"etcd-member {endpoint}" in etcd
    assert "3 member(s); hgs.json names 3" in etcd["etcd-members"][1]
    assert etcd["etcd-leader"][1].startswith("the leader is m")
    assert "512 operations" in etcd["etcd-max-txn-ops"][1]
    for name in ("store", "audit-chain", "modes", "host-keys", "file-modes"):
        assert status_of(report, name) is Status.OK, name
    assert "state.db" not in json.dumps(report.to_dict())
    # The JSON shape every diagnose command prints, unchanged.
    data = report.to_dict()
    assert set(data) == {"ok", "counts", "checks", "directory"}
    assert set(data["checks"][0]) == {"check", "status", "message", "fix"}
    # Only the service check fails (nothing serves DEAD_URL).
    assert [c.name for c in report.failures()] == ["service"]


def test_diagnose_changes_nothing_in_etcd(tmp_path: Path, tls_cluster: TlsCluster) -> None:
    directory = with_a_host_key(tls_hgs(tmp_path, tls_cluster))
    settings = HgsState(directory).etcd_settings()
    store = EtcdStore(
        list(settings.endpoints),
        ca_file=tls_cluster.ca,
        cert_file=tls_cluster.client_cert,
        key_file=tls_cluster.client_key,
    )
    try:
        before = store.current_revision()
        run_checks(directory, url=DEAD_URL, now=NOW)
        assert store.current_revision() == before
    finally:
        store.close()


def test_the_wrong_ca_fails_at_the_handshake_with_the_fix(
    tmp_path: Path, tls_cluster: TlsCluster
) -> None:
    directory = tls_hgs(tmp_path, tls_cluster, ca_file=str(tls_cluster.other_ca))
    started = time.monotonic()
    report = run_checks(directory, url=DEAD_URL, now=NOW)
    assert time.monotonic() - started < 10
    for endpoint in tls_cluster.cluster.endpoints:
        status, message, fix = checks_of(report, "etcd-member")[f"etcd-member {endpoint}"]
        assert status is Status.FAIL
        assert "TLS" in message
        assert "store.ca_file must be the CA that issued the members' certificates" in fix
    assert status_of(report, "etcd-cluster") is Status.SKIP
    assert not [c for c in report.checks if c.name in ("store", "audit-chain")]
    assert status_of(report, "attestation") is Status.SKIP
    assert not report.ok


def test_expiring_and_expired_client_certificates(tmp_path: Path, tls_cluster: TlsCluster) -> None:
    directory = tls_hgs(tmp_path, tls_cluster)
    soon = run_checks(directory, url=DEAD_URL, now=NOW + datetime.timedelta(days=CLIENT_DAYS - 3))
    status, message, fix = checks_of(soon, "etcd-client-cert")["etcd-client-cert"]
    assert (status, "expires on" in message) == (Status.WARN, True)
    assert "issue a new etcd client certificate" in fix
    later = run_checks(directory, url=DEAD_URL, now=NOW + datetime.timedelta(days=CLIENT_DAYS + 1))
    status, message, _ = checks_of(later, "etcd-client-cert")["etcd-client-cert"]
    assert (status, "expired on" in message) == (Status.FAIL, True)


def test_a_member_down_is_named_and_a_member_not_configured_too(tmp_path: Path) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", 3).start()
    try:
        full = with_a_host_key(etcd_hgs(tmp_path / "full", cluster.endpoints))
        partial = etcd_hgs(tmp_path / "partial", cluster.endpoints[:2])
        report = run_checks(partial, url=DEAD_URL, now=NOW)
        status, message, fix = checks_of(report, "etcd-members")["etcd-members"]
        assert status is Status.WARN
        assert "reports 3 member(s); hgs.json names 2" in message
        assert cluster.endpoints[2] in message
        assert "--store-etcd" in fix

        leader = cluster.leader()
        down = next(m for m in cluster.members if m is not leader)  # a follower: no election
        down.kill()
        report = run_checks(full, url=DEAD_URL, now=NOW)
    finally:
        cluster.stop()
    members = checks_of(report, "etcd-member ")
    status, message, fix = members[f"etcd-member {down.endpoint}"]
    assert status is Status.WARN, message
    assert "does not answer" in message
    assert "start etcd on that member" in fix
    others = [e for e in cluster.endpoints if e != down.endpoint]
    assert all(members[f"etcd-member {e}"][0] is Status.OK for e in others)
    for name in ("etcd-leader", "etcd-max-txn-ops", "store", "audit-chain", "host-keys"):
        assert status_of(report, name) is Status.OK, name


def test_no_member_answering_fails_each(tmp_path: Path) -> None:
    directory = etcd_hgs(tmp_path / "hgs", ["http://127.0.0.1:9"], timeout=0.5)
    report = run_checks(directory, url=DEAD_URL, now=NOW)
    status, _, fix = checks_of(report, "etcd-member")["etcd-member http://127.0.0.1:9"]
    assert status is Status.FAIL
    assert "'hgs serve' does not start" in fix
    assert status_of(report, "attestation") is Status.SKIP


def test_a_loose_password_file_fails_and_the_password_never_shows(
    tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    password_file = tmp_path / "etcd.password"
    password_file.write_text("s3cret-etcd-password\n")
    password_file.chmod(0o644)
    directory = etcd_hgs(
        tmp_path / "hgs",
        etcd_server.endpoints,
        username="hgs",
        password_file=str(password_file),
    )
    result = CliRunner().invoke(
        cli, ["hgs", "diagnose", "--dir", str(directory), "--url", DEAD_URL, "--json"]
    )
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    mode = next(c for c in data["checks"] if c["check"] == f"mode {password_file}")
    assert mode["status"] == "FAIL"
    assert f"chmod 600 {password_file}" in mode["fix"]
    assert "s3cret-etcd-password" not in result.output


def test_a_max_txn_ops_the_cluster_refuses_fails_naming_the_flag(
    tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    directory = etcd_hgs(tmp_path / "hgs", etcd_server.endpoints, max_txn_ops=1024)
    report = run_checks(directory, url=DEAD_URL, now=NOW)
    status, message, fix = checks_of(report, "etcd-max-txn-ops")["etcd-max-txn-ops"]
    assert status is Status.FAIL
    assert "1024" in message
    assert "--max-txn-ops 1024" in fix
