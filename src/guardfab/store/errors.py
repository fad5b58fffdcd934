"""Errors of the state store and the audit log, placed in guardfab's one error tree.

Where each class sits decides what a caller does with it:

* :class:`StoreError` is a :class:`~guardfab.errors.TransportError`: the backend
  (a SQLite file, later an etcd cluster) failed or was busy; retrying later may work.
* :class:`StoreStateError` and its children (:class:`ConflictError`,
  :class:`WatchCompactedError`) are neither bad input nor an outage: the store
  moved on from what the caller assumed. The caller re-reads and decides -- a CAS
  loop retries, the HGS turns a conflict on a consumed nonce into a replay
  rejection. Putting them under TransportError would make generic "retry later"
  handlers retry a replay forever; putting them under InvalidInputError would
  make every lost CAS race look like an attack.
* :class:`StoreUsageError` is a :class:`~guardfab.errors.UsageError`: a key,
  value or TTL the interface does not accept -- a bug in the caller, not data.
* :class:`StoreSchemaError` is a UsageError too: a file written by a newer
  guardfab, or not a guardfab store at all; only a person can fix it.
* :class:`AuditChainError` is a :class:`~guardfab.errors.VerificationError`:
  the audit log was edited, truncated or reordered.

Messages name keys and revisions, never values: a value may be a secret-adjacent
record (a nonce, a host's registration) and errors end up in logs.
"""

from __future__ import annotations

from guardfab.errors import GuardfabError, TransportError, UsageError, VerificationError


class StoreError(TransportError):
    """The store backend failed (I/O error, locked for too long, connection lost)."""

    hint = "check that the store is reachable and not full, then retry"


class StoreUsageError(UsageError):
    """A key, value, TTL or transaction the store interface does not accept."""


class StoreSchemaError(UsageError):
    """A store file this version of guardfab cannot (or must not) open."""


class StoreStateError(GuardfabError):
    """The store's state is not what the caller assumed; re-read and decide."""


class ConflictError(StoreStateError):
    """A compare (CAS condition) failed, so nothing was written.

    Attributes:
        key: The first key whose condition failed, in the order the caller gave.
        expected: The condition as the caller wrote it (``"absent"``, ``"any"``
            or a revision number as text).
        actual: The key's current revision, or ``None`` if it is absent.
    """

    hint = "re-read the key and retry, or treat the request as a replay"

    def __init__(self, key: str, expected: str, actual: int | None) -> None:
        now = "absent" if actual is None else f"at revision {actual}"
        super().__init__(f"store conflict on {key!r}: expected {expected}, key is {now}")
        self.key = key
        self.expected = expected
        self.actual = actual


class WatchCompactedError(StoreStateError):
    """A watch asked for changes older than the history the store keeps.

    Attributes:
        compact_revision: Changes at or below this revision are gone.
    """

    hint = "re-read the keys with list() and watch again from the current revision"

    def __init__(self, start_revision: int, compact_revision: int) -> None:
        super().__init__(
            f"cannot watch from revision {start_revision}: history up to revision "
            f"{compact_revision} was compacted"
        )
        self.compact_revision = compact_revision


class AuditChainError(VerificationError):
    """The audit chain is broken; ``seq`` names the first record that does not verify.

    Attributes:
        seq: The first sequence number at which the chain breaks, or ``None`` when
            the problem is not tied to one record (an unexpected key).
        reason: A short machine-readable reason (``"edited"``, ``"gap"``,
            ``"reordered"``, ``"prev-mismatch"``, ``"head-mismatch"``,
            ``"truncated"``, ``"malformed"``, ``"beyond-head"``, ``"unexpected-key"``,
            ``"checkpoint"``).
    """

    hint = (
        "the audit log was modified outside guardfab; keep the store file for "
        "investigation and compare it with a backup or a signed checkpoint"
    )

    def __init__(self, message: str, *, seq: int | None, reason: str) -> None:
        where = f"audit record {seq}" if seq is not None else "audit log"
        super().__init__(f"{where}: {message}")
        self.seq = seq
        self.reason = reason
