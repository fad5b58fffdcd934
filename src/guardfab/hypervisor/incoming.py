"""The destination's half of a live migration, run by the destination's own agent.

:func:`receive` takes the source's :class:`~guardfab.hypervisor.migrate.MigrationOffer`
(public or sealed only) and:

1. checks what it can without keys: no VM of that name here (a directory
   holding only the disks, left by this host as an earlier source, is fine),
   the disks reachable at the offered path, the VM's policy;
2. releases the offered KP with this host's *own* health certificate (the
   committed one, then a pending one). Refused: :class:`MigrationRefusedError`,
   and nothing was written on this host -- nor will a byte of memory move;
3. opens the vault with the released current key. From here the source's KP
   is spent, so before anything else this host writes the released pair (the
   vault sealed under the new key, the egress KP) as the *pending* pair of its
   VM directory, marked ``incoming.json`` (power-on refuses such a directory:
   the pair belongs to the migration until it ends);
4. lays out its side -- record, ``disks`` as a symlink to the shared disks, its
   own copy of the source's OVMF variable store, its own vTPM state directory;
5. checks that the record's policy is the one sealed in the vault: the record
   came through the administrator's hands, and a loosened one (a shielded VM
   offered as encryption-supported, to get a console) is refused, its pair kept
   for the hand-back;
6. starts QEMU ``-incoming defer`` with its own swtpm, and listens with TLS-PSK
   under a PSK derived from the vault (:func:`~guardfab.hypervisor.migrate.migration_psk`)
   and a fresh salt, which :class:`IncomingVm` answers with the address and port.

Then :meth:`IncomingVm.finish` (the stream arrived: run the guest, commit the
pair, drop the marker) or :meth:`IncomingVm.abandon` (stop QEMU, keep the
directory and its pair, marked abandoned). :func:`hand_back` answers the
pending pair of an unfinished or abandoned incoming migration, to be taken back
by the source; the directory stays until a later offer shows the source holds
that pair (or a newer one) -- of the same owner and ``kp_id`` -- and the KPS
granted its release, since the answer may never reach the source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from guardfab.errors import (
    GuardfabError,
    InvalidInputError,
    PolicyError,
    UsageError,
)
from guardfab.formats.key_protector import load_key_protector
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.hypervisor.argv import VmPaths
from guardfab.hypervisor.bootpaths import check_direct_boot
from guardfab.hypervisor.keyprotector import KpIdentity, held_identity, load_vm_kp
from guardfab.hypervisor.migrate import (
    SALT_SIZE,
    MigrationOffer,
    MigrationRefusedError,
    SealedPair,
    StreamEndpoint,
    check_disks,
    migration_psk,
    remove_host_state,
)
from guardfab.hypervisor.migration import IncomingMigration
from guardfab.hypervisor.policy import check_vm_policy
from guardfab.hypervisor.power import (
    INCOMING_FILE,
    RUN_FILE,
    _record_run,
    bind_policy,
    power_off,
    release_first,
    running_pid,
)
from guardfab.hypervisor.provision import KeySource, VmRecord, write_record
from guardfab.hypervisor.vault import VaultContents, VaultStore, open_vault, seal_vault
from guardfab.hypervisor.vm import QemuVm

RECEIVING = "receiving"
ABANDONED = "abandoned"

#: Makes the destination's runtime from the VM's record and its directory here.
DestinationFactory = Callable[[VmRecord, Path], QemuVm]


def _qemu(record: VmRecord, vm_dir: Path) -> QemuVm:
    return QemuVm(record.spec(vm_dir), vm_dir / "state")


def incoming_state(vm_dir: Path) -> str | None:
    """``receiving`` or ``abandoned`` for an unfinished incoming migration, else ``None``."""
    try:
        info = json.loads((Path(vm_dir) / INCOMING_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None if not (Path(vm_dir) / INCOMING_FILE).exists() else ABANDONED
    state = info.get("state") if isinstance(info, dict) else None
    return state if state in {RECEIVING, ABANDONED} else ABANDONED


def _mark(vm_dir: Path, state: str) -> None:
    temp = vm_dir / f"{INCOMING_FILE}.tmp"
    temp.write_text(json.dumps({"state": state, "since": int(time.time())}) + "\n")
    temp.chmod(0o600)
    temp.rename(vm_dir / INCOMING_FILE)


@dataclass
class IncomingVm:
    """The destination's QEMU waiting for (or having received) the stream."""

    name: str
    vm_dir: Path
    vm: QemuVm
    contents: VaultContents = field(repr=False)
    pending: int
    endpoint: StreamEndpoint
    listening: IncomingMigration

    def landed(self) -> bool:
        """Whether the whole stream arrived (QEMU alive and no longer waiting for it)."""
        try:
            return self.vm.running and self.vm.status() != "inmigrate"
        except GuardfabError:
            return False

    def finish(self, timeout: float) -> None:
        """Run the guest here and make the VM this host's: commit, record the run.

        Raises:
            MigrationError: the stream did not arrive within ``timeout`` (nothing
                committed: abandon, and hand the pair back).
        """
        self.listening.finish(timeout)
        VaultStore(self.vm_dir / "keys").commit(self.pending)
        _record_run(self.vm_dir, self.vm)
        (self.vm_dir / INCOMING_FILE).unlink()

    def abandon(self) -> None:
        """Stop the waiting QEMU; the directory and its pending pair stay, marked abandoned."""
        self.listening.forget_psk()
        self.vm.stop()
        (self.vm_dir / RUN_FILE).unlink(missing_ok=True)
        _mark(self.vm_dir, ABANDONED)


