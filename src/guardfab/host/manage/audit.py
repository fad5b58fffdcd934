"""The agent's audit log of management requests: the store's hash chain, in the agent's state.

Every mutating request is one record, granted or refused, with who asked (the
role, or why no role was found), what (the operation and the VM), the outcome
(``granted``, ``refused`` -- authorization or policy said no, nothing changed --
or ``failed`` -- allowed, but the operation failed) and the reason. Records hold
no secret: error messages never carry one by project rule, and the store refuses
detail keys that look like secrets.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from guardfab.store.audit import AuditLog
from guardfab.store.audit_chain import AuditRecord, AuditReport
from guardfab.store.sqlite import SqliteStore

KIND = "vm-management"
GRANTED = "granted"
REFUSED = "refused"
FAILED = "failed"
_MAX_REASON = 500
#: A VM name as provisioning accepts it; anything else is recorded as invalid, not copied.
_VM_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _subject(vm: str | None) -> str:
    """The record's subject: the VM's name, ``-`` for none, a marker for a malformed one."""
    if vm is None:
        return "-"
    return vm if _VM_NAME.fullmatch(vm) else "(invalid name)"


class ManagementAudit:
    """Appends to and verifies the management audit log in ``path`` (SQLite)."""

    def __init__(self, path: Path) -> None:
        self.store = SqliteStore(path)
        self.log = AuditLog(self.store)

    def record(
        self,
        *,
        actor: str,
        operation: str,
        vm: str | None,
        outcome: str,
        reason: str,
        details: dict[str, Any] | None = None,
    ) -> AuditRecord:
        """Append one record (see the module docstring for the fields)."""
        body = {"operation": operation, "reason": reason[:_MAX_REASON], **(details or {})}
        return self.log.append(
            kind=KIND, actor=actor, subject=_subject(vm), outcome=outcome, details=body
        )

    def records(self) -> list[AuditRecord]:
        """Every record, oldest first (parsed, not verified: see :meth:`verify`)."""
        return list(self.log.iter_records())

    def verify(self) -> AuditReport:
        """Walk the chain; raises :class:`~guardfab.store.errors.AuditChainError` if broken."""
        return self.log.verify()

    def close(self) -> None:
        """Close the store."""
        self.store.close()
