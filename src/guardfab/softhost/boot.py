"""A synthetic UEFI measured boot: the event log a guarded host's firmware and GRUB would write.

:class:`Boot` describes what a host booted (secure boot state, key databases,
boot loaders, GRUB's commands and files, among them the CI policy file); each
field changes a known set of events, so a test or the demo can make a golden
boot and a tampered one that differ by exactly what it chose.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from guardfab.softhost.eventlog import (
    EFI_GLOBAL,
    EFI_SECURITY_DB,
    EV_EFI_ACTION,
    EV_EFI_BOOT_SERVICES_APPLICATION,
    EV_EFI_PLATFORM_FIRMWARE_BLOB,
    EV_EFI_VARIABLE_BOOT,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_IPL,
    EV_SEPARATOR,
    SHA1,
    SHA256,
    AgileLog,
    Ev,
    digest,
    reference_replay,
    variable,
)

#: The CI policy file GRUB loads and measures into PCR 9 (an IMA policy).
CI_POLICY_FILE = b"measure func=BPRM_CHECK\nappraise func=BPRM_CHECK appraise_type=imasig\n"
CI_POLICY_PATH = b"(hd0,gpt2)/boot/ima-policy\0"
#: The PCRs a host quotes: the firmware's 0-7 and GRUB's 8 (commands) and 9 (files).
QUOTED_PCRS = tuple(range(10))


def _measured(content: bytes) -> dict[int, bytes]:
    """The SHA-1 and SHA-256 digests of what was measured (not of the event's data)."""
    return {alg: digest(alg, content) for alg in (SHA1, SHA256)}


def _file(pcr: int, path: bytes, content: bytes) -> Ev:
    """A GRUB file measurement: EV_IPL, data = path, digest = H(file content)."""
    return Ev(pcr, EV_IPL, path, _measured(content))


def _image(pcr: int, event_type: int, name: bytes) -> Ev:
    """An image load: the digest is H(image), which the log does not hold."""
    return Ev(pcr, event_type, b"device path of " + name, _measured(b"PE image of " + name))


@dataclass(frozen=True)
class Boot:
    """What the host booted; each field changes a known set of events."""

    secure_boot: bytes = b"\x01"
    db: bytes = b"db: vendor CA"
    dbx: bytes = b"dbx: revoked hashes"
    debug: bool = False
    dma_disabled: bool = False
    ci_policy: bytes | None = CI_POLICY_FILE
    shim: bytes = b"shimx64.efi 15.8"
    extra_app: bytes | None = None
    boot_order: bytes = b"\x01\x00\x02\x00"
    grub_commands: int = 80

    def events(self) -> list[Ev]:
        """The log's events, PFP order: firmware, policy, boot variables, loaders, GRUB."""
        return [*self._firmware_events(), *self._loader_events(), *self._grub_events()]

    def _firmware_events(self) -> list[Ev]:
        """The platform firmware, the secure boot policy variables, BootOrder, separators."""
        events = [
            Ev(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, b"\x00" * 8 + b"\x00\x10" + b"\x00" * 6),
            Ev(
                7,
                EV_EFI_VARIABLE_DRIVER_CONFIG,
                variable(EFI_GLOBAL, "SecureBoot", self.secure_boot),
            ),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_GLOBAL, "PK", b"pk: platform key")),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_GLOBAL, "KEK", b"kek: exchange")),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_SECURITY_DB, "db", self.db)),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_SECURITY_DB, "dbx", self.dbx)),
        ]
        if self.debug:
            events.append(Ev(7, EV_EFI_ACTION, b"UEFI Debug Mode"))
        if self.dma_disabled:
            events.append(Ev(7, EV_EFI_ACTION, b"DMA Protection Disabled"))
        events.append(
            Ev(1, EV_EFI_VARIABLE_BOOT, variable(EFI_GLOBAL, "BootOrder", self.boot_order))
        )
        return events + [Ev(pcr, EV_SEPARATOR, bytes(4)) for pcr in range(8)]

    def _loader_events(self) -> list[Ev]:
        """The EFI applications the firmware started: shim, any extra one, GRUB."""
        apps = [self.shim]
        if self.extra_app is not None:
            apps.append(self.extra_app)
        apps.append(b"grubx64.efi 2.12")
        return [_image(4, EV_EFI_BOOT_SERVICES_APPLICATION, app) for app in apps]

    def _grub_events(self) -> list[Ev]:
        """GRUB's configuration, the CI policy file, its commands, then kernel and initrd."""
        events = [_file(9, b"(hd0,gpt2)/boot/grub/grub.cfg\0", b"set timeout=0\n")]
        if self.ci_policy is not None:
            events.append(_file(9, CI_POLICY_PATH, self.ci_policy))
        events += [
            Ev(8, EV_IPL, f"grub_cmd: set option_{n}=value_{n}".encode() + b"\0")
            for n in range(self.grub_commands)
        ]
        events.append(_file(9, b"/boot/vmlinuz-6.12\0", b"kernel image 6.12"))
        events.append(_file(9, b"/boot/initrd.img-6.12\0", b"initrd 6.12"))
        return events

    def log(self) -> AgileLog:
        """The crypto-agile log (SHA-1 and SHA-256 banks)."""
        return AgileLog(events=self.events())

    def log_bytes(self) -> bytes:
        """The serialized log."""
        return self.log().build()

    def pcrs(self, quoted: Iterable[int] = QUOTED_PCRS) -> dict[int, bytes]:
        """SHA-256 PCR values by the independent reference replay (untouched PCRs: zero)."""
        log = self.log()
        values = reference_replay(log.banks, log.events)[SHA256]
        return {pcr: values.get(pcr, bytes(32)) for pcr in quoted}
