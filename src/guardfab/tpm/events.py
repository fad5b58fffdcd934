"""Event types, hash banks and the measured-bytes rules of the TCG PC Client log.

The names and values come from the TCG PC Client Platform Firmware Profile (PFP)
and the TPM 2.0 Library (TPM_ALG_ID, via :mod:`guardfab.tpm.constants`). The log
itself is parsed in :mod:`guardfab.tpm.eventlog`; event data is decoded for
people in :mod:`guardfab.tpm.decode` and :mod:`guardfab.tpm.uefi`.

The part that matters for security is :func:`measured_bytes`: for which event
types the digest is the hash of the event data, so that a verifier may read a
fact from the data once the hash matches. For every other type the data is only
a description of what was hashed (a firmware volume, a PE image) and nothing in
it can be trusted.
"""

from __future__ import annotations

import enum
import functools
import struct
from collections.abc import Callable
from typing import NamedTuple

from guardfab.errors import FormatError
from guardfab.tpm.constants import HASH_ALGS, Hasher, TpmAlg, alg_name

__all__ = ["alg_name"]  # re-exported: bank names for logs come from the TPM constants

# --------------------------------------------------------------------------- banks

#: Digest size of each hash algorithm a bank may use; a Spec ID header that
#: declares another size for one of these is malformed. SM3 is known by size
#: but not replayed (guardfab.tpm.constants leaves it out on purpose).
HASH_SIZES: dict[int, int] = {
    **{alg: info.digest_size for alg, info in HASH_ALGS.items()},
    TpmAlg.SM3_256: 32,
}

#: One-shot hash constructors of the banks this host can replay, by TPM_ALG_ID.
HASHERS: dict[int, Callable[..., Hasher]] = {alg: info.new for alg, info in HASH_ALGS.items()}


# --------------------------------------------------------------------------- event types


class EventType(enum.IntEnum):
    """Event types of the TCG PC Client PFP (BIOS types, then the EFI range)."""

    EV_PREBOOT_CERT = 0x00000000
    EV_POST_CODE = 0x00000001
    EV_UNUSED = 0x00000002
    EV_NO_ACTION = 0x00000003
    EV_SEPARATOR = 0x00000004
    EV_ACTION = 0x00000005
    EV_EVENT_TAG = 0x00000006
    EV_S_CRTM_CONTENTS = 0x00000007
    EV_S_CRTM_VERSION = 0x00000008
    EV_CPU_MICROCODE = 0x00000009
    EV_PLATFORM_CONFIG_FLAGS = 0x0000000A
    EV_TABLE_OF_DEVICES = 0x0000000B
    EV_COMPACT_HASH = 0x0000000C
    EV_IPL = 0x0000000D
    EV_IPL_PARTITION_DATA = 0x0000000E
    EV_NONHOST_CODE = 0x0000000F
    EV_NONHOST_CONFIG = 0x00000010
    EV_NONHOST_INFO = 0x00000011
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x00000012
    EV_POST_CODE2 = 0x00000013
    EV_EFI_EVENT_BASE = 0x80000000
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2
    EV_EFI_SPDM_DEVICE_POLICY = 0x800000E3
    EV_EFI_SPDM_DEVICE_AUTHORITY = 0x800000E4


_TYPE_NAMES: dict[int, str] = {member.value: member.name for member in EventType}


def event_type_name(value: int) -> str:
    """Return the PFP name of an event type, or ``EV_UNKNOWN_0x...`` for others."""
    name = _TYPE_NAMES.get(value)
    return name if name is not None else f"EV_UNKNOWN_0x{value:08x}"


# --------------------------------------------------------------------------- measured bytes


class DigestRule(enum.Enum):
    """How sure we are of what an event type's digest covers.

    ``STRICT``: the PFP defines the digest as the hash of the event data, so a
    mismatch means the data was changed after measurement. ``LENIENT``: the data
    is the measured bytes on most firmware or boot loaders but not on all, so a
    mismatch only means "not shown". ``NONE``: the digest covers something the
    log does not carry (code, a firmware volume, an image).
    """

    STRICT = "strict"
    LENIENT = "lenient"
    NONE = "none"


