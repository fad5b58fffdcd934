"""HGS administration: the operations behind ``/admin/v1`` and ``guardfab hgs ...``.

Each operation mirrors one of the reference's cmdlets (named in its docstring).
Every change follows one pattern, so that bad input and races change nothing:

1. take a :class:`Snapshot`: the revision of ``trust/version`` and the
   :class:`~guardfab.attestation.trust.TrustState` it stands for;
2. validate the request completely against that snapshot, raising a typed
   error (:class:`InvalidRequestError` 400, :class:`NotFoundError` 404,
   :class:`AlreadyExistsError` 409, ``LockedPolicyError`` 409) before anything
   is written;
3. commit the change and its audit record (kind ``admin``, actor = the role)
   in ONE store transaction that also compares ``trust/version`` with the
   snapshot. A concurrent change by another administrator makes the compare
   fail; the caller gets :class:`ConcurrentChangeError` (409) and nothing is
   written, instead of a change validated against a state that no longer is.

Reads, reports and baselines live in :mod:`guardfab.hgs.admin_reports` and
:mod:`guardfab.hgs.admin_baselines`; they use the same :class:`Admin` context.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from guardfab.attestation.admin_group_mode import DEPRECATION_WARNING
from guardfab.attestation.policies import (
    DEFAULT_POLICY_SET,
    effective_state,
    policy_named,
    set_policy_state,
)
from guardfab.attestation.trust import (
    AttestationMode,
    PolicyState,
    TrustState,
)
from guardfab.errors import FormatError, UsageError
from guardfab.hgs import registry as reg
from guardfab.store.audit import AuditLog
from guardfab.store.base import ABSENT, MAX_VALUE_BYTES, Condition, Txn
from guardfab.store.errors import ConflictError
from guardfab.tpm.eventlog import PCR_COUNT

if TYPE_CHECKING:
    from guardfab.hgs.service import HgsService

#: Names an administrator gives (hosts, baselines, CI policies, groups): they
#: become store keys and URL path segments, so they are kept to a safe alphabet.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
_T = TypeVar("_T")
#: Largest certificate or public key accepted (PEM text).
MAX_PEM_CHARS = 64 * 1024

CERTIFICATES_NOTE = (
    "health certificates already issued stay valid until they expire: they are "
    "self-contained signed tokens that key protection checks without asking attestation "
    "again; hosts attesting from now on are checked under the new configuration"
)


class NotFoundError(UsageError):
    """The named record does not exist (HTTP 404)."""

    hint = "list what is registered (e.g. 'guardfab hgs host list') and check the name"


class AlreadyExistsError(UsageError):
    """A record with this name or identity is already registered (HTTP 409)."""

    hint = "remove the existing record first, or choose another name"


class ConcurrentChangeError(UsageError):
    """Another administrator changed the HGS configuration meanwhile (HTTP 409)."""

    hint = "nothing was changed; look at the current state and retry"


class InvalidRequestError(FormatError):
    """An administrator's input is malformed or not acceptable (HTTP 400)."""


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is an acceptable name (see :data:`NAME_PATTERN`).

    Raises:
        InvalidRequestError: it is not.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidRequestError(
            f"{what}: 1 to 128 characters of A-Z a-z 0-9 . _ : @ -, starting with a letter or digit"
        )
    return value


def valid(build: Callable[[], _T], what: str) -> _T:
    """Run an engine constructor; its UsageError on bad values is the caller's bad input."""
    try:
        return build()
    except (NotFoundError, AlreadyExistsError, ConcurrentChangeError):
        raise
    except UsageError as exc:
        raise InvalidRequestError(f"{what}: {exc}") from exc


class Snapshot(NamedTuple):
    """The trust state an operation validated against, and the version it had."""

    version: Condition
    trust: TrustState


@dataclass
class Change:
    """One administrative change: its store writes and what the audit record says."""

    action: str
    subject: str
    details: Mapping[str, object] = field(default_factory=dict)
    puts: list[tuple[str, Any]] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    #: Keys that must still be absent (new records) or at a revision (edited ones).
    expect: list[tuple[str, Condition]] = field(default_factory=list)


