"""Facts an attestation policy reads from a boot event log, each with its evidence.

Rules every fact here follows (docs/eventlog-facts.md explains them at length):

* **Only after the quote.** A fact is worth something only once the replay of
  the quoted bank matched a verified quote over the PCRs the fact reads
  (PCR 7 for the secure boot facts, PCRs 0-7 for separators). The event type
  and data are not covered by a PCR; only digests are.
* **Positive facts come from checked data.** A value read from event data (the
  SecureBoot variable, the separator value) is used only if that data hashes to
  the event's digest in the quoted bank, the one the replay matched to the quote
  (a digest in another bank is attested by nothing); a person's view of a log
  with no quote requires every bank (:func:`derive_facts`).
* **Negative facts come from digests.** "No UEFI Debug Mode event" is decided by
  looking for the *digest* of that string in PCR 7, whatever the event type or
  data say, because both can be rewritten without changing any PCR.
* **Honest gaps.** What a Linux host's firmware log cannot show (hibernation,
  crash dumps, resume, a CI policy, the OS IOMMU) has value ``None`` and a note
  saying why and where the evidence would have to come from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple

from guardfab.tpm import uefi
from guardfab.tpm.events import HASHERS, DigestStatus, EventType, alg_name, digest_matches

if TYPE_CHECKING:
    from guardfab.tpm.eventlog import Event, EventLog, SeparatorRecord

_DRIVER_CONFIG = int(EventType.EV_EFI_VARIABLE_DRIVER_CONFIG)
_SEPARATOR = int(EventType.EV_SEPARATOR)
#: The PCR UEFI secure boot policy is measured into (PFP).
SECURE_BOOT_PCR = 7
#: PCRs whose pre-OS measurements end with an EV_SEPARATOR (PFP).
SEPARATOR_PCRS = range(8)
_SEPARATOR_PCR_SET = frozenset(SEPARATOR_PCRS)
_NORMAL_SEPARATOR = b"\0\0\0\0"
_SEPARATORS_OK = "one verified 00000000 separator in each of PCRs 0-7"
#: What a normal separator's data hashes to, in each bank we can compute.
_NORMAL_SEPARATOR_DIGESTS = {
    alg: hasher(_NORMAL_SEPARATOR).digest() for alg, hasher in HASHERS.items()
}

#: Secure boot policy variables whose measurements a baseline compares.
SECURE_BOOT_VARIABLES = (
    (uefi.EFI_GLOBAL_VARIABLE, "PK"),
    (uefi.EFI_GLOBAL_VARIABLE, "KEK"),
    (uefi.EFI_IMAGE_SECURITY_DATABASE, "db"),
    (uefi.EFI_IMAGE_SECURITY_DATABASE, "dbx"),
)
_SECURE_BOOT = (uefi.EFI_GLOBAL_VARIABLE, "SecureBoot")


def _digests_of(*texts: bytes) -> frozenset[bytes]:
    """Digests of ``texts`` in every bank we can compute, built once at import."""
    return frozenset(hasher(text).digest() for hasher in HASHERS.values() for text in texts)


#: EV_EFI_ACTION strings in PCR 7, with and without the NUL some firmware adds.
#: "UEFI Debug Mode": PFP, measured when a firmware debugger is enabled.
_DEBUG_MODE = _digests_of(b"UEFI Debug Mode", b"UEFI Debug Mode\0")
#: "DMA Protection Disabled": measured when pre-boot DMA protection (IOMMU) is
#: off or weakened (Windows requirement, EDK2 trusted boot chain).
_DMA_DISABLED = _digests_of(b"DMA Protection Disabled", b"DMA Protection Disabled\0")


class Fact(NamedTuple):
    """One fact: its value (None when the log cannot show it), evidence and a note.

    ``events`` are the indexes of the events the value was read from; ``note``
    says what was read, or why there is no value.
    """

    value: Any
    events: tuple[int, ...]
    note: str


def _gap(note: str) -> Fact:
    return Fact(None, (), note)


class LogFacts(NamedTuple):
    """What the attestation policies read from a log (see the module rules).

    A named tuple: a verifier makes one for every log it has not seen before.

    Attributes:
        secure_boot: SecureBoot variable = 1 in a verified
            EV_EFI_VARIABLE_DRIVER_CONFIG event in PCR 7.
        secure_boot_variables: per variable (PK, KEK, db, dbx), the digests per
            bank of its verified measurement in PCR 7; compared to a baseline.
        uefi_debug_disabled: no "UEFI Debug Mode" digest in PCR 7, and PCR 7's
            separator verified (firmware finished its policy measurements).
        dma_protection: False if "DMA Protection Disabled" was measured in PCR 7;
            otherwise None, since firmware only measures the disabled state.
        separators_ok: PCRs 0-7 each hold exactly one verified, non-error separator.
        resumed, boot_count, hibernation_disabled, dumps_disabled,
        dump_encryption, ci_policy: not in a Linux host's firmware log; None.
    """

    secure_boot: Fact
    secure_boot_variables: Fact
    uefi_debug_disabled: Fact
    dma_protection: Fact
    separators_ok: Fact
    resumed: Fact
    boot_count: Fact
    hibernation_disabled: Fact
    dumps_disabled: Fact
    dump_encryption: Fact
    ci_policy: Fact

    def items(self) -> Iterator[tuple[str, Fact]]:
        """Each fact by name, in declaration order."""
        yield from zip(self._fields, self, strict=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: each fact's value by name, plus ``evidence`` (events and note)."""
        out: dict[str, Any] = {name: fact.value for name, fact in self.items()}
        out["evidence"] = {
            name: {"events": list(fact.events), "note": fact.note} for name, fact in self.items()
        }
        return out


