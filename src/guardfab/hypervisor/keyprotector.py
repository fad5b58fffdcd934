"""Restore a VM's last known good key protector (the reference's ``Set-VMKeyProtector
-RestoreLastKnownGoodKeyProtector``), in a fabric whose KPS refuses rolled-back KPs.

Every release spends the KP it was sent: the KPS refuses any generation older
than the newest it issued (:mod:`guardfab.keyprotection.release`). So the KP
committed before the current one is never good again, and "last known good"
cannot mean "go back one". What the KPS still accepts is the *newest* KP it
gave this VM, and that is the pair this host wrote last. Hence (ADR 0010):

    the last known good pair is the intact pair of the VM's store with the
    highest KP generation; restoring it makes it the committed pair.

An intact pair has both files, a KP that loads and verifies and has the VM's
``kp_id`` and owner, and a vault that is a JWE sealed for this VM (whether it opens only
the released key can tell). The restore helps when the committed pointer lags
behind the newest KP the host holds and the host cannot follow on its own: the
committed pair or the pointer was lost or damaged (power-on stops at a damaged
store rather than guess). A pending pair alone (a failed start, a crash before
the commit, a failed migration) needs no restore: power-on, checkpoints and
migration fall back to it when the KPS refuses the committed KP; the restore
then only aligns the pointer.

It refuses, writing nothing: while the VM runs or is an unfinished incoming
migration (its pair belongs to the migration); when the committed pair is
already the newest intact one (older pairs are spent); when the newest intact
pair is older than the committed one (the KPS would refuse it: only the VM's
owner, a guardian of the KP, can recover then); when the store holds KPs of
more than one ``kp_id`` or owner (a KP anyone signed as its own owner, with
the VM's ``kp_id`` copied and any generation, must not become the committed
one). Never lowering the committed generation, it cannot serve a rollback; the
KPS refuses one anyway.

Crash safety: damaged pairs newer than the restored one are first renamed aside
(one atomic rename each; they are unusable whatever happens next), then the
``committed`` pointer is replaced by one atomic rename, then spent pairs are
pruned. A crash at any point leaves either the old committed pair or the new one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guardfab.errors import InvalidInputError, NotAuthorizedError, UsageError
from guardfab.formats.key_protector import KeyProtector, load_key_protector
from guardfab.hypervisor.power import refuse_unfinished_incoming, running_pid
from guardfab.hypervisor.provision import load_record
from guardfab.hypervisor.vault import VaultError, VaultStore, check_sealed_shape

_OWNER_HINT = (
    "older pairs are spent (the KPS refuses a KP generation older than one it issued);"
    " if the VM cannot start, its owner -- a guardian of its KP -- must issue a new KP"
)


class NoLastKnownGoodError(UsageError):
    """No pair of the store is both intact and newer than the committed one."""

    hint = _OWNER_HINT


@dataclass(frozen=True)
class KpIdentity:
    """Who a VM's KP belongs to: its owner (a guardian id) and its ``kp_id``.

    Both stay the same across every generation the owner or a KPS makes. A KP
    verifies for anyone who signs it as its own owner, so a KP that enters a
    VM's store must be loaded pinned to the owner of the KP the VM holds, and
    carry its ``kp_id`` (a stranger can copy a ``kp_id``, not sign as the owner).
    """

    owner: str
    kp_id: str

    @classmethod
    def of(cls, kp: KeyProtector) -> KpIdentity:
        """The identity of a loaded KP."""
        return cls(kp.owner, kp.kp_id)


def held_identity(kps: Sequence[bytes], vm_name: str) -> KpIdentity:
    """The one identity of the KPs a VM holds (or was offered).

    Raises:
        InvalidInputError: a KP does not load, or none is given.
        VaultError: the KPs belong to more than one owner or ``kp_id``.
    """
    identities = {KpIdentity.of(load_key_protector(kp)) for kp in kps}
    if len(identities) != 1:
        raise VaultError(
            f"VM {vm_name!r}: its key protectors belong to {len(identities)} different"
            " owners or KP ids: nothing to pin a new one to"
        )
    return identities.pop()


def load_vm_kp(data: bytes, identity: KpIdentity, vm_name: str) -> KeyProtector:
    """Load a KP that is to enter VM ``vm_name``'s store: its owner's, of its ``kp_id``.

    Raises:
        NotAuthorizedError: signed for another owner, or of another ``kp_id``.
        InvalidInputError: the KP does not load or verify.
    """
    try:
        kp = load_key_protector(data, expected_owner=identity.owner)
    except NotAuthorizedError as exc:
        raise NotAuthorizedError(f"the key protector is not VM {vm_name!r}'s ({exc})") from exc
    if kp.kp_id != identity.kp_id:
        raise NotAuthorizedError(
            f"the key protector is not VM {vm_name!r}'s (KP id {kp.kp_id}, not {identity.kp_id})"
        )
    return kp


@dataclass(frozen=True)
class PairState:
    """One pair of a VM's store as a restore sees it (no key, no KP bytes).

    Attributes:
        number: the pair's number in the store.
        generation: its KP's generation, if the KP loads.
        kp_id: its KP's id, if the KP loads.
        problem: why the pair is not intact, or ``None``.
        owner: its KP's owner (a guardian id), if the KP loads.
    """

    number: int
    generation: int | None
    kp_id: str | None
    problem: str | None
    owner: str | None = None

    @property
    def intact(self) -> bool:
        """Both files there, the KP verifies, the vault is this VM's JWE."""
        return self.problem is None