MeasuredBytes = tuple[DigestRule, tuple[bytes, ...]]

_UEFI_VARIABLE_HEADER = 32  # VariableName GUID (16) + two UINT64 lengths


def _whole(rule: DigestRule) -> Callable[[bytes], MeasuredBytes]:
    def rule_for(data: bytes) -> MeasuredBytes:
        return rule, (data,)

    return rule_for


def _variable_data_or_whole(data: bytes) -> MeasuredBytes:
    """EV_EFI_VARIABLE_BOOT(2): EDK2 hashes only VariableData, the PFP the whole structure.

    EDK2 (Tcg2Dxe ``MeasureVariable``) hashes just the variable's contents for
    EV_EFI_VARIABLE_BOOT; PFP 1.05 added EV_EFI_VARIABLE_BOOT2 whose digest is the
    hash of the whole UEFI_VARIABLE_DATA. Either form is accepted when it matches;
    in the contents-only form the variable's name and GUID are not covered, so
    no fact may be read from them (none is: boot variables feed no fact).
    """
    if len(data) < _UEFI_VARIABLE_HEADER:
        return DigestRule.LENIENT, (data,)
    name_chars = int.from_bytes(data[16:24], "little")
    start = _UEFI_VARIABLE_HEADER + 2 * name_chars
    return DigestRule.LENIENT, (data, data[start:]) if start <= len(data) else (data,)


def _ipl_strings(data: bytes) -> MeasuredBytes:
    """EV_IPL: boot loaders hash their strings in several ways; try the common ones.

    systemd-boot (PCR 12) hashes the whole UTF-16 command line; older
    systemd-boot (PCR 8) logged one byte less than it hashed (the last byte of
    the UTF-16 NUL); GRUB (PCR 8) hashes the text after its ``grub_cmd: `` or
    ``kernel_cmdline: `` prefix, with or without the terminating NUL; shim and
    GRUB hash files that are not in the log (PCR 9, 14), so those stay unchecked.
    """
    candidates = [data]
    if data.endswith(b"\0"):
        candidates.append(data[:-1])
    if len(data) % 2:
        candidates.append(data + b"\0")
    space = data.find(b" ")
    if 0 < space < len(data) - 1 and data.endswith(b"\0"):
        candidates += [data[space + 1 : -1], data[space + 1 :]]
    return DigestRule.LENIENT, tuple(candidates)


_T = EventType
#: Types whose digest is the hash of the whole event data, and how sure that is.
_WHOLE_DATA: dict[int, DigestRule] = {
    # PFP: digest = hash of the event data.
    _T.EV_SEPARATOR: DigestRule.STRICT,
    _T.EV_EFI_ACTION: DigestRule.STRICT,
    _T.EV_EFI_VARIABLE_DRIVER_CONFIG: DigestRule.STRICT,
    _T.EV_EFI_GPT_EVENT: DigestRule.STRICT,
    # Hash of the data on the firmware we know, but not defined so everywhere.
    _T.EV_S_CRTM_VERSION: DigestRule.LENIENT,
    _T.EV_ACTION: DigestRule.LENIENT,
    _T.EV_EFI_VARIABLE_AUTHORITY: DigestRule.LENIENT,
    _T.EV_PLATFORM_CONFIG_FLAGS: DigestRule.LENIENT,
    _T.EV_TABLE_OF_DEVICES: DigestRule.LENIENT,
    _T.EV_NONHOST_INFO: DigestRule.LENIENT,
    _T.EV_OMIT_BOOT_DEVICE_EVENTS: DigestRule.LENIENT,
    _T.EV_COMPACT_HASH: DigestRule.LENIENT,
}
_RULES: dict[int, Callable[[bytes], MeasuredBytes]] = {
    **{event_type: _whole(rule) for event_type, rule in _WHOLE_DATA.items()},
    _T.EV_EFI_VARIABLE_BOOT: _variable_data_or_whole,
    _T.EV_EFI_VARIABLE_BOOT2: _variable_data_or_whole,
    _T.EV_IPL: _ipl_strings,
}

_NOTHING: MeasuredBytes = (DigestRule.NONE, ())