# ------------------------------------------------------------------ what the log cannot show

_RESUMED = _gap(
    "S3 resume restores the TPM and re-measures nothing, so the log cannot show it; "
    "read TPMS_CLOCK_INFO.restartCount in the quote (non-zero after a resume or restart)"
)
_BOOT_COUNT = _gap(
    "UEFI firmware logs no boot counter (Windows keeps one in its WBCL); "
    "the quote's resetCount counts TPM resets instead"
)
_HIBERNATION = _gap(
    "Linux measures neither its hibernation setting nor a resume from a hibernation "
    "image into the TCG log; resuming from S4 is a normal firmware boot"
)
_DUMPS = _gap(
    "kdump and core dump settings are OS configuration that no firmware or boot "
    "loader measures into the TCG log"
)
_DUMP_ENCRYPTION = _gap("crash dump encryption is not measured into the TCG log on Linux")
_CI_POLICY = _gap(
    "which file is the CI policy is not in the log itself: the boot loader (GRUB) measures "
    "every file it loads into PCR 9 as EV_IPL with the file's SHA-256, and the HGS's "
    "Hgs_CiPolicy compares those digests with its registered CI policies (docs/adr/0005)"
)
_DMA_UNKNOWN = _gap(
    "no 'DMA Protection Disabled' measurement in PCR 7, but firmware measures only the "
    "disabled state and not all firmware does, and the Linux IOMMU (intel_iommu/amd_iommu) "
    "is not in the log, so protection cannot be shown"
)


# --------------------------------------------------------------------------- derivation


#: The variables the facts read, recognised by their raw bytes (no decoding).
_KNOWN_VARIABLES = uefi.KnownVariables((_SECURE_BOOT, *SECURE_BOOT_VARIABLES))
#: Each known variable's PCR 7 measurements: the event and the variable's contents.
_Variables = dict[uefi.VariableKey, list[tuple["Event", bytes]]]


