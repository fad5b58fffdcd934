"""Leader/follower group commit: concurrent callers share one store transaction.

The HGS answers attestations on a thread pool, and every answer appends to the
one audit chain. Done one by one, each append is a store round trip plus a race
on the chain head; on etcd that is a Raft commit per record. Here the first
caller to arrive becomes the leader and commits its own request together with
everything queued behind it, in one transaction; the others wait for their
share of the result. Nobody waits for a timer: a lone caller commits at once,
and batches only form while a commit is already in flight.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast

from guardfab.store.errors import StoreError

_R = TypeVar("_R")


class Pending(Generic[_R]):
    """One caller's request, resolved by whichever thread commits it."""

    def __init__(self) -> None:
        self.done = False
        self._result: _R | None = None
        self._error: BaseException | None = None

    def resolve(self, result: _R) -> None:
        """Record success."""
        self._result, self.done = result, True

    def fail(self, error: BaseException) -> None:
        """Record failure; the caller's thread raises ``error``."""
        self._error, self.done = error, True

    def outcome(self) -> _R:
        """Return the result or raise the error (only once ``done``)."""
        if self._error is not None:
            raise self._error
        return cast("_R", self._result)


_P = TypeVar("_P", bound="Pending[Any]")


class GroupCommit(Generic[_P]):
    """Runs ``commit`` over batches that ``select`` takes from the queue.

    Args:
        select: Removes and returns the next batch from the queue (never empty
            for a non-empty queue). Runs under the queue lock: keep it cheap.
        commit: Resolves or fails every item of a batch. It may leave items
            unresolved only by raising; they then fail with that error.
    """

    def __init__(
        self,
        select: Callable[[deque[_P]], list[_P]],
        commit: Callable[[list[_P]], None],
    ) -> None:
        self._select = select
        self._commit = commit
        self._cond = threading.Condition()
        self._queue: deque[_P] = deque()
        self._leading = False

    def submit(self, item: _P) -> None:
        """Queue ``item`` and return once it is resolved, leading commits if needed."""
        self.submit_many([item])

    def submit_many(self, items: list[_P]) -> None:
        """Queue ``items`` together and return once every one is resolved.

        Queued at once, they can share the first commit's transaction: a single
        thread gets the batching that concurrent callers get from each other.
        """
        with self._cond:
            self._queue.extend(items)
        for item in items:
            self._wait_or_lead(item)

    def _wait_or_lead(self, item: _P) -> None:
        """Return once ``item`` is resolved, leading commits while nobody else does."""
        while True:
            with self._cond:
                while self._leading and not item.done:
                    self._cond.wait()
                if item.done:
                    return
                self._leading = True
                batch = self._select(self._queue)
            try:
                self._run(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()

    def _run(self, batch: list[_P]) -> None:
        try:
            self._commit(batch)
        except Exception as exc:  # noqa: BLE001 -- handed to every waiting caller
            for item in batch:
                if not item.done:
                    item.fail(exc)
        except BaseException:
            for item in batch:
                if not item.done:
                    item.fail(StoreError("the audit commit was interrupted; outcome unknown"))
            raise
        for item in batch:
            if not item.done:
                item.fail(StoreError("the audit commit left a request unanswered"))