def _check_destination(vm_dir: Path, offer: MigrationOffer) -> tuple[SealedPair, ...]:
    """The offered pairs this host may release: nothing of the VM may be here, but its disks.

    An abandoned incoming migration here holds the VM's newest pair until the
    source shows it holds that pair or a newer one: then only those offered
    pairs may be released, and the KPS's grant for one of them is the proof
    that this directory's pair is spent (:func:`receive` removes it only then).

    Raises:
        UsageError: the VM exists here, or an unfinished migration holds a pair
            the source has not taken back yet.
    """
    if not vm_dir.exists() and not vm_dir.is_symlink():
        return offer.pairs
    if incoming_state(vm_dir) is not None:
        newer = _not_older_pairs(vm_dir, offer) if running_pid(vm_dir) is None else ()
        if newer:
            return newer
        raise UsageError(
            f"VM {offer.name!r}: an unfinished incoming migration here holds its newest "
            "key protector",
            hint="take it back to the source first: guardfab vm migrate NAME --abort ...",
        )
    entries = {entry.name for entry in vm_dir.iterdir()}
    if entries == {"disks"} and (vm_dir / "disks").resolve() == offer.disks_dir:
        return offer.pairs  # this host was the VM's source before: its disks stay where they are
    raise UsageError(f"VM {offer.name!r} exists already on this host ({vm_dir})")


def _not_older_pairs(vm_dir: Path, offer: MigrationOffer) -> tuple[SealedPair, ...]:
    """The offered pairs of this directory's pending KP's owner and ``kp_id``, not older than it.

    Anyone can sign a KP of their own with any ``kp_id`` and generation: only
    the owner's (or its KPS's) KPs can show the pending one is superseded.
    """
    pending = VaultStore(vm_dir / "keys").pending()
    if pending is None:
        return offer.pairs  # no pair here to lose
    mine = load_key_protector(pending.kp)
    identity = KpIdentity.of(mine)
    newer: list[SealedPair] = []
    for pair in offer.pairs:
        try:
            kp = load_vm_kp(pair.kp, identity, offer.name)
        except InvalidInputError:
            continue
        if kp.generation >= mine.generation:
            newer.append(pair)
    return tuple(newer)


def _release(
    offer: MigrationOffer, pairs: tuple[SealedPair, ...], key_source: KeySource
) -> tuple[SealedPair, ReleasedKeys]:
    """The keys of the offered committed pair, or of the pending one a failed migration left."""
    released = release_first(pairs, key_source)
    if isinstance(released, tuple):
        return released
    first = released[0]  # the offer holds a pair at least (checked on arrival)
    raise MigrationRefusedError(
        f"VM {offer.name!r} not migrated: the destination got no keys from the KPS ({first}); "
        "nothing was sent and the VM keeps running at the source",
        hint=first.hint or "make the destination attest (guardfab host attest) and retry",
    ) from first


