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
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from guardfab.store.audit import AppendRequest, AuditLog
from guardfab.store.audit_chain import AuditRecord

#: How an operation commits its record: queued on the loop turn, or at once.
Commit = Callable[[AppendRequest], Awaitable[object]]
_T = TypeVar("_T")


class LoopBatcher:
    """Queues appends on the running loop and commits them together at the end of the turn."""

    def __init__(self, audit: AuditLog) -> None:
        self._audit = audit
        self._queued: list[tuple[AppendRequest, asyncio.Future[AuditRecord]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def append(self, request: AppendRequest) -> AuditRecord:
        """Append ``request``'s record in this turn's batch; raise its error as ``append`` would."""
        loop = asyncio.get_running_loop()
        if self._queued and self._loop is not loop:
            # Left by a loop that stopped before its commit ran: nobody awaits
            # those requests any more, and nothing would ever commit this one.
            self._queued = []
        future: asyncio.Future[AuditRecord] = loop.create_future()
        if not self._queued:
            self._loop = loop
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


def commit_now(audit: AuditLog) -> Commit:
    """A :data:`Commit` that appends at once, raising the request's error (no event loop)."""

    async def commit(request: AppendRequest) -> AuditRecord:
        (result,) = audit.append_many([request])
        if isinstance(result, Exception):
            raise result
        return result

    return commit


def run_now(operation: Coroutine[Any, Any, _T]) -> _T:
    """Run an operation whose every await completes at once (it commits with :func:`commit_now`).

    One decide-and-commit loop then serves both the event loop's path (commits
    queued on a :class:`LoopBatcher`) and the synchronous one, instead of two
    copies that differ only in an ``await``.

    Raises:
        RuntimeError: the operation waited for something (a programming error).
    """
    try:
        operation.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    operation.close()
    raise RuntimeError("a synchronous HGS operation waited for an event loop")
