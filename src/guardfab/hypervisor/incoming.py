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
that pair (or a newer one), since the answer may never reach the source.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from guardfab.errors import GuardfabError, PolicyError, TransportError, UsageError
from guardfab.formats.key_protector import load_key_protector
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.hypervisor.argv import VmPaths
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


def _check_destination(vm_dir: Path, offer: MigrationOffer) -> None:
    """Nothing of the VM here, except its disks or a superseded abandoned migration.

    Raises:
        UsageError: the VM exists here, or an unfinished migration holds a pair
            the source has not taken back yet.
    """
    if not vm_dir.exists() and not vm_dir.is_symlink():
        return
    if incoming_state(vm_dir) is not None:
        if running_pid(vm_dir) is None and _superseded(vm_dir, offer):
            remove_host_state(vm_dir)  # the source took that pair back: it is spent
            return
        raise UsageError(
            f"VM {offer.name!r}: an unfinished incoming migration here holds its newest "
            "key protector",
            hint="take it back to the source first: guardfab vm migrate NAME --abort ...",
        )
    entries = {entry.name for entry in vm_dir.iterdir()}
    if entries == {"disks"} and (vm_dir / "disks").resolve() == offer.disks_dir:
        return  # this host was the VM's source before: its disks stay where they are
    raise UsageError(f"VM {offer.name!r} exists already on this host ({vm_dir})")


def _superseded(vm_dir: Path, offer: MigrationOffer) -> bool:
    """Whether the offer shows the source holds this directory's pending KP, or a newer one."""
    pending = VaultStore(vm_dir / "keys").pending()
    if pending is None:
        return True
    mine = load_key_protector(pending.kp).generation
    return any(load_key_protector(p.kp).generation >= mine for p in offer.pairs)


def _release(offer: MigrationOffer, key_source: KeySource) -> tuple[SealedPair, ReleasedKeys]:
    """The keys of the offered committed pair, or of the pending one a failed migration left."""
    refusals: list[GuardfabError] = []
    for pair in offer.pairs:
        try:
            return pair, key_source.release(pair.kp)
        except TransportError:
            raise
        except GuardfabError as exc:
            refusals.append(exc)
    first = refusals[0]
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
) -> IncomingVm:
    """Release, lay out and listen (see the module docstring).

    Raises:
        UsageError: the VM is here already, or its disks are out of reach (nothing
            released, nothing written).
        PolicyError: the record breaks its policy (nothing released).
        MigrationRefusedError: no keys for this host (nothing written).
        TransportError: no KPS answered (nothing written).
        HypervisorError: QEMU did not start or listen: the directory stays,
            abandoned, for its pair to be handed back.
    """
    vm_dir = Path(vms_dir) / offer.name
    _check_destination(vm_dir, offer)
    check_disks(offer)
    check_vm_policy(offer.record.spec(vm_dir))
    pair, released = _release(offer, key_source)
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
