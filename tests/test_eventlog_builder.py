"""The TCG PC Client log serializer the event log tests build their logs with, and its checks.

The serializer itself (:mod:`guardfab.softhost.eventlog`) writes the record
formats straight from the TCG PC Client PFP layouts without using any guardfab
parser code, so the parser is tested against a second reading of the spec
rather than against itself; it lives in the package because the demo's software
host builds its boot log with it. Its names are re-exported here for the test
modules that import them from this one. The tests at the bottom check the
builder's own output against a vector from tpm2-tools.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import pytest

from guardfab.softhost.eventlog import (
    EFI_GLOBAL,
    EFI_SECURITY_DB,
    EV_ACTION,
    EV_EFI_ACTION,
    EV_EFI_HCRTM_EVENT,
    EV_EFI_PLATFORM_FIRMWARE_BLOB,
    EV_EFI_VARIABLE_BOOT,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_IPL,
    EV_NO_ACTION,
    EV_POST_CODE,
    EV_SEPARATOR,
    KNOWN_SIZES,
    SHA1,
    SHA256,
    SHA384,
    SHA512,
    AgileLog,
    Ev,
    digest,
    event2_record,
    reference_replay,
    sha1_record,
    spec_id,
    variable,
)

#: The serializer's names, re-exported for the test modules that import them from here.
__all__ = [
    "EFI_GLOBAL",
    "EFI_SECURITY_DB",
    "EV_ACTION",
    "EV_EFI_ACTION",
    "EV_EFI_HCRTM_EVENT",
    "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    "EV_EFI_VARIABLE_BOOT",
    "EV_EFI_VARIABLE_DRIVER_CONFIG",
    "EV_IPL",
    "EV_NO_ACTION",
    "EV_POST_CODE",
    "EV_SEPARATOR",
    "KNOWN_SIZES",
    "SHA1",
    "SHA256",
    "SHA384",
    "SHA512",
    "AgileLog",
    "Ev",
    "digest",
    "event2_record",
    "reference_replay",
    "sha1_record",
    "spec_id",
    "variable",
]

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


def sha1_log(events: Iterable[Ev]) -> bytes:
    """A SHA-1 format log (TCG_PCClientPCREvent throughout)."""
    out = b""
    for e in events:
        value = (e.digests or {}).get(SHA1)
        if value is None:
            value = bytes(20) if e.type == EV_NO_ACTION else digest(SHA1, e.data)
        out += sha1_record(e.pcr, e.type, value, e.data)
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
