"""A watch built from "fetch changes since revision R" plus a wake-up signal.

Both local backends keep a bounded history of changes and answer "what changed
at or after revision R under this prefix". :class:`PollingWatch` turns that into
the blocking iterator of :class:`~guardfab.store.base.Watch`. Writers in the same
process wake watchers at once through a :class:`ChangeSignal`; writers in other
processes (SQLite) are seen within one poll interval.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Self

from guardfab.store.base import WatchEvent

#: Fetches the events of whole revisions from a revision on (a bounded batch, in
#: order) and returns them with the revision to fetch from next; raises
#: WatchCompactedError when the asked revision is no longer kept.
FetchEvents = Callable[[int], tuple[Sequence[WatchEvent], int]]


class ChangeSignal:
    """A generation counter that writers bump and watchers wait on."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def bump(self) -> None:
        """Record that something changed and wake every waiter."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def generation(self) -> int:
        """Return the current generation, to wait for a later one."""
        with self._cond:
            return self._generation

    def wait(self, seen: int, timeout: float) -> None:
        """Block until the generation moves past ``seen`` or ``timeout`` passes."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen, timeout)


class PollingWatch:
    """A watch over a backend's change history; see :class:`guardfab.store.base.Watch`."""

    def __init__(
        self,
        fetch: FetchEvents,
        signal: ChangeSignal,
        *,
        start_revision: int,
        poll_interval: float,
    ) -> None:
        self._fetch = fetch
        self._signal = signal
        self._next_revision = start_revision
        self._poll_interval = poll_interval
        self._buffer: deque[WatchEvent] = deque()
        self._cancelled = threading.Event()

    def next_event(self, timeout: float | None = None) -> WatchEvent | None:
        """Return the next event, or ``None`` once ``timeout`` passed or after cancel.

        Raises:
            WatchCompactedError: this watcher fell behind the kept history.
            StoreError: the backend failed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._cancelled.is_set():
            if self._buffer:
                return self._buffer.popleft()
            seen = self._signal.generation()
            if self._refill():
                continue
            wait = self._poll_interval
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return None
            self._signal.wait(seen, wait)
        return None

    def _refill(self) -> bool:
        events, self._next_revision = self._fetch(self._next_revision)
        self._buffer.extend(events)
        return bool(events)

    def cancel(self) -> None:
        """Stop the watch; a blocked iterator ends within one poll interval."""
        self._cancelled.set()
        self._signal.bump()

    def __iter__(self) -> Iterator[WatchEvent]:
        """Yield events until cancelled."""
        while True:
            event = self.next_event()
            if event is None:
                return
            yield event

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()