class _Reader:
    """The events facts read (PCR 7, the separators of PCRs 0-7), and whose data may be read.

    Only those events are made from the log: the facts need no other, and a
    verifier derives them for every log it has not seen before. With a quoted
    bank we can hash, the separators are first read as light records
    (``separator_records``): in a normal log they settle the separator fact
    alone, and their events (``separators``) are made only to word a problem.
    """

    __slots__ = (
        "_separators",
        "bank",
        "log",
        "normal_separator_digest",
        "pcr7",
        "pcr7_digests",
        "separator_records",
        "variables",
    )

    def __init__(self, log: EventLog, bank: int | None) -> None:
        self.log = log
        self.bank = bank
        self.normal_separator_digest = None if bank is None else _NORMAL_SEPARATOR_DIGESTS.get(bank)
        self.separator_records: list[SeparatorRecord] | None = None
        self._separators: dict[int, list[Event]] | None = None
        if bank is not None and self.normal_separator_digest is not None and bank in log.banks:
            pcr7, self.separator_records = log.pcr_and_separator_records(
                SECURE_BOOT_PCR, SEPARATOR_PCRS.stop, bank
            )
        else:
            events = log.pcr_and_separators(SECURE_BOOT_PCR, SEPARATOR_PCRS.stop)
            pcr7 = tuple(event for event in events if event.pcr == SECURE_BOOT_PCR)
            self._separators = _separators_by_pcr(events)
        self.pcr7 = pcr7
        self.variables = _variables(pcr7)
        #: Every digest PCR 7's events carry, in any bank: the negative facts
        #: look for a string's digest here first, and at each event only if found.
        self.pcr7_digests = frozenset(chain.from_iterable(event.digests.values() for event in pcr7))

    @property
    def separators(self) -> dict[int, list[Event]]:
        """The EV_SEPARATOR events of each of PCRs 0-7, in log order (made when first read)."""
        if self._separators is None:
            events = self.log.pcr_and_separators(SECURE_BOOT_PCR, SEPARATOR_PCRS.stop)
            self._separators = _separators_by_pcr(events)
        return self._separators

    def normal_separators(self) -> tuple[int, ...] | None:
        """The separators' numbers if the records show one trusted 00000000 per PCR 0-7, else None.

        The separator fact's common case, from the records alone: exactly one
        per PCR, each with data 00000000 and the quoted bank's digest of it
        (what :meth:`normal_separator` accepts). None decides nothing: the fact
        then reads the events, which name the problem if there is one.
        """
        records, expected = self.separator_records, self.normal_separator_digest
        if records is None or len(records) != len(SEPARATOR_PCRS):
            return None
        if {record.pcr for record in records} != _SEPARATOR_PCR_SET:
            return None
        for record in records:
            if record.data != _NORMAL_SEPARATOR or record.digest != expected:
                return None
        return tuple(sorted(record.number for record in records))

    def trusted(self, event: Event) -> bool:
        """True if the data hashes to the digest in the quoted bank (or, with none, every bank).

        A verifier passes the bank its quote covers: a digest in another bank is
        attested by nothing, so it is not checked (docs/eventlog-facts.md).
        """
        bank = self.bank
        if bank is not None:  # EventLog.data_verified's answer, without its cache lookup
            digest = event.digests.get(bank)
            return digest is not None and digest_matches(event.event_type, event.data, bank, digest)
        check = self.log.digest_check(event)
        if check.status is not DigestStatus.VERIFIED:
            return False
        banks = check.banks
        return all(banks.get(bank) for bank in self.log.replayable_banks)

    def normal_separator(self, event: Event) -> bool:
        """True if ``event``'s data is 00000000 and trusted (what ``_separator_problem`` accepts).

        With the quoted bank, such data is trusted exactly when the event's digest
        there is the digest of 00000000 (EV_SEPARATOR digests its whole data), so
        a verifier's eight separators cost two comparisons each instead of a
        digest check each; any other case goes through :meth:`trusted`.
        """
        if event.data != _NORMAL_SEPARATOR:
            return False
        expected, bank = self.normal_separator_digest, self.bank
        if expected is None or bank is None:  # a person's view, or a bank we cannot hash
            return self.trusted(event)
        return event.digests.get(bank) == expected


def _separators_by_pcr(events: Iterable[Event]) -> dict[int, list[Event]]:
    """The EV_SEPARATOR events among ``events``, by PCR (0-7, each PCR listed)."""
    by_pcr: dict[int, list[Event]] = {pcr: [] for pcr in SEPARATOR_PCRS}
    for event in events:
        if event.event_type == _SEPARATOR:
            by_pcr[event.pcr].append(event)
    return by_pcr


def _variables(pcr7: Iterable[Event]) -> _Variables:
    """PCR 7 EV_EFI_VARIABLE_DRIVER_CONFIG measurements of the variables facts read, by key.

    Keys are (GUID, name) as :func:`guardfab.tpm.uefi.parse_variable` reads them;
    data that does not parse, or names another variable, is not listed.
    """
    found: _Variables = {}
    match = _KNOWN_VARIABLES.match
    for event in pcr7:
        if event.event_type == _DRIVER_CONFIG and (known := match(event.data)) is not None:
            key, contents = known
            found.setdefault(key, []).append((event, contents))
    return found


def _one_measurement(reader: _Reader, key: uefi.VariableKey) -> tuple[Event | None, bytes, str]:
    """The single verified measurement of variable ``key`` and its contents, or None and why not."""
    matches = reader.variables.get(key, ())
    name = key[1]
    if not matches:
        return None, b"", f"no {name} measurement in PCR 7"
    if len(matches) > 1:
        return None, b"", f"{name} is measured {len(matches)} times in PCR 7"
    event, contents = matches[0]
    if not reader.trusted(event):
        return None, b"", f"event {event.number} ({name}): data does not verify against its digest"
    return event, contents, ""


def _secure_boot(reader: _Reader) -> Fact:
    """SecureBoot = 1 in its verified PCR 7 measurement (UEFI: 1 enabled, 0 disabled)."""
    event, contents, why = _one_measurement(reader, _SECURE_BOOT)
    if event is None:
        return _gap(why)
    enabled = contents == b"\x01"
    state = "1 (enabled)" if enabled else f"{contents.hex() or 'empty'} (disabled)"
    return Fact(enabled, (event.number,), f"SecureBoot = {state}")