class DigestStatus(enum.Enum):
    """Whether an event's data is what its digest measured.

    ``VERIFIED``: in every bank the event carries and we can compute, the digest
    is the hash of the data (or of the part of it the type defines), so the data
    may be read as fact. ``MISMATCH``: a type whose digest must be the hash of
    its data, and it is not: the data was altered. ``UNCHECKED``: the digest
    covers something the log does not hold, or a lenient type did not match.
    """

    VERIFIED = "verified"
    MISMATCH = "mismatch"
    UNCHECKED = "unchecked"


class DigestCheck(NamedTuple):
    """Result of checking one event: overall status and the outcome per bank.

    ``banks`` maps each TPM_ALG_ID the event carries to True (matches), False
    (does not) or None (no hash implementation for that bank here).
    """

    status: DigestStatus
    banks: dict[int, bool | None]


_NOT_CHECKED = DigestCheck(DigestStatus.UNCHECKED, {})


def measured_bytes(event_type: int, data: bytes) -> MeasuredBytes:
    """Return how sure we are that ``data`` is what was hashed, and the candidates.

    EV_SEPARATOR, EV_EFI_ACTION, EV_EFI_VARIABLE_DRIVER_CONFIG and EV_EFI_GPT_EVENT
    are STRICT: the PFP defines their digest as the hash of the event data, and
    the facts a verifier needs (secure boot state, separators) live in them.
    """
    rule = _RULES.get(event_type)
    return rule(data) if rule is not None else _NOTHING


# --------------------------------------------------------------------------- Spec ID header

#: Signature of the crypto-agile header (TCG_EfiSpecIDEvent), NUL included.
SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
#: More banks than any TPM implements; bounds the header and per-event digest lists.
MAX_BANKS = 16
#: Digest size bound for algorithms we do not know (TPM2B_DIGEST holds 64 bytes).
MAX_DIGEST_SIZE = 64

_SPEC_ID_FIXED = struct.Struct("<16sIBBBBI")
_ALG_SIZE = struct.Struct("<HH")
_UINTN_BYTES = {1: 4, 2: 8}


class SpecIdEvent(NamedTuple):
    """The crypto-agile header: which banks every later event carries, and their sizes.

    ``size`` is the number of bytes the header's own fields take, which is what
    decides where the next event starts (see :func:`parse_spec_id`).
    """

    platform_class: int
    version: str
    uintn_size: int
    digest_sizes: tuple[tuple[int, int], ...]
    vendor_info: bytes
    size: int


#: The largest possible TCG_EfiSpecIDEvent: fixed part, 16 banks, 255 vendor bytes.
MAX_SPEC_ID_BYTES = 28 + 4 * MAX_BANKS + 1 + 255


def _check_bank(alg: int, size: int, seen: set[int]) -> None:
    """Refuse a header bank whose size contradicts the algorithm, or a repeated one."""
    if alg in seen:
        raise FormatError(f"Spec ID header declares bank {alg_name(alg)} twice")
    known = HASH_SIZES.get(alg)
    if known is not None and size != known:
        raise FormatError(f"Spec ID header gives {alg_name(alg)} a {size}-byte digest, not {known}")
    if not 0 < size <= MAX_DIGEST_SIZE:
        raise FormatError(f"Spec ID header gives {alg_name(alg)} an impossible size {size}")
    seen.add(alg)


