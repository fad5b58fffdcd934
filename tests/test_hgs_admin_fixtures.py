"""Helpers for the HGS administration tests: a served HGS per module, store probes, inputs.

The admin tests talk to a real ``guardfab hgs serve`` over HTTPS; to see that a
refused request changed nothing they read the same SQLite store file directly
(SQLite in WAL mode is safe to share between processes): its store-wide
revision moves on every write, so an unchanged revision means nothing was stored.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from guardfab.attestation.result import AttestationResult
from guardfab.attestation.tpm_mode import verify_tpm_evidence
from guardfab.formats.encoding import b64url_encode
from guardfab.hgs import registry as reg
from guardfab.hgs.last_record import encode_last_record
from guardfab.store.audit import AuditLog
from guardfab.store.base import Txn
from guardfab.store.sqlite import SqliteStore
from guardfab.tpm.structures import marshal_public2b
from hgs_harness import RunningHgs, start_hgs
from test_attestation_fixtures import NONCE, NOW, Boot, SoftHost, trust_for

#: Secrets that must never show up in an answer, an audit record or CLI output.
SECRET_FILES = ("tokens/admin.token", "tokens/reviewer.token")


@contextmanager
def served_hgs(directory: Path) -> Iterator[RunningHgs]:
    """An HGS served from a new state directory, stopped afterwards."""
    hgs = start_hgs(directory)
    try:
        yield hgs
    finally:
        hgs.stop()


class Probe:
    """Reads the HGS's store file directly, to see what a request changed."""

    def __init__(self, hgs: RunningHgs) -> None:
        self.store = SqliteStore(hgs.directory / "state.db")
        self.audit = AuditLog(self.store)

    def revision(self) -> int:
        """The store-wide revision: it moves on every write."""
        return self.store.current_revision()

    def audit_seq(self) -> int:
        """How many audit records there are."""
        return self.audit.head().seq

    def last_audit(self) -> dict[str, Any]:
        """The newest audit record."""
        records = list(self.audit.iter_records(max(0, self.audit_seq() - 1)))
        return dataclasses.asdict(records[-1])

    def put_last(self, result: AttestationResult) -> None:
        """Record ``result`` as its host's last attestation, as the attestation flow does.

        The record names its boot, stored under ``hosts/boot/<host>`` in the same transaction.
        """
        assert result.host_id is not None
        last, boot = encode_last_record(result)
        txn = Txn().put(reg.LAST + result.host_id, last)
        if boot is not None:
            txn.put(reg.BOOT + result.host_id, boot.value)
        txn.commit(self.store)

    def put_last_inline(self, result: AttestationResult) -> None:
        """Record ``result`` as an HGS before hosts/boot/ did: the boot's events in the record."""
        assert result.host_id is not None
        record = {
            "result": result.to_dict(),
            "summary": None if result.summary is None else result.summary.to_dict(),
        }
        self.store.put(reg.LAST + result.host_id, reg.encode(record))

    def close(self) -> None:
        """Release the store file."""
        self.store.close()


@contextmanager
def unchanged(probe: Probe) -> Iterator[None]:
    """Assert that the block wrote nothing to the store (no record, no audit entry)."""
    before = (probe.revision(), probe.audit_seq())
    yield
    assert (probe.revision(), probe.audit_seq()) == before, "a refused request changed the store"


def tokens_of(hgs: RunningHgs) -> list[str]:
    """The HGS's access tokens (to assert they never leak)."""
    return [(hgs.directory / name).read_text().strip() for name in SECRET_FILES]


def pem(cert: Any) -> str:
    """A certificate as PEM text."""
    return str(cert.public_bytes(serialization.Encoding.PEM).decode("ascii"))


def ek_public_b64(host: SoftHost) -> str:
    """A soft host's EK public area as the API takes it (TPM2B_PUBLIC, base64url)."""
    return b64url_encode(marshal_public2b(host.ek.public))


def new_public_key_pem() -> str:
    """A fresh EC P-256 public key, PEM (a host key)."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_bytes(serialization.Encoding.PEM, spki).decode("ascii")


def attested(host: SoftHost) -> AttestationResult:
    """``host``'s attestation against the golden trust (baseline golden-2026, the CI policy)."""
    return verify_tpm_evidence(host.evidence(), trust_for(host), nonce=NONCE, now=NOW)


#: A host after a firmware update that changed the secure boot db: it no longer
#: matches the golden baseline (PCR 7 differs, event by event).
UPDATED = Boot(db=b"db: vendor CA + 2026 update CA")


def write_json(path: Path, data: Any) -> Path:
    """Write JSON to ``path``; return it."""
    path.write_text(json.dumps(data))
    return path


def in_days(days: int) -> datetime.datetime:
    """Now plus ``days`` (UTC)."""
    return datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)


@pytest.fixture(scope="module")
def module_hgs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHgs]:
    """One HGS for a whole test module (import this fixture into the module)."""
    with served_hgs(tmp_path_factory.mktemp("hgs") / "hgs") as hgs:
        yield hgs


@pytest.fixture(scope="module")
def probe(module_hgs: RunningHgs) -> Iterator[Probe]:
    """A probe on the module's HGS store."""
    found = Probe(module_hgs)
    try:
        yield found
    finally:
        found.close()