class Admin:
    """The administration context of one request: the store, the audit log and the actor.

    Args:
        registry: the HGS records.
        audit: the audit log changes are recorded in.
        actor: who asks (the role of the presented token, e.g. ``admin``).
        clock: wall-clock seconds (the service's, injected for tests).
    """

    def __init__(
        self,
        registry: reg.Registry,
        audit: AuditLog,
        actor: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.store = registry.store
        self.audit = audit
        self.actor = actor
        self.clock = clock

    @classmethod
    def of(cls, service: HgsService, actor: str) -> Admin:
        """The context for ``actor`` on a running service."""
        return cls(service.registry, service.audit, actor, service.clock)

    def now(self) -> datetime.datetime:
        """The service clock as an aware datetime."""
        return datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)

    def snapshot(self) -> Snapshot:
        """The current trust state and the ``trust/version`` revision it was read at."""
        entry = self.store.get(reg.VERSION_KEY)
        version: Condition = ABSENT if entry is None else entry.revision
        return Snapshot(version, self.registry.trust())

    def commit(self, snap: Snapshot, change: Change, *, trust: bool = True) -> None:
        """Write ``change`` and its audit record atomically, if the trust has not moved.

        Raises:
            InvalidRequestError: a record is too large to store.
            ConcurrentChangeError: the trust state or an expected record changed.
        """
        if any(len(reg.encode(value)) > MAX_VALUE_BYTES for _key, value in change.puts):
            raise InvalidRequestError(f"{change.subject}: the record is too large to store")
        if trust:
            txn = reg.Registry.trust_txn(change.puts, change.deletes)
        else:
            txn = Txn()
            for key, value in change.puts:
                txn.put(key, reg.encode(value))
            for key in change.deletes:
                txn.delete(key)
        txn.compare(reg.VERSION_KEY, snap.version)
        for key, expect in change.expect:
            txn.compare(key, expect)
        details: dict[str, object] = {"action": change.action, **change.details}
        try:
            self.audit.append(
                kind="admin",
                actor=self.actor,
                subject=change.subject,
                outcome="success",
                details=details,
                txn=txn,
            )
        except ConflictError as exc:
            raise ConcurrentChangeError(
                f"{change.subject}: the HGS configuration changed while this request ran"
            ) from exc

    def load(self, key: str, what: str) -> tuple[Any, int]:
        """A stored record and its revision.

        Raises:
            NotFoundError: there is none (``what`` names it in the message).
        """
        entry = self.store.get(key)
        if entry is None:
            raise NotFoundError(f"{what} is not registered")
        return reg.decode(entry.value, what=key), entry.revision


# --------------------------------------------------------------------- modes and settings


def mode_warnings(modes: Iterable[AttestationMode]) -> list[str]:
    """What an administrator should know about these modes."""
    return [DEPRECATION_WARNING] if AttestationMode.ADMIN_GROUP in modes else []


def show_modes(admin: Admin) -> dict[str, Any]:
    """The active attestation modes (Get-HgsServer)."""
    modes = sorted(admin.registry.modes())
    return {"modes": [m.value for m in modes], "warnings": mode_warnings(modes)}


def set_modes(admin: Admin, names: Sequence[str]) -> dict[str, Any]:
    """Set the active attestation modes (Set-HgsServer -TrustTpm / -TrustHostKey / ...).

    Several modes may be active while hosts move from one to another. Switching
    never invalidates issued health certificates (see :data:`CERTIFICATES_NOTE`).
    """
    try:
        modes = sorted({AttestationMode(name) for name in names})
    except ValueError as exc:
        known = ", ".join(m.value for m in AttestationMode)
        raise InvalidRequestError(f"unknown attestation mode (known: {known})") from exc
    if not modes:
        raise InvalidRequestError("at least one attestation mode must be active")
    snap = admin.snapshot()
    values = [m.value for m in modes]
    admin.commit(
        snap,
        Change("set-modes", "modes", {"modes": values}, puts=[(reg.MODES_KEY, values)]),
    )
    return {"modes": values, "warnings": mode_warnings(modes), "note": CERTIFICATES_NOTE}


def show_settings(admin: Admin) -> dict[str, Any]:
    """The trust settings: admit certified EKs, the CI policy PCR."""
    return admin.registry.settings()


