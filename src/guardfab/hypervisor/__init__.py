"""The VM runtime: QEMU and swtpm processes, LUKS disks, VM security policy, live migration.

The I/O edge of guardfab's shielded VMs (ADR 0008). Pure parts: :mod:`.spec`
(what a VM is), :mod:`.policy` (what its security level allows), :mod:`.argv`
(QEMU's command line), :mod:`.specialize` (the answer-file disk's content).
Processes and devices: :mod:`.accel` (KVM probe, TCG fallback), :mod:`.qmp`,
:mod:`.vtpm`, :mod:`.disk`, :mod:`.vm`, :mod:`.migration`, :mod:`.template_image`.
A provisioned VM's life (ADR 0009, 0011): :mod:`.provision`, :mod:`.vault`,
:mod:`.power`, :mod:`.migrate`, :mod:`.checkpoint`, :mod:`.keyprotector` (last
known good KP), :mod:`.settings` (what a fabric administrator may change) and
:mod:`.console` (encryption-supported VMs only).
Keys reach QEMU and swtpm only through file descriptors and the QMP socket.
"""
