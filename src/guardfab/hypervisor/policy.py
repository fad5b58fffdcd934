"""The VM security policy: what each security level requires and forbids.

The policy is a table of small rules (:data:`RULES`); each names the levels it
binds and the reason a person reads when it fails. :func:`check_vm_policy`
applies them all and reports every failed rule at once, in the manner of
sigstore-python's composable policies, so a fabric administrator sees the whole
list rather than fixing one refusal after another.

========================  ========  ====================  ======
requirement               shielded  encryption-supported  normal
========================  ========  ====================  ======
OVMF secure boot          required  required              any
boot from its own disk    required  any                   any
vTPM                      required  required              any
encrypted disks           required  required              any
console (serial port)     refused   allowed               any
debugger (gdb stub)       refused   refused               any
guest-agent channel       refused   refused               any
========================  ========  ====================  ======

"Boot from its own disk" means no kernel handed to QEMU (``-kernel``): OVMF
does not verify such a kernel, so a shielded VM's firmware boots the signed
chain on its encrypted OS disk instead (ADR 0013).

Encrypted state and migration are not spec fields: the runtime always encrypts
the vTPM state and a shielded or encryption-supported VM migrates only over TLS
(:mod:`guardfab.hypervisor.migration`). This module is pure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from guardfab.errors import PolicyError
from guardfab.hypervisor.spec import Firmware, SecurityLevel, VmSpec

_PROTECTED = frozenset({SecurityLevel.SHIELDED, SecurityLevel.ENCRYPTION_SUPPORTED})
_SHIELDED = frozenset({SecurityLevel.SHIELDED})


@dataclass(frozen=True)
class Rule:
    """One requirement: ``holds(spec)`` must be true for a spec at one of ``levels``."""

    name: str
    levels: frozenset[SecurityLevel]
    holds: Callable[[VmSpec], bool]
    reason: str

    def check(self, spec: VmSpec) -> str | None:
        """Return why ``spec`` breaks this rule, or ``None`` if it does not."""
        if spec.level in self.levels and not self.holds(spec):
            return f"{self.name}: {self.reason}"
        return None


#: Every rule of the policy; the table in this module's docstring mirrors it.
RULES: tuple[Rule, ...] = (
    Rule(
        "secure-boot",
        _PROTECTED,
        lambda spec: spec.firmware is Firmware.OVMF_SECURE_BOOT,
        "the VM must boot OVMF with secure boot",
    ),
    Rule(
        "firmware-boot",
        _SHIELDED,
        lambda spec: spec.kernel is None,
        "a shielded VM boots its own disk through the signed boot chain, "
        "not a kernel given by the host (which the firmware does not verify)",
    ),
    Rule("vtpm", _PROTECTED, lambda spec: spec.vtpm, "the VM must have a vTPM"),
    Rule(
        "encrypted-disks",
        _PROTECTED,
        lambda spec: all(disk.encrypted for disk in spec.disks),
        "every disk must be LUKS-encrypted",
    ),
    Rule(
        "no-console",
        _SHIELDED,
        lambda spec: not spec.debug.console,
        "a shielded VM has no console or serial port",
    ),
    Rule(
        "no-debugger",
        _PROTECTED,
        lambda spec: not spec.debug.gdbstub,
        "a debugger stub reads and writes all guest memory",
    ),
    Rule(
        "no-guest-agent",
        _PROTECTED,
        lambda spec: not spec.debug.guest_agent,
        "a guest-agent channel lets the host run commands in the guest",
    ),
)


def policy_violations(spec: VmSpec, rules: tuple[Rule, ...] = RULES) -> list[str]:
    """Every rule that ``spec`` breaks, each with its reason (empty if none)."""
    return [problem for rule in rules if (problem := rule.check(spec)) is not None]


def check_vm_policy(spec: VmSpec, rules: tuple[Rule, ...] = RULES) -> None:
    """Refuse a spec that its own security level forbids.

    Raises:
        PolicyError: naming every rule broken, not only the first.
    """
    problems = policy_violations(spec, rules)
    if problems:
        raise PolicyError(
            f"VM {spec.name!r} ({spec.level}) breaks its security policy: " + "; ".join(problems),
            hint="a shielded VM cannot be loosened; choose another security level for a new VM",
        )