def parse_spec_id(data: bytes, *, exact: bool = True) -> SpecIdEvent:
    """Parse TCG_EfiSpecIDEvent from the start of ``data``.

    Args:
        data: the header event's data (or the log bytes after its record head).
        exact: refuse bytes left over after the vendor info. The log parser
            passes False: the header describes its own length, and like
            tpm2-tools it reads the next event right after the vendor info even
            when the record's eventDataSize says otherwise.

    Raises:
        FormatError: a bad signature, uintnSize, bank list or length.
    """
    try:
        signature, platform, minor, major, errata, uintn, count = _SPEC_ID_FIXED.unpack_from(data)
    except struct.error as exc:
        raise FormatError("Spec ID header is truncated") from exc
    if signature != SPEC_ID_SIGNATURE:
        raise FormatError("first event is not a 'Spec ID Event03' header")
    if uintn not in _UINTN_BYTES or not 0 < count <= MAX_BANKS:
        raise FormatError(f"Spec ID header has uintnSize {uintn} and {count} banks")
    offset = _SPEC_ID_FIXED.size
    banks: list[tuple[int, int]] = []
    seen: set[int] = set()
    for _ in range(count):
        if offset + _ALG_SIZE.size > len(data):
            raise FormatError("Spec ID header is truncated in its bank list")
        alg, size = _ALG_SIZE.unpack_from(data, offset)
        _check_bank(alg, size, seen)
        banks.append((alg, size))
        offset += _ALG_SIZE.size
    end = offset + 1 + data[offset] if offset < len(data) else offset + 1
    if end > len(data) or (exact and end != len(data)):
        raise FormatError("Spec ID header vendorInfoSize does not match its event size")
    vendor = data[offset + 1 : end]
    version = f"{major}.{minor} errata {errata}"
    return SpecIdEvent(platform, version, _UINTN_BYTES[uintn], tuple(banks), vendor, end)


#: Data this short (separators, EV_EFI_ACTION strings) recurs in every log: its
#: digests are computed once per value (the comparison is still made every time).
_SHORT_DATA = 32


@functools.lru_cache(maxsize=1024)
def _short_digest(alg: int, data: bytes) -> bytes:
    return HASHERS[alg](data).digest()


def check_digests(event_type: int, data: bytes, digests: dict[int, bytes]) -> DigestCheck:
    """Check ``data`` against each bank's digest under the rule for ``event_type``.

    A verifier runs this for every event a fact reads, in every log it has not
    seen before, so the common case (one candidate, two banks) stays in one frame.
    """
    rule = _WHOLE_DATA.get(event_type)
    if rule is not None:  # the common case: one candidate, the data itself
        candidates: tuple[bytes, ...] = ()
        only: bytes | None = data
    else:
        rule_for = _RULES.get(event_type)
        if rule_for is None or event_type == EventType.EV_NO_ACTION:
            return _NOT_CHECKED
        rule, candidates = rule_for(data)
        if rule is DigestRule.NONE:
            return _NOT_CHECKED
        only = candidates[0] if len(candidates) == 1 else None
    banks: dict[int, bool | None] = {}
    matched = mismatched = False
    for alg, digest in digests.items():
        hasher = HASHERS.get(alg)
        if hasher is None:
            banks[alg] = None
            continue
        if only is not None:
            known = len(only) <= _SHORT_DATA
            ok = (_short_digest(alg, only) if known else hasher(only).digest()) == digest
        else:
            ok = any(hasher(candidate).digest() == digest for candidate in candidates)
        banks[alg] = ok
        matched = matched or ok
        mismatched = mismatched or not ok
    if matched and not mismatched:
        status = DigestStatus.VERIFIED
    elif mismatched and rule is DigestRule.STRICT:
        status = DigestStatus.MISMATCH
    else:
        status = DigestStatus.UNCHECKED
    return tuple.__new__(DigestCheck, (status, banks))


def digest_matches(event_type: int, data: bytes, bank: int, digest: bytes) -> bool:
    """Whether ``data`` is what ``digest`` measured in ``bank``, under the rule for its type.

    The verifier's check (:func:`check_digests` checks every bank at once): the
    one bank a quote covers and the replay verified. A digest in any other bank
    is attested by nothing, so it can neither make data trusted nor untrusted.
    True exactly when :func:`check_digests` would say True for ``bank``.
    """
    hasher = HASHERS.get(bank)
    if hasher is None:
        return False
    if event_type in _WHOLE_DATA:  # the common case: one candidate, the data itself
        if len(data) <= _SHORT_DATA:
            return _short_digest(bank, data) == digest
        return hasher(data).digest() == digest
    rule_for = _RULES.get(event_type)
    if rule_for is None or event_type == EventType.EV_NO_ACTION:
        return False
    rule, candidates = rule_for(data)
    if rule is DigestRule.NONE:
        return False
    return any(hasher(candidate).digest() == digest for candidate in candidates)
