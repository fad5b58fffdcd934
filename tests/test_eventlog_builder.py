"""A small, independent serializer of TCG PC Client logs for the event log tests.

It writes the two record formats straight from the TCG PC Client PFP layouts,
without using any guardfab code, so the parser is tested against a second
reading of the spec rather than against itself. The tests at the bottom check
the builder's own output against a vector from tpm2-tools.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: The shared test vectors sit beside the repository (``<repo>/../shared``).
VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "eventlogs"
#: Every log in VECTORS; a new vector must be added here to be tested.
VECTOR_NAMES = (
    "event-arch-linux.bin",
    "event-gce-ubuntu-2104-log.bin",
    "event-sd-boot-fedora37.bin",
    "event-uefi-sha1-log.bin",
    "event.bin",
    "specid-vendordata.bin",
)


@pytest.fixture(name="vectors", scope="session")
def vectors_fixture() -> Path:
    """The event log vectors; fails (never skips) when they are missing."""
    if not all((VECTORS / name).is_file() for name in VECTOR_NAMES):
        pytest.fail(f"event log vectors missing under {VECTORS}: clone shared/ beside the repo")
    return VECTORS


SHA1, SHA256, SHA384, SHA512 = 0x0004, 0x000B, 0x000C, 0x000D
KNOWN_SIZES = {SHA1: 20, SHA256: 32, SHA384: 48, SHA512: 64}
HASHES = {SHA1: "sha1", SHA256: "sha256", SHA384: "sha384", SHA512: "sha512"}

EV_POST_CODE = 0x01
EV_NO_ACTION = 0x03
EV_SEPARATOR = 0x04
EV_ACTION = 0x05
EV_IPL = 0x0D
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HCRTM_EVENT = 0x80000010

EFI_GLOBAL = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c").bytes_le
EFI_SECURITY_DB = uuid.UUID("d719b2cb-3d3a-4596-a3bc-dad00e67656f").bytes_le


def digest(alg: int, data: bytes) -> bytes:
    """H_alg(data); unknown algorithms get a deterministic stand-in of the right size."""
    if alg in HASHES:
        return hashlib.new(HASHES[alg], data).digest()
    return hashlib.sha512(alg.to_bytes(2, "little") + data).digest()


@dataclass
class Ev:
    """One event to serialize. ``digests`` None means "hash of data in every bank"."""

    pcr: int
    type: int
    data: bytes
    digests: Mapping[int, bytes] | None = None
    banks: tuple[int, ...] | None = None  # which banks to list (None: all declared)

    def digest_list(self, declared: list[tuple[int, int]]) -> list[tuple[int, bytes]]:
        algs = self.banks if self.banks is not None else tuple(a for a, _ in declared)
        sizes = dict(declared)
        out = []
        for alg in algs:
            if self.digests is not None and alg in self.digests:
                out.append((alg, self.digests[alg]))
            elif self.type == EV_NO_ACTION:
                out.append((alg, bytes(sizes[alg])))
            else:
                out.append((alg, digest(alg, self.data)[: sizes[alg]]))
        return out


def spec_id(
    banks: Iterable[tuple[int, int]],
    *,
    vendor: bytes = b"",
    uintn: int = 2,
    count: int | None = None,
) -> bytes:
    """TCG_EfiSpecIDEvent: signature, class, version 2.0 errata 0, uintnSize, banks, vendor."""
    banks = list(banks)
    body = b"Spec ID Event03\0" + struct.pack(
        "<IBBBBI", 0, 0, 2, 0, uintn, len(banks) if count is None else count
    )
    body += b"".join(struct.pack("<HH", alg, size) for alg, size in banks)
    return body + bytes([len(vendor)]) + vendor


def sha1_record(pcr: int, event_type: int, sha1: bytes, data: bytes) -> bytes:
    """TCG_PCClientPCREvent."""
    return struct.pack("<II20sI", pcr, event_type, sha1, len(data)) + data


def event2_record(
    pcr: int, event_type: int, digests: list[tuple[int, bytes]], data: bytes
) -> bytes:
    """TCG_PCR_EVENT2 with its TPML_DIGEST_VALUES."""
    head = struct.pack("<III", pcr, event_type, len(digests))
    body = b"".join(struct.pack("<H", alg) + value for alg, value in digests)
    return head + body + struct.pack("<I", len(data)) + data


@dataclass
class AgileLog:
    """A crypto-agile log: Spec ID header, then events."""

    banks: list[tuple[int, int]] = field(default_factory=lambda: [(SHA1, 20), (SHA256, 32)])
    events: list[Ev] = field(default_factory=list)
    vendor: bytes = b""

    def header(self) -> bytes:
        return sha1_record(0, EV_NO_ACTION, bytes(20), spec_id(self.banks, vendor=self.vendor))

    def records(self) -> list[bytes]:
        return [self.header()] + [
            event2_record(e.pcr, e.type, e.digest_list(self.banks), e.data) for e in self.events
        ]

    def build(self) -> bytes:
        return b"".join(self.records())


def sha1_log(events: Iterable[Ev]) -> bytes:
    """A SHA-1 format log (TCG_PCClientPCREvent throughout)."""
    out = b""
    for e in events:
        value = (e.digests or {}).get(SHA1)
        if value is None:
            value = bytes(20) if e.type == EV_NO_ACTION else digest(SHA1, e.data)
        out += sha1_record(e.pcr, e.type, value, e.data)
    return out


def variable(guid: bytes, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA."""
    encoded = name.encode("utf-16-le")
    return guid + struct.pack("<QQ", len(name), len(data)) + encoded + data


