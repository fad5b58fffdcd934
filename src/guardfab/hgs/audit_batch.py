"""Appends made in one turn of a worker's event loop, committed in one store transaction.

The host-facing routes run on the event loop (a thread hop cost more than the
work, ADR 0016), so the audit log's thread-based group commit never sees two
appends at once there: each attestation paid its own ``BEGIN``/``COMMIT``,
about a third of the store's CPU per attestation. Under load, several requests
become ready in the same loop turn; each one now queues its append here and
awaits it, and a callback scheduled behind them commits the whole turn's queue
with :meth:`AuditLog.append_many`. A lone request waits only for the rest of the
current turn, never for a timer.

The commit still runs on the loop thread, as before, and each request keeps
every guarantee of :meth:`AuditLog.append` (its own compares, its own error).
"""

from __future__ import annotations

import asyncio

from guardfab.store.audit import AppendRequest, AuditLog
from guardfab.store.audit_chain import AuditRecord


class LoopBatcher:
    """Queues appends on the running loop and commits them together at the end of the turn."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._queued: list[tuple[AppendRequest, asyncio.Future[AuditRecord]]] = []

    async def append(self, request: AppendRequest) -> AuditRecord:
        """Append ``request``'s record in this turn's batch; raise its error as ``append`` would."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[AuditRecord] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._commit)
        self._queued.append((request, future))
        return await future

    def _commit(self) -> None:
        queued, self._queued = self._queued, []
        try:
            results = self._audit.append_many([request for request, _ in queued])
        except Exception as exc:  # noqa: BLE001 -- every waiting request gets it
            results = [exc] * len(queued)
        for (_, future), result in zip(queued, results, strict=True):
            if future.cancelled():
                continue  # its record is committed all the same, as a finished append's is
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
