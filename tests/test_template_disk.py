"""Signing and verifying template disk files: one changed byte anywhere must be caught."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc.jwk import ECKey

from guardfab.errors import (
    FormatError,
    InvalidInputError,
    NotAuthorizedError,
    UsageError,
    VerificationError,
)
from guardfab.formats import merkle
from guardfab.formats.template import (
    DiskVersion,
    PublisherKey,
    VerifiedDiskSignature,
    VersionRule,
    VolumeSignatureCatalog,
    verify_disk_signature,
)
from guardfab.tenant import template as disks

CHUNK = 1024  # the smallest allowed chunk: many chunks from a few KB of disk
SIZE = 5 * CHUNK + 300  # five full chunks and a short last one
VERSION = DiskVersion(1, 0, 0, 0)


@pytest.fixture(scope="module")
def publisher() -> ECKey:
    return ECKey.generate_key("P-256")


@pytest.fixture(scope="module")
def mallory() -> ECKey:
    return ECKey.generate_key("P-256")


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "template.img"
    path.write_bytes(os.urandom(SIZE))
    return path


def protect(path: Path, key: ECKey) -> bytes:
    _, signature = disks.protect_disk(path, key, name="ws2025", version=VERSION, chunk_size=CHUNK)
    return signature


@given(
    data=st.binary(max_size=5000),
    workers=st.integers(min_value=1, max_value=3),
)
@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_streaming_digest_equals_in_memory_digest(
    data: bytes, workers: int, tmp_path: Path
) -> None:
    path = tmp_path / "d.img"
    path.write_bytes(data)
    measurement = disks.measure_disk(path, chunk_size=CHUNK, workers=workers)
    assert measurement.size == len(data)
    assert measurement.digest.root == merkle.digest_of_bytes(data, CHUNK)


def test_progress_reports_every_byte_once(disk: Path) -> None:
    seen: list[int] = []
    disks.measure_disk(disk, chunk_size=CHUNK, progress=seen.append)
    assert sum(seen) == SIZE
    assert len(seen) == merkle.chunk_count(SIZE, CHUNK)


def test_protect_then_verify(disk: Path, publisher: ECKey) -> None:
    signature = protect(disk, publisher)
    verified = disks.verify_disk(disk, signature, PublisherKey.from_key(publisher))
    assert verified.statement.size == SIZE
    assert verified.statement.digest.chunk_size == CHUNK


def _flip(offset: int) -> Callable[[bytearray], bytearray]:
    def mutate(data: bytearray) -> bytearray:
        data[offset] ^= 0x01
        return data

    return mutate


DISK_ATTACKS: dict[str, Callable[[bytearray], bytearray]] = {
    "first byte": _flip(0),
    "middle byte": _flip(SIZE // 2),
    "last byte": _flip(SIZE - 1),
    "last byte of a chunk": _flip(2 * CHUNK - 1),
    "first byte of a chunk": _flip(2 * CHUNK),
    "across a chunk boundary": lambda d: _flip(3 * CHUNK)(_flip(3 * CHUNK - 1)(d)),
    "appended byte": lambda d: d + b"\x00",
    "truncated by one byte": lambda d: d[:-1],
    "truncated at a chunk boundary": lambda d: d[: 5 * CHUNK],
    "swapped chunks": lambda d: d[CHUNK : 2 * CHUNK] + d[:CHUNK] + d[2 * CHUNK :],
    "emptied": lambda d: bytearray(),
}


@pytest.mark.parametrize("attack", sorted(DISK_ATTACKS))
def test_any_change_to_the_disk_is_caught(attack: str, disk: Path, publisher: ECKey) -> None:
    signature = protect(disk, publisher)
    disk.write_bytes(bytes(DISK_ATTACKS[attack](bytearray(disk.read_bytes()))))
    with pytest.raises(VerificationError):
        disks.verify_disk(disk, signature, PublisherKey.from_key(publisher))


@pytest.mark.parametrize("offset", [0, CHUNK - 1, CHUNK, SIZE // 2, SIZE - 1])
def test_content_change_is_caught_by_the_digest_not_only_the_size(
    offset: int, disk: Path, publisher: ECKey
) -> None:
    signature = protect(disk, publisher)
    # Same size: only the Merkle root can catch it.
    data = bytearray(disk.read_bytes())
    data[offset] ^= 0x80
    disk.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="content does not match"):
        disks.verify_disk(disk, signature, PublisherKey.from_key(publisher))


def test_size_change_fails_before_hashing(disk: Path, publisher: ECKey) -> None:
    signature = protect(disk, publisher)
    with disk.open("ab") as handle:
        handle.write(b"x")
    with pytest.raises(VerificationError, match=f"{SIZE + 1} bytes but the signature is for"):
        disks.verify_disk(disk, signature, PublisherKey.from_key(publisher))


def test_a_disk_signed_by_another_publisher_is_refused(
    disk: Path, publisher: ECKey, mallory: ECKey
) -> None:
    signature = protect(disk, mallory)
    with pytest.raises(VerificationError, match="does not verify"):
        disks.verify_disk(disk, signature, PublisherKey.from_key(publisher))


def test_a_signature_for_another_disk_is_refused(
    disk: Path, tmp_path: Path, publisher: ECKey
) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(os.urandom(SIZE))
    with pytest.raises(VerificationError):
        disks.verify_disk(disk, protect(other, publisher), PublisherKey.from_key(publisher))


def test_protect_refuses_bad_arguments_before_reading(tmp_path: Path, publisher: ECKey) -> None:
    missing = tmp_path / "missing.img"
    with pytest.raises(FormatError, match="name"):
        disks.protect_disk(missing, publisher, name="", version=VERSION)
    with pytest.raises(FormatError, match="chunk size"):
        disks.protect_disk(missing, publisher, name="ws", version=VERSION, chunk_size=1000)
    with pytest.raises(UsageError, match="cannot open disk"):
        disks.protect_disk(missing, publisher, name="ws", version=VERSION)


def test_an_empty_disk_cannot_be_signed(tmp_path: Path, publisher: ECKey) -> None:
    empty = tmp_path / "empty.img"
    empty.touch()
    with pytest.raises(FormatError, match="empty"):
        protect(empty, publisher)


def test_a_directory_is_not_a_disk(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        disks.measure_disk(tmp_path, chunk_size=CHUNK)


# --- checking one region on its own ------------------------------------------------------


def _signed(disk: Path, publisher: ECKey) -> tuple[disks.DiskMeasurement, VerifiedDiskSignature]:
    signature = protect(disk, publisher)
    verified = verify_disk_signature(signature, PublisherKey.from_key(publisher))
    measurement = disks.measure_disk(disk, chunk_size=CHUNK, keep_leaves=True)
    assert measurement.digest == verified.statement.digest
    return measurement, verified


@pytest.mark.parametrize(("first", "end"), [(0, 1), (2, 4), (5, 6), (0, 6), (4, 6)])
def test_a_region_checks_on_its_own(
    first: int, end: int, disk: Path, publisher: ECKey, tmp_path: Path
) -> None:
    measurement, verified = _signed(disk, publisher)
    proof = measurement.prove_region(first, end)
    disks.check_disk_region(disk, verified, proof)
    # Only the region is read: a disk holding just the region's bytes (the rest
    # zeroed, as on a host still fetching it) passes too.
    partial = bytearray(SIZE)
    start, stop = first * CHUNK, min(end * CHUNK, SIZE)
    partial[start:stop] = disk.read_bytes()[start:stop]
    lazy = tmp_path / "lazy.img"
    lazy.write_bytes(bytes(partial[:stop]))
    disks.check_disk_region(lazy, verified, proof)


@pytest.mark.parametrize("offset", [2 * CHUNK, 3 * CHUNK - 1])
def test_a_changed_byte_inside_the_region_is_caught(
    offset: int, disk: Path, publisher: ECKey
) -> None:
    measurement, verified = _signed(disk, publisher)
    proof = measurement.prove_region(2, 3)
    data = bytearray(disk.read_bytes())
    data[offset] ^= 1
    disk.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"chunks 2\.\.3"):
        disks.check_disk_region(disk, verified, proof)


def test_a_region_past_the_end_of_the_file_is_refused(
    disk: Path, publisher: ECKey, tmp_path: Path
) -> None:
    measurement, verified = _signed(disk, publisher)
    short = tmp_path / "short.img"
    short.write_bytes(disk.read_bytes()[: 5 * CHUNK])
    with pytest.raises(VerificationError, match="too short"):
        disks.check_disk_region(short, verified, measurement.prove_region(5, 6))
    beyond = merkle.RegionProof(6, 7, ())
    with pytest.raises(VerificationError, match="beyond"):
        disks.check_disk_region(disk, verified, beyond)


def test_region_proofs_need_the_leaves(disk: Path) -> None:
    measurement = disks.measure_disk(disk, chunk_size=CHUNK)
    with pytest.raises(UsageError, match="keep_leaves"):
        measurement.prove_region(0, 1)


# --- trust anchors -----------------------------------------------------------------------


def test_trust_anchor_from_a_catalog_requires_its_exact_version(
    disk: Path, publisher: ECKey
) -> None:
    signature = protect(disk, publisher)
    key = PublisherKey.from_key(publisher)
    same = VolumeSignatureCatalog(key, "ws2025", VERSION).sign(publisher)
    disks.load_trust_anchor(same, what="publisher").verify(disk, signature)
    newer = VolumeSignatureCatalog(key, "ws2025", DiskVersion(1, 0, 0, 1)).sign(publisher)
    with pytest.raises(NotAuthorizedError, match=r"is not equals 1\.0\.0\.1"):
        disks.load_trust_anchor(newer, what="publisher").verify(disk, signature)


def test_trust_anchor_from_a_qualifier_applies_its_rule(disk: Path, publisher: ECKey) -> None:
    signature = protect(disk, publisher)
    catalog = VolumeSignatureCatalog(PublisherKey.from_key(publisher), "ws2025", VERSION)
    at_least = catalog.qualifier(VersionRule.GREATER_THAN_OR_EQUAL).to_bytes()
    assert disks.load_trust_anchor(at_least, what="q").verify(disk, signature).statement
    above = catalog.qualifier(VersionRule.GREATER_THAN).to_bytes()
    with pytest.raises(NotAuthorizedError, match="is not greater-than"):
        disks.load_trust_anchor(above, what="q").verify(disk, signature)


def test_trust_anchor_from_a_public_key(disk: Path, publisher: ECKey, mallory: ECKey) -> None:
    signature = protect(disk, publisher)
    disks.load_trust_anchor(publisher.as_pem(private=False), what="pub").verify(disk, signature)
    with pytest.raises(VerificationError):
        disks.load_trust_anchor(mallory.as_pem(private=False), what="pub").verify(disk, signature)


@pytest.mark.parametrize(
    "data",
    [b"", b"{}", b'{"type":"guardfab-volume-signature-catalog"}', b"-----BEGIN PRIVATE KEY-----"],
)
def test_trust_anchor_refuses_what_is_not_a_public_key(data: bytes) -> None:
    with pytest.raises(FormatError):
        disks.load_trust_anchor(data, what="publisher")


@given(st.binary(max_size=600))
def test_trust_anchor_loader_raises_only_invalid_input(data: bytes) -> None:
    with contextlib.suppress(InvalidInputError):
        disks.load_trust_anchor(data, what="publisher")
