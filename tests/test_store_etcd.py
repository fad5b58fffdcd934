"""EtcdStore against real etcd servers: TLS, authentication, limits, foreign data.

The contract suite (tests/test_store_contract.py) holds EtcdStore to the memory
store's answers; these tests attack what only a networked backend has: a member
with a certificate from the wrong CA, a client without its certificate, a wrong
password (which must never appear in an error), requests etcd would refuse
half-way, and keys under guardfab's prefix that guardfab did not write.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from etcd_harness import (  # noqa: F401 -- the *_fixture names are fixtures
    EtcdCluster,
    StoreOpener,
    TlsFiles,
    etcd_server_fixture,
    etcd_stores_fixture,
)
from guardfab.store import ABSENT, EtcdStore, StoreError, StoreSchemaError, StoreUsageError
from guardfab.store.base import MAX_TXN_OPS, MAX_VALUE_BYTES
from guardfab.store.etcd_codec import b64, decode_stamp, encode_stamp
from guardfab.store.etcd_expiry import INDEX_ROOT

PASSWORD = "correct horse battery staple 7"
WRONG_PASSWORD = "Tr0ub4dor&3-not-it"


# --- certificates --------------------------------------------------------------


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage(
                [x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_ca(name: str, directory: Path) -> tuple[str, ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = directory / f"{name}.pem"
    path.write_bytes(
        _certificate(name, key, None, ca=True).public_bytes(serialization.Encoding.PEM)
    )
    return name, key, path


def issue(
    ca: tuple[str, ec.EllipticCurvePrivateKey, Path], name: str, directory: Path
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, key, (ca[0], ca[1]), ca=False)
    cert_path = directory / f"{name}.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, _write_key(key, directory / f"{name}.key")


@dataclass(frozen=True)
class TlsSetup:
    """An https member and the files a client may (or may not) reach it with."""

    endpoint: str
    ca: Path
    other_ca: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


@pytest.fixture(scope="module")
def tls_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSetup]:
    """An https etcd that wants client certificates from its CA; the files to reach it."""
    directory = tmp_path_factory.mktemp("etcd-tls")
    ca = make_ca("fabric-etcd-ca", directory)
    other_ca = make_ca("some-other-ca", directory)
    server_cert, server_key = issue(ca, "etcd-member", directory)
    client_cert, client_key = issue(ca, "hgs-node", directory)
    stranger_cert, stranger_key = issue(other_ca, "stranger", directory)
    files = TlsFiles(ca=ca[2], cert=server_cert, key=server_key, client_ca=ca[2])
    cluster = EtcdCluster(directory / "cluster", tls=files).start()
    yield TlsSetup(
        cluster.endpoints[0],
        ca[2],
        other_ca[2],
        client_cert,
        client_key,
        stranger_cert,
        stranger_key,
    )
    cluster.stop()


def tls_store(setup: TlsSetup, **kwargs: object) -> EtcdStore:
    kwargs.setdefault("ca_file", setup.ca)
    kwargs.setdefault("cert_file", setup.client_cert)
    kwargs.setdefault("key_file", setup.client_key)
    return EtcdStore([setup.endpoint], **kwargs)  # type: ignore[arg-type]


def test_tls_with_the_fabric_ca_and_a_client_certificate_works(
    tls_setup: TlsSetup,
) -> None:
    store = tls_store(tls_setup, prefix="tls-ok/")
    try:
        revision = store.put("hosts/a", b"v")
        entry = store.get("hosts/a")
        assert entry is not None
        assert (entry.value, entry.revision) == (b"v", revision)
    finally:
        store.close()


TLS_ATTACKS = [
    ("member certificate from another CA", {"ca_file": "other_ca"}),
    ("no client certificate", {"cert_file": None, "key_file": None}),
    (
        "client certificate from another CA",
        {"cert_file": "stranger_cert", "key_file": "stranger_key"},
    ),
]


@pytest.mark.parametrize(("what", "change"), TLS_ATTACKS, ids=[a[0] for a in TLS_ATTACKS])
def test_tls_refuses_the_wrong_ca_and_missing_or_foreign_client_certificates(
    tls_setup: TlsSetup, what: str, change: dict[str, str | None]
) -> None:
    kwargs = {k: None if v is None else getattr(tls_setup, v) for k, v in change.items()}
    store = tls_store(tls_setup, prefix="tls-attack/", timeout=3, **kwargs)
    started = time.monotonic()
    try:
        with pytest.raises(StoreError) as info:
            store.put("hosts/a", b"must not land")
    finally:
        store.close()
    assert tls_setup.endpoint in str(info.value)
    assert time.monotonic() - started < 3.5
    if what == "member certificate from another CA":
        assert "TLS" in str(info.value)  # refused at the handshake, not retried for 3 s
    good = tls_store(tls_setup, prefix="tls-attack/")
    try:
        assert good.get("hosts/a") is None  # nothing was written
    finally:
        good.close()


def test_unreadable_tls_files_are_a_usage_error_naming_them(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-ca.pem"
    with pytest.raises(StoreUsageError, match=r"no-such-ca\.pem"):
        EtcdStore(["https://127.0.0.1:2379"], ca_file=missing)


# --- authentication ------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """A plain-http etcd with authentication on: user root, password PASSWORD."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-auth")).start()
    endpoint = cluster.endpoints[0]
    for path, body in [
        ("/v3/auth/user/add", {"name": "root", "password": PASSWORD}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/enable", {}),
    ]:
        httpx.post(endpoint + path, json=body, timeout=5).raise_for_status()
    yield cluster
    cluster.stop()


def test_the_right_password_works(auth_cluster: EtcdCluster) -> None:
    store = EtcdStore(auth_cluster.endpoints, username="root", password=PASSWORD, prefix="a/")
    try:
        revision = store.put("k", b"v")
        assert store.get("k") is not None
        assert store.current_revision() == revision
    finally:
        store.close()


def test_a_wrong_password_is_refused_without_showing_it(
    auth_cluster: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    store = EtcdStore(auth_cluster.endpoints, username="root", password=WRONG_PASSWORD, prefix="a/")
    try:
        with pytest.raises(StoreError) as info:
            store.put("k", b"must not land")
    finally:
        store.close()
    text = f"{info.value} {info.value!r} {info.value.__cause__!r} {info.value.__context__!r}"
    assert "authentication failed" in text
    assert "'root'" in text
    assert WRONG_PASSWORD not in text
    assert WRONG_PASSWORD not in caplog.text
    assert PASSWORD not in caplog.text


def test_no_credentials_on_an_auth_cluster_is_refused(auth_cluster: EtcdCluster) -> None:
    store = EtcdStore(auth_cluster.endpoints, prefix="a/")
    try:
        with pytest.raises(StoreError, match="refused"):
            store.put("k", b"must not land")
    finally:
        store.close()


def test_credentials_in_an_endpoint_url_are_refused_without_echoing_them() -> None:
    with pytest.raises(StoreUsageError) as info:
        EtcdStore([f"http://root:{PASSWORD}@127.0.0.1:2379"])
    assert PASSWORD not in str(info.value)
    with pytest.raises(StoreUsageError, match="both"):
        EtcdStore(["http://127.0.0.1:2379"], username="root")


# --- limits and bad input ------------------------------------------------------


def everything(store: EtcdStore) -> tuple[int, list[tuple[str, bytes, int]]]:
    return store.current_revision(), [(e.key, e.value, e.revision) for e in store.list("")]


def test_requests_etcd_would_refuse_are_refused_before_any_write(
    etcd_stores: StoreOpener,
) -> None:
    store = etcd_stores(max_txn_ops=MAX_TXN_OPS)  # what an etcd with default flags takes
    store.put("hosts/a", b"v")
    before = everything(store)
    big = b"x" * (MAX_VALUE_BYTES - 100)
    refused = [
        lambda: store.put("k", b"x" * (MAX_VALUE_BYTES + 1)),
        lambda: store.transaction(puts=[("k1", big, None), ("k2", big, None)]),
        lambda: store.transaction(deletes=[f"k{i}" for i in range(MAX_TXN_OPS + 1)]),
        # 100 revision compares need 200 etcd compares: more than this cluster allows.
        lambda: store.transaction(compares=[(f"c{i}", 1) for i in range(100)]),
    ]
    for call in refused:
        with pytest.raises(StoreUsageError):
            call()
        assert everything(store) == before


def test_a_value_of_the_largest_size_round_trips(etcd_stores: StoreOpener) -> None:
    store = etcd_stores()
    value = bytes(range(256)) * (MAX_VALUE_BYTES // 256)
    store.put("big", value)
    entry = store.get("big")
    assert entry is not None
    assert entry.value == value


def test_a_key_guardfab_did_not_write_is_named_not_misread(
    etcd_stores: StoreOpener, etcd_server: EtcdCluster
) -> None:
    store = etcd_stores()
    store.put("hosts/good", b"v")
    body = {"key": b64((etcd_stores.prefix + "hosts/foreign").encode()), "value": b64(b"hi")}
    httpx.post(etcd_server.endpoints[0] + "/v3/kv/put", json=body, timeout=5)
    with pytest.raises(StoreSchemaError, match="hosts/foreign"):
        store.get("hosts/foreign")
    with pytest.raises(StoreSchemaError, match="hosts/foreign"):
        store.list("hosts/")
    good = store.get("hosts/good")
    assert good is not None
    assert good.value == b"v"


def test_prefixes_keep_stores_apart(etcd_stores: StoreOpener) -> None:
    one = etcd_stores(prefix=etcd_stores.prefix + "one/")
    two = etcd_stores(prefix=etcd_stores.prefix + "two/")
    one.put("hosts/a", b"1")
    assert two.get("hosts/a") is None
    assert two.list("") == []
    two.put("hosts/a", b"2", expect=ABSENT)
    assert [e.value for e in one.list("")] == [b"1"]


@pytest.mark.parametrize(
    "when", [0.0, 1e-300, 1.0, 1_800_000_000.123456, 1e300, -1.0, -1_800_000_000.5]
)
def test_expiry_stamps_sort_like_the_times_they_encode(when: float) -> None:
    assert decode_stamp(encode_stamp(when)) == when
    for other in (when - 1, when + 1, when * 2):
        assert (encode_stamp(when) < encode_stamp(other)) == (when < other)


def test_a_member_that_is_down_is_skipped(etcd_stores: StoreOpener) -> None:
    with socket_that_refuses() as dead:
        store = etcd_stores([dead, *etcd_stores.cluster.endpoints])
        revision = store.put("k", b"v")
        assert store.get("k") is not None
        assert store.endpoints[0] == dead
    assert revision >= 1


def test_no_member_reachable_is_a_store_error_naming_them() -> None:
    with socket_that_refuses() as dead:
        store = EtcdStore([dead], timeout=0.5)
        try:
            with pytest.raises(StoreError, match=dead.split("//")[1]):
                store.get("k")
        finally:
            store.close()


@contextlib.contextmanager
def socket_that_refuses() -> Iterator[str]:
    """A 127.0.0.1 port nobody listens on, as an endpoint URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# --- the expiry index ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def index_entries(cluster: EtcdCluster, prefix: str) -> list[tuple[float, str]]:
    """(expiry, key) of every expiry index key of ``prefix``, read from etcd directly."""
    start = INDEX_ROOT + prefix.encode()
    body = {"key": b64(start), "range_end": b64(start[:-1] + bytes([start[-1] + 1]))}
    answer = httpx.post(cluster.endpoints[0] + "/v3/kv/range", json=body, timeout=5).json()
    entries = []
    for kv in answer.get("kvs") or []:
        rest = base64.b64decode(kv["key"])[len(start) :]
        entries.append((decode_stamp(rest[:8]), rest[8:].decode()))
    return entries


def test_the_expiry_index_follows_rewrites_and_stays_out_of_sight(
    etcd_stores: StoreOpener,
) -> None:
    clock = Clock()
    store = etcd_stores(clock=clock)
    now = clock.now
    store.put("n/a", b"", ttl=5)
    store.put("n/a", b"", ttl=50)  # a rewrite of a live TTL entry replaces its index key
    assert index_entries(etcd_stores.cluster, etcd_stores.prefix) == [(now + 50, "n/a")]
    revision = store.put("n/b", b"", ttl=5)
    store.put("n/b", b"kept", expect=revision)  # now without TTL: its index key is stale
    store.put("n/c", b"", ttl=1)
    watch = store.watch("", start_revision=revision)
    assert [e.key for e in store.list("")] == ["n/a", "n/b", "n/c"]  # no index key shows
    clock.now += 10
    assert store.compact_expired() == 1  # n/c; n/b is live without TTL
    assert [e.key for e in store.list("")] == ["n/a", "n/b"]
    # The stale key went with the real removal; only n/a's is left.
    assert index_entries(etcd_stores.cluster, etcd_stores.prefix) == [(now + 50, "n/a")]
    events = []
    while (event := watch.next_event(timeout=0.3)) is not None:
        events.append((event.kind.value, event.key))
    assert events == [("put", "n/b"), ("put", "n/b"), ("put", "n/c"), ("delete", "n/c")]
    watch.cancel()


def test_a_write_over_an_expired_entry_takes_its_index_key_too(etcd_stores: StoreOpener) -> None:
    clock = Clock()
    store = etcd_stores(clock=clock)
    store.put("n/a", b"", ttl=1)
    clock.now += 2
    store.put("n/a", b"again")  # deletes the expired entry first, index key included
    assert index_entries(etcd_stores.cluster, etcd_stores.prefix) == []
    assert store.compact_expired() == 0
    entry = store.get("n/a")
    assert entry is not None
    assert entry.value == b"again"
