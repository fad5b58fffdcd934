"""A small, independent serializer of TCG PC Client event logs, and a reference replay.

It writes the crypto-agile record format straight from the TCG PC Client PFP
layouts and replays PCRs by the PC Client rules without using any guardfab
code (not :mod:`guardfab.tpm`), on purpose: the tests check guardfab's parser
against this second reading of the spec rather than against itself, so this
module must keep importing nothing from the parser it checks.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

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
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
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
        """The (algorithm, digest) pairs this event lists under a log's declared banks."""
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
        """The SHA-1 format Spec ID record every crypto-agile log starts with."""
        return sha1_record(0, EV_NO_ACTION, bytes(20), spec_id(self.banks, vendor=self.vendor))

    def records(self) -> list[bytes]:
        """The header, then one TCG_PCR_EVENT2 per event."""
        return [self.header()] + [
            event2_record(e.pcr, e.type, e.digest_list(self.banks), e.data) for e in self.events
        ]

    def build(self) -> bytes:
        """The log's bytes, as firmware writes them."""
        return b"".join(self.records())


def variable(guid: bytes, name: str, data: bytes) -> bytes:
    """UEFI_VARIABLE_DATA."""
    encoded = name.encode("utf-16-le")
    return guid + struct.pack("<QQ", len(name), len(data)) + encoded + data


def _initial_pcr(pcr: int, size: int, locality: int) -> bytes:
    """A PCR's value at reset: PCR 0 holds the startup locality, PCRs 17-22 all ones."""
    if pcr == 0:
        return bytes(size - 1) + bytes([locality])
    if 17 <= pcr <= 22:
        return b"\xff" * size
    return bytes(size)


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
            start = values.get(e.pcr, _initial_pcr(e.pcr, size, locality))
            values[e.pcr] = hashlib.new(HASHES[alg], start + listed[alg]).digest()
        if locality and 0 not in values:
            values[0] = bytes(size - 1) + bytes([locality])
        out[alg] = values
    return out
