"""Appends made in one turn of a worker's event loop, committed in one store transaction.

The host-facing routes run on the event loop (a thread hop cost more than the
work, ADR 0016), so the audit log's thread-based group commit never sees two
appends at once there: each attestation paid its own ``BEGIN``/``COMMIT``,
about a third of the store's CPU per attestation. Under load, several requests
become ready in the same loop turn; each one now queues its append here and
awaits it, and a callback scheduled behind them commits the whole turn's queue
with :meth:`AuditLog.append_many`. A lone request waits only for the rest of the
current turn, never for a timer.

On SQLite the commit runs on the loop thread (a thread hop cost more than the
commit). A store whose calls wait on the network (etcd: two round trips of
~1-2 ms per commit, seconds during an election) would hold the whole worker
still meanwhile: no request read, no challenge, no ``/healthz``. For such a store
(``in_thread``) the commit runs on one thread of the batcher's own, and the
requests that reach their commit meanwhile queue for the next one: the loop
stays free and the batches grow with the load. Either way each request keeps
every guarantee of :meth:`AuditLog.append` (its own compares, its own error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from guardfab.store.audit import AppendRequest, AuditLog
from guardfab.store.audit_chain import AuditRecord
from guardfab.store.errors import StoreError

#: How an operation commits its record: queued on the loop turn, or at once.
Commit = Callable[[AppendRequest], Awaitable[object]]
_T = TypeVar("_T")


class LoopBatcher:
    """Queues appends on the running loop and commits them together at the end of the turn.

    Args:
        audit: the audit log to append to.
        in_thread: commit on a thread of its own (one batch at a time, the next
            gathering meanwhile) instead of on the loop: for a store whose calls
            wait on the network.
    """

    def __init__(self, audit: AuditLog, *, in_thread: bool = False) -> None:
        self._audit = audit
        self._queued: list[tuple[AppendRequest, asyncio.Future[AuditRecord]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit-commit")
            if in_thread
            else None
        )
        self._committing = False

    async def append(self, request: AppendRequest) -> AuditRecord:
        """Append ``request``'s record in this turn's batch; raise its error as ``append`` would."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Left by a loop that stopped before its commit ran (or finished): nobody
            # awaits those requests any more, and nothing would ever commit this one.
            self._queued, self._committing = [], False
        future: asyncio.Future[AuditRecord] = loop.create_future()
        if not self._queued and not self._committing:
            self._loop = loop
            loop.call_soon(self._commit)
        self._queued.append((request, future))
        return await future

    def _commit(self) -> None:
        queued, self._queued = self._queued, []
        if not queued:
            return
        requests = [request for request, _ in queued]
        if self._executor is None or self._loop is None:
            _settle(queued, self._results(requests))
            return
        self._committing = True
        loop = self._loop
        done = loop.run_in_executor(self._executor, self._results, requests)
        done.add_done_callback(lambda finished: self._committed(loop, queued, finished))

    def _committed(
        self,
        loop: asyncio.AbstractEventLoop,
        queued: list[tuple[AppendRequest, asyncio.Future[AuditRecord]]],
        done: asyncio.Future[list[AuditRecord | Exception]],
    ) -> None:
        """A threaded commit finished: answer its requests, start the next batch if any."""
        if self._loop is loop:
            self._committing = False
        if done.cancelled():  # the loop is closing: the thread may have committed or not
            unknown = StoreError("the audit commit's outcome is unknown: the worker is stopping")
            results: list[AuditRecord | Exception] = [unknown] * len(queued)
        else:
            results = done.result()
        _settle(queued, results)
        if self._loop is loop and self._queued and not self._committing:
            loop.call_soon(self._commit)

    def _results(self, requests: list[AppendRequest]) -> list[AuditRecord | Exception]:
        try:
            return self._audit.append_many(requests)
        except Exception as exc:  # noqa: BLE001 -- every waiting request gets it
            return [exc] * len(requests)


def _settle(
    queued: list[tuple[AppendRequest, asyncio.Future[AuditRecord]]],
    results: list[AuditRecord | Exception],
) -> None:
    for (_, future), result in zip(queued, results, strict=True):
        if future.cancelled():
            continue  # its record is committed all the same, as a finished append's is
        if isinstance(result, BaseException):
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