def _secure_boot_variables(reader: _Reader) -> Fact:
    """Digests of the verified PK, KEK, db and dbx measurements, per bank (hex)."""
    value: dict[str, dict[str, str]] = {}
    indexes: list[int] = []
    problems: list[str] = []
    for key in SECURE_BOOT_VARIABLES:
        event, _contents, why = _one_measurement(reader, key)
        if event is None:
            problems.append(why)
            continue
        value[key[1]] = {alg_name(alg): digest.hex() for alg, digest in event.digests.items()}
        indexes.append(event.number)
    if problems:
        return _gap("; ".join(problems))
    return Fact(value, tuple(indexes), "digests of the PK, KEK, db and dbx measurements")


def _pcr7_separator(reader: _Reader) -> Event | None:
    separators = [event for event in reader.pcr7 if event.event_type == _SEPARATOR]
    if len(separators) == 1 and reader.trusted(separators[0]):
        return separators[0]
    return None


def _measured_in_pcr7(reader: _Reader, digests: frozenset[bytes]) -> tuple[int, ...]:
    """Indexes of PCR 7 events carrying one of ``digests`` in any bank, whatever their type."""
    if digests.isdisjoint(reader.pcr7_digests):
        return ()
    return tuple(
        event.number for event in reader.pcr7 if not digests.isdisjoint(event.digests.values())
    )


def _uefi_debug(reader: _Reader) -> Fact:
    """False if "UEFI Debug Mode" is measured in PCR 7; True once PCR 7 is sealed without it."""
    found = _measured_in_pcr7(reader, _DEBUG_MODE)
    if found:
        return Fact(False, found, "PCR 7 holds the 'UEFI Debug Mode' measurement")
    separator = _pcr7_separator(reader)
    if separator is None:
        return _gap(
            "PCR 7 has no single verified separator, so its policy measurements may be incomplete"
        )
    return Fact(True, (separator.number,), "no 'UEFI Debug Mode' digest anywhere in PCR 7")


def _dma_protection(reader: _Reader) -> Fact:
    """False if "DMA Protection Disabled" is measured in PCR 7; otherwise unknown."""
    found = _measured_in_pcr7(reader, _DMA_DISABLED)
    if found:
        return Fact(False, found, "PCR 7 holds the 'DMA Protection Disabled' measurement")
    return _DMA_UNKNOWN


def _separator_problem(reader: _Reader, pcr: int, separators: list[Event]) -> str:
    """Why PCR ``pcr``'s separators are not one trusted 00000000 separator ("" if they are)."""
    if len(separators) != 1:
        return f"PCR {pcr} has {len(separators)} separators"
    event = separators[0]
    if not reader.trusted(event):
        return f"PCR {pcr} separator (event {event.number}) does not verify against its digest"
    if event.data != _NORMAL_SEPARATOR:
        return f"PCR {pcr} separator (event {event.number}) has value {event.data.hex()}"
    return ""


def _separators(reader: _Reader) -> Fact:
    """PCRs 0-7 each end their pre-OS measurements with one verified 00000000 separator."""
    numbers = reader.normal_separators()
    if numbers is not None:
        return Fact(True, numbers, _SEPARATORS_OK)
    by_pcr = reader.separators
    normal = reader.normal_separator
    for pcr, separators in by_pcr.items():
        if len(separators) == 1 and normal(separators[0]):
            continue  # the common case, checked without naming a problem
        problem = _separator_problem(reader, pcr, separators)
        return Fact(False, tuple(e.number for e in separators), problem)
    indexes = tuple(sorted(events[0].number for events in by_pcr.values()))
    return Fact(True, indexes, _SEPARATORS_OK)


def derive_facts(log: EventLog, bank: int | None = None) -> LogFacts:
    """Derive every fact from ``log``.

    Args:
        log: a parsed log; call this after its replay matched a verified quote.
        bank: the quoted bank (TPM_ALG_ID). An event's data is read only if it
            hashes to the event's digest in this bank; digests in other banks
            are attested by nothing and not checked. Without it (a person's
            view of a log), the event's data must verify in every bank it
            carries, and it must carry every declared bank we can compute.
    """
    reader = _Reader(log, bank)
    # Positional, in LogFacts' field order (keywords cost a verifier more per new log).
    return LogFacts(
        _secure_boot(reader),
        _secure_boot_variables(reader),
        _uefi_debug(reader),
        _dma_protection(reader),
        _separators(reader),
        _RESUMED,
        _BOOT_COUNT,
        _HIBERNATION,
        _DUMPS,
        _DUMP_ENCRYPTION,
        _CI_POLICY,
    )