def _lay_out(vm_dir: Path, offer: MigrationOffer, sealed: bytes, egress_kp: bytes) -> int:
    """This host's side of the VM: marker and released pair first, then the rest."""
    vm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _mark(vm_dir, RECEIVING)
    number = VaultStore(vm_dir / "keys").write_pending(sealed, egress_kp).number
    write_record(vm_dir, offer.record)
    if not (vm_dir / "disks").exists():
        (vm_dir / "disks").symlink_to(offer.disks_dir, target_is_directory=True)
    if offer.nvram is not None:
        (vm_dir / "state").mkdir(mode=0o700, exist_ok=True)
        nvram = VmPaths(work_dir=vm_dir / "state", run_dir=vm_dir).ovmf_vars
        fd = os.open(nvram, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(offer.nvram)
    return number


def receive(
    offer: MigrationOffer,
    vms_dir: Path,
    key_source: KeySource,
    *,
    address: str,
    port: int,
    factory: DestinationFactory = _qemu,
    direct_boot_dir: Path | None,
) -> IncomingVm:
    """Release, lay out and listen (see the module docstring).

    Args:
        direct_boot_dir: where the record's direct kernel/initrd may come from
            (the host configuration's; ``None`` refuses a direct boot). No
            default: only a caller that is root on this host itself passes
            ``LOCAL_ROOT_BOOT``.

    Raises:
        UsageError: the VM is here already, or its disks are out of reach (nothing
            released, nothing written).
        PolicyError: the record breaks its policy (nothing released).
        DirectBootRefusedError: the record's kernel or initrd lies outside
            ``direct_boot_dir`` (nothing released).
        VaultError, NotAuthorizedError: the offered KPs are not of one owner and
            ``kp_id`` (nothing released).
        MigrationRefusedError: no keys for this host (nothing written).
        TransportError: no KPS answered (nothing written).
        HypervisorError: QEMU did not start or listen: the directory stays,
            abandoned, for its pair to be handed back.
    """
    vm_dir = Path(vms_dir) / offer.name
    replacing = incoming_state(vm_dir) is not None
    pairs = _check_destination(vm_dir, offer)
    held_identity([p.kp for p in offer.pairs], offer.name)  # one owner, one kp_id
    check_disks(offer)
    check_vm_policy(offer.record.spec(vm_dir))
    # QEMU (root) reads a direct kernel and initrd into the guest: only from the
    # host's own directory, and by the resolved paths (the record names any path).
    boot = check_direct_boot(offer.record.boot, direct_boot_dir)
    offer = dataclasses.replace(offer, record=dataclasses.replace(offer.record, boot=boot))
    pair, released = _release(offer, pairs, key_source)
    if replacing:
        remove_host_state(vm_dir)  # the grant shows the source holds a pair as new: it is spent
    contents = open_vault(pair.vault, released.old_transport_key, vm_name=offer.name)
    sealed = seal_vault(contents, released.new_transport_key, vm_name=offer.name)
    Path(vms_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    number = _lay_out(vm_dir, offer, sealed, released.egress_kp)
    try:
        # The record came through the administrator's hands: its policy must be the
        # one sealed in the vault (a loosened record is refused, its pair kept).
        bind_policy(contents, offer.record, strict=True)
    except PolicyError:
        _mark(vm_dir, ABANDONED)
        raise
    vm = factory(offer.record, vm_dir)
    endpoint = StreamEndpoint(address, port, secrets.token_bytes(SALT_SIZE))
    try:
        vm.start(contents.vm_keys(), incoming=True)
        psk = migration_psk(contents.vtpm_migration, endpoint.salt, offer.name)
        listening = IncomingMigration(vm, psk, port, address)
        listening.listen()
    except BaseException:
        vm.stop()
        _mark(vm_dir, ABANDONED)
        raise
    # Recorded so that an agent restarted meanwhile can still stop this QEMU (hand_back).
    _record_run(vm_dir, vm)
    return IncomingVm(offer.name, vm_dir, vm, contents, number, endpoint, listening)


def hand_back(vm_dir: Path) -> SealedPair:
    """The pending pair of an unfinished incoming migration, its QEMU stopped first.

    The QEMU may outlive an agent that restarted while it waited: it is stopped
    by the pid recorded at :func:`receive`.

    Raises:
        UsageError: no unfinished incoming migration of this VM here.
    """
    vm_dir = Path(vm_dir)
    if incoming_state(vm_dir) is None:
        raise UsageError(f"no unfinished incoming migration of VM {vm_dir.name!r} on this host")
    power_off(vm_dir)
    pending = VaultStore(vm_dir / "keys").pending()
    if pending is None:
        raise UsageError(f"the incoming migration of VM {vm_dir.name!r} holds no key pair")
    _mark(vm_dir, ABANDONED)
    return SealedPair.of(pending)


__all__ = [
    "ABANDONED",
    "RECEIVING",
    "DestinationFactory",
    "IncomingVm",
    "hand_back",
    "incoming_state",
    "receive",
]