def update_settings(
    admin: Admin, *, admit_certified_eks: bool | None = None, ci_policy_pcr: int | None = None
) -> dict[str, Any]:
    """Change trust settings; fields left None keep their value.

    ``admit_certified_eks`` admits unregistered TPMs whose EK certificate chains
    to a registered TPM vendor CA (the reference's TrustedTpm_RootCA store).
    """
    if ci_policy_pcr is not None and not 0 <= ci_policy_pcr < PCR_COUNT:
        raise InvalidRequestError(f"CI policy PCR must be in 0-{PCR_COUNT - 1}")
    snap = admin.snapshot()
    settings = admin.registry.settings()
    if admit_certified_eks is not None:
        settings["admit_certified_eks"] = admit_certified_eks
    if ci_policy_pcr is not None:
        settings["ci_policy_pcr"] = ci_policy_pcr
    admin.commit(
        snap, Change("update-settings", "settings", dict(settings), [(reg.SETTINGS_KEY, settings)])
    )
    return settings


# --------------------------------------------------------------------- attestation policies


def list_policies(admin: Admin) -> list[dict[str, Any]]:
    """Every policy with its state, evidence and Linux gap (Get-HgsAttestationPolicy)."""
    return DEFAULT_POLICY_SET.catalog(admin.registry.trust())


def set_policy(admin: Admin, name: str, state: PolicyState) -> dict[str, Any]:
    """Enable, disable or lock a policy (Enable-/Disable-HgsAttestationPolicy).

    Locking is one-way and a locked policy cannot be disabled: the engine's
    :func:`~guardfab.attestation.policies.set_policy_state` refuses it with
    ``LockedPolicyError``, before anything is written.
    """
    try:
        policy = policy_named(name)
    except UsageError as exc:
        raise NotFoundError(str(exc), hint=f"known policies: {exc.hint}") from exc
    snap = admin.snapshot()
    before = effective_state(snap.trust, policy)
    set_policy_state(snap.trust, name, state)
    details: dict[str, object] = {"policy": name, "state": state.value, "before": before.value}
    key = reg.POLICIES + name
    admin.commit(
        snap, Change("set-policy-state", f"policy:{name}", details, [(key, {"state": state.value})])
    )
    return details


# --------------------------------------------------------------------- revocation


def _is_known(admin: Admin, trust: TrustState, host_id: str) -> bool:
    registered = (
        {h.host_id for h in trust.tpm_hosts}
        | {k.host_id for k in trust.host_keys}
        | {b.host_id for b in trust.ak_bindings}
    )
    return host_id in registered or admin.store.get(reg.LAST + host_id) is not None


def revoke_host(admin: Admin, host_id: str, reason: str = "") -> dict[str, Any]:
    """Refuse a host in every mode from now on, keeping its registration.

    The reference has no revocation list: it removes the registration
    (Remove-HgsAttestationTpmHost / -HostKey). A revocation is reversible and
    also covers hosts admitted by a vendor-certified EK or a group certificate.
    """
    check_name(host_id, "host id")
    if len(reason) > 256 or not reason.isprintable():
        raise InvalidRequestError("reason: at most 256 printable characters")
    snap = admin.snapshot()
    if host_id in snap.trust.revoked_hosts:
        raise AlreadyExistsError(f"host {host_id!r} is already revoked")
    if not _is_known(admin, snap.trust, host_id):
        raise NotFoundError(f"no host {host_id!r} is registered or has attested")
    record = {"host_id": host_id, "revoked_at": admin.now().isoformat(), "reason": reason}
    key = reg.REVOKED + host_id
    admin.commit(
        snap,
        Change("revoke-host", f"host:{host_id}", record, [(key, record)], expect=[(key, ABSENT)]),
    )
    return {**record, "note": "it fails attestation in every mode until unrevoked"}


def unrevoke_host(admin: Admin, host_id: str) -> dict[str, Any]:
    """Lift a revocation."""
    check_name(host_id, "host id")
    key = reg.REVOKED + host_id
    snap = admin.snapshot()
    record, revision = admin.load(key, f"a revocation of host {host_id!r}")
    admin.commit(
        snap,
        Change(
            "unrevoke-host",
            f"host:{host_id}",
            {"host_id": host_id},
            deletes=[key],
            expect=[(key, revision)],
        ),
    )
    return dict(record)


def list_revoked(admin: Admin) -> list[dict[str, Any]]:
    """The revoked hosts, with when and why."""
    return admin.registry.records(reg.REVOKED, dict)
