"""A writer's turn at a SQLite file, handed over at once instead of after a sleep.

SQLite serializes writers with its own lock, and a writer that finds it taken
waits in SQLite's busy handler, which sleeps 1, 2, 5, 10 ... ms between tries.
An HGS transaction holds the lock for a fraction of a millisecond, so with two
worker processes writing a few hundred times a second each, a writer often
slept a whole millisecond for a lock that was free after 0.2: profiled under
host-key load, a worker's event loop spent 27 % of its time in ``BEGIN
IMMEDIATE`` while a third of the machine stood idle.

The gate queues writers before SQLite sees them: threads of one process on a
:class:`threading.Lock` (woken as soon as it is released), processes on an
``flock`` of a lock file beside the database, tried again after a short sleep
that starts at 50 us. SQLite's lock stays the authority (a writer that does
not use the gate is still serialized, by the busy handler); the gate only
makes the common case prompt. A process that dies holding the ``flock`` loses
it with its file descriptor, and a writer that cannot get its turn within the
store's busy timeout fails with a :class:`StoreError`, as it would in SQLite.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from guardfab.store.errors import StoreError

#: The first and the longest sleep between two tries of the file lock.
_FIRST_SLEEP = 50e-6
_LONGEST_SLEEP = 1e-3


class WriteGate:
    """Serializes the writers of one database file across threads and processes."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self._timeout = timeout
        self._thread_lock = threading.Lock()
        self._fd: int | None = None
        self._pid = -1

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the gate for one write transaction.

        Raises:
            StoreError: another writer kept it longer than the timeout.
        """
        deadline = time.monotonic() + self._timeout
        if self._pid != -1 and self._pid != os.getpid():
            self._forked()
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise self._timed_out()
        try:
            fd = self._file()
            self._lock_file(fd, deadline)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    def _forked(self) -> None:
        """In a forked child: a fresh thread lock (another thread may have held the
        parent's at the fork, and it never runs here) and a descriptor of its own (an
        inherited one shares the parent's ``flock``, so it would not exclude it)."""
        self._thread_lock = threading.Lock()
        if self._fd is not None:
            os.close(self._fd)  # the parent's lock is untouched: it unlocks with LOCK_UN
        self._fd = None
        self._pid = -1

    def _file(self) -> int:
        """This process's descriptor of the lock file (reopened after a fork)."""
        if self._fd is None or self._pid != os.getpid():
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                self._fd = os.open(self.path, flags, 0o600)
            except OSError as exc:
                raise StoreError(f"cannot open the write lock {self.path}: {exc.strerror}") from exc
            self._pid = os.getpid()
        return self._fd

    def _lock_file(self, fd: int, deadline: float) -> None:
        pause = _FIRST_SLEEP
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StoreError(f"cannot lock {self.path}: {exc.strerror}") from exc
            if time.monotonic() >= deadline:
                raise self._timed_out()
            time.sleep(pause)
            pause = min(pause * 2, _LONGEST_SLEEP)

    def _timed_out(self) -> StoreError:
        return StoreError(
            f"store write lock {self.path}: another writer held it for over {self._timeout:g} s",
            hint="look for a stuck guardfab process writing to this store",
        )

    def close(self) -> None:
        """Close this process's descriptor (a later turn reopens it)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None