@dataclass(frozen=True)
class RestoredKeyProtector:
    """What a restore did: which pair was committed, which is now.

    Attributes:
        vm: the VM's name.
        kp_id: the VM's KP id (the same in every generation).
        previous_pair: the pair committed before, or ``None`` if the pointer was lost or damaged.
        previous_generation: its KP's generation, or ``None`` if it was lost or damaged.
        restored_pair: the pair committed now.
        restored_generation: its KP's generation (the newest this host holds).
        damaged_pairs_set_aside: damaged newer pairs renamed ``damaged-gen-N-*`` (kept,
            never tried).
    """

    vm: str
    kp_id: str
    previous_pair: int | None
    previous_generation: int | None
    restored_pair: int
    restored_generation: int
    damaged_pairs_set_aside: int


def inspect_pairs(store: VaultStore, vm_name: str) -> list[PairState]:
    """Every pair of ``store``, oldest first, each checked without any key."""
    return [_inspect(store, number, vm_name) for number in store.numbers()]


def _inspect(store: VaultStore, number: int, vm_name: str) -> PairState:
    try:
        pair = store.load(number)
        kp = load_key_protector(pair.kp)
    except InvalidInputError as exc:
        return PairState(number, None, None, f"pair {number}: {exc}")
    try:
        check_sealed_shape(pair.vault, vm_name=vm_name)
    except VaultError as exc:
        return PairState(number, kp.generation, kp.kp_id, f"pair {number}: {exc}", kp.owner)
    return PairState(number, kp.generation, kp.kp_id, None, kp.owner)


def _committed_number(store: VaultStore) -> int | None:
    try:
        return store.committed_number()
    except VaultError:
        return None  # a damaged pointer: restoring is exactly what it needs


def choose_last_known_good(
    states: list[PairState], committed: int | None, vm_name: str
) -> PairState:
    """The pair to commit (pure: the decision, from the pairs' states).

    Raises:
        NoLastKnownGoodError: nothing newer than the committed pair is intact.
        VaultError: the store holds KPs of more than one ``kp_id`` or owner.
    """
    intact = [s for s in states if s.intact]
    kp_ids = sorted({s.kp_id for s in intact if s.kp_id is not None})
    owners = sorted({s.owner for s in intact if s.owner is not None})
    if len(kp_ids) > 1 or len(owners) > 1:
        # Anyone can sign a KP of their own with a copied kp_id and a higher
        # generation: committing it would leave the VM unable to start.
        raise VaultError(
            f"VM {vm_name!r}: its key store holds KPs of {len(kp_ids)} different KP ids"
            f" ({', '.join(kp_ids)}) and {len(owners)} owners: a pair was substituted;"
            " nothing restored",
            hint="find out who wrote into the VM's keys/ directory before anything else",
        )
    if not intact:
        problems = "; ".join(s.problem or "" for s in states) or "no pair at all"
        raise NoLastKnownGoodError(f"VM {vm_name!r} has no intact key pair ({problems})")
    best = max(intact, key=lambda s: (s.generation or 0, s.number))
    current = next((s for s in states if s.number == committed), None)
    if current is not None and current.intact and best.number == current.number:
        raise NoLastKnownGoodError(
            f"VM {vm_name!r}: its committed key protector (pair {best.number}, generation"
            f" {best.generation}) is already the newest intact one; nothing to restore"
        )
    if committed is not None and best.number < committed:
        raise NoLastKnownGoodError(
            f"VM {vm_name!r}: the newest intact pair ({best.number}, generation"
            f" {best.generation}) is older than the committed pair {committed}"
            f" ({current.problem if current and current.problem else 'lost'}): restoring it"
            " would be a rollback, which the KPS refuses"
        )
    return best


def restore_last_known_good(vm_dir: Path) -> RestoredKeyProtector:
    """Commit the VM's newest intact (vault, KP) pair (see the module docstring).

    Raises:
        UsageError: not a VM directory, or the VM is running (nothing changed).
        NoLastKnownGoodError: no pair to restore (nothing changed).
        VaultError: the store holds KPs of several KP ids (nothing changed).
    """
    vm_dir = Path(vm_dir)
    record = load_record(vm_dir)
    if running_pid(vm_dir) is not None:
        raise UsageError(
            f"VM {record.name!r} is running: its key protector cannot change under it",
            hint="stop the VM first (a running VM's committed pair is the one it started with)",
        )
    refuse_unfinished_incoming(vm_dir, record.name)
    store = VaultStore(vm_dir / "keys")
    states = inspect_pairs(store, record.name)
    committed = _committed_number(store)
    best = choose_last_known_good(states, committed, record.name)
    damaged_newer = [s.number for s in states if not s.intact and s.number > best.number]
    for number in damaged_newer:
        store.set_aside(number)
    store.commit(best.number, replaces=committed)
    previous = next((s for s in states if s.number == committed), None)
    return RestoredKeyProtector(
        vm=record.name,
        kp_id=best.kp_id or "",  # an intact pair's KP loaded: it has both
        previous_pair=committed,
        previous_generation=None if previous is None else previous.generation,
        restored_pair=best.number,
        restored_generation=best.generation or 0,
        damaged_pairs_set_aside=len(damaged_newer),
    )


__all__ = [
    "KpIdentity",
    "NoLastKnownGoodError",
    "PairState",
    "RestoredKeyProtector",
    "choose_last_known_good",
    "held_identity",
    "inspect_pairs",
    "load_vm_kp",
    "restore_last_known_good",
]