def reference_replay(
    banks: list[tuple[int, int]], events: list[Ev], *, locality: int = 0
) -> dict[int, dict[int, bytes]]:
    """PCR values by the PC Client rules, computed here independently of guardfab."""
    out: dict[int, dict[int, bytes]] = {}
    for alg, size in banks:
        if alg not in HASHES:
            continue
        values: dict[int, bytes] = {}
        for e in events:
            if e.type == EV_NO_ACTION:
                continue
            listed = dict(e.digest_list(banks))
            if alg not in listed:
                continue
            if e.pcr not in values:
                start = bytes(size)
                if e.pcr == 0:
                    start = bytes(size - 1) + bytes([locality])
                elif 17 <= e.pcr <= 22:
                    start = b"\xff" * size
                values[e.pcr] = start
            values[e.pcr] = hashlib.new(HASHES[alg], values[e.pcr] + listed[alg]).digest()
        if locality and 0 not in values:
            values[0] = bytes(size - 1) + bytes([locality])
        out[alg] = values
    return out


# ------------------------------------------------------------------ the builder's own checks


def test_builder_reproduces_a_tpm2_tools_vector(vectors: Path) -> None:
    """The builder writes event.bin (tpm2-tools fixture) byte for byte from its fields."""
    original = (vectors / "event.bin").read_bytes()
    banks = [(SHA1, 20), (SHA256, 32), (SHA384, 48), (SHA512, 64)]
    header = sha1_record(0, EV_NO_ACTION, bytes(20), spec_id(banks))
    blob = original[len(header) :]
    (pcr, event_type, count) = struct.unpack_from("<III", blob)
    offset = 12
    digests = {}
    for _ in range(count):
        (alg,) = struct.unpack_from("<H", blob, offset)
        digests[alg] = blob[offset + 2 : offset + 2 + KNOWN_SIZES[alg]]
        offset += 2 + KNOWN_SIZES[alg]
    data = blob[offset + 4 :]
    log = AgileLog(banks, [Ev(pcr, event_type, data, digests)])
    assert log.build() == original


def test_reference_replay_matches_a_known_value() -> None:
    """One separator extended into a zero SHA-1 PCR gives the well-known b2a83b0e...."""
    values = reference_replay([(SHA1, 20)], [Ev(3, EV_SEPARATOR, bytes(4))])
    assert values[SHA1][3].hex() == "b2a83b0ebf2f8374299a5b2bdfc31ea955ad7236"
