"""A watch over etcd's streaming ``/v3/watch`` gateway call, resumed across members.

One thread per watch reads the stream and queues events; :meth:`EtcdWatch.next_event`
takes them with a timeout. When the member serving the stream goes away, the
thread opens the watch again on the next member from the revision after the last
event it delivered, so a watcher sees every change once and in order; if that
revision was compacted meanwhile, the watcher gets :class:`WatchCompactedError`
(etcd's ``compact_revision`` is the oldest revision it still has; the error
names the newest one it lost, as the local backends do).
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
from collections.abc import Iterator
from typing import Any, Self

import httpx

from guardfab.store.base import EventKind, WatchEvent, prefix_end
from guardfab.store.errors import StoreError, WatchCompactedError
from guardfab.store.etcd_codec import as_int, b64, decode_value, unb64
from guardfab.store.etcd_gateway import CODE_OUT_OF_RANGE, EtcdGateway, EtcdRequestError

_Item = WatchEvent | Exception | None
#: An open stream: the response (to shut down) and its iterator of results.
_Stream = tuple[httpx.Response, Iterator[dict[str, Any]]]


class _WatchCancelledError(StoreError):
    """etcd ended the watch for a reason other than compaction (it will not resume)."""


def range_end_of(namespace: bytes, prefix: str) -> bytes:
    """Return etcd's ``range_end`` for every key under ``namespace + prefix``."""
    full = (namespace + prefix.encode("ascii")).decode("ascii")
    end = prefix_end(full)
    return b"\x00" if end is None else end.encode("ascii")


class EtcdWatch:
    """A running etcd watch; see :class:`guardfab.store.base.Watch`."""

    def __init__(
        self, gateway: EtcdGateway, namespace: bytes, prefix: str, start_revision: int | None
    ) -> None:
        self._gateway = gateway
        self._namespace = namespace
        self._prefix = prefix
        self._queue: queue.Queue[_Item] = queue.Queue()
        self._cancelled = threading.Event()
        self._failure: Exception | None = None
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        if start_revision is not None:
            self._refuse_if_compacted(start_revision)
        self._stream, self._next_revision = self._open(start_revision)
        self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)
        self._thread.start()

    # --- the consumer side ---------------------------------------------------

    def next_event(self, timeout: float | None = None) -> WatchEvent | None:
        """Return the next event, or ``None`` on timeout or after cancel.

        Raises:
            WatchCompactedError: the watch had to resume from a compacted revision.
            StoreError: no member could serve the watch any more.
        """
        if self._failure is not None:
            raise self._failure
        if self._cancelled.is_set():
            return None
        try:
            item = self._queue.get(timeout=timeout) if timeout != 0 else self._queue.get_nowait()
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            self._failure = item
            raise item
        return item

    def cancel(self) -> None:
        """Stop the watch; a blocked iterator ends at once."""
        self._cancelled.set()
        self._queue.put(None)
        with self._lock:
            stream = self._stream
        if stream is not None:
            _shut_down(stream[0])

    def __iter__(self) -> Iterator[WatchEvent]:
        """Yield events until cancelled."""
        while (event := self.next_event()) is not None:
            yield event

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()

    # --- the stream ----------------------------------------------------------

    def _refuse_if_compacted(self, start_revision: int) -> None:
        """Raise WatchCompactedError now, as the local backends do, if history is gone."""
        body = {
            "key": b64(self._namespace or b"\x00"),
            "revision": start_revision,
            "count_only": True,
            "serializable": True,  # the member's own view: answers without a leader
        }
        try:
            self._gateway.call("/v3/kv/range", body, what="a history check", idempotent=True)
        except EtcdRequestError as exc:
            if exc.code != CODE_OUT_OF_RANGE:
                raise
            if "compacted" not in exc.etcd_message:
                return  # a future revision: nothing to replay yet
            lost = self._compact_revision(start_revision)
            raise WatchCompactedError(start_revision, lost) from None

    def _compact_revision(self, start_revision: int) -> int:
        """Ask etcd, through a watch it will cancel, which revisions it lost."""
        _endpoint, response = self._gateway.open_stream(
            "/v3/watch", self._create_request(start_revision), what="a watch"
        )
        try:
            for result in _results(response):
                if result.get("canceled"):
                    return as_int(result.get("compact_revision")) - 1
        finally:
            response.close()
        return start_revision

    def _create_request(self, start_revision: int | None) -> dict[str, Any]:
        create: dict[str, Any] = {
            "key": b64(self._namespace + self._prefix.encode("ascii")),
            "range_end": b64(range_end_of(self._namespace, self._prefix)),
        }
        if start_revision is not None:
            create["start_revision"] = start_revision
        return {"create_request": create}

    def _open(self, start_revision: int | None) -> tuple[_Stream, int]:
        """Open the stream and wait for etcd to confirm it; return it and the next revision."""
        endpoint, response = self._gateway.open_stream(
            "/v3/watch", self._create_request(start_revision), what="a watch"
        )
        try:
            results = _results(response)
            first = next(results, None)
            if first is None or not first.get("created"):
                raise StoreError(f"etcd at {endpoint} did not confirm the watch")
            current = as_int(first.get("header", {}).get("revision"))
        except BaseException:
            response.close()
            raise
        next_revision = start_revision if start_revision is not None else current + 1
        return (response, results), next_revision

    def _run(self) -> None:
        while not self._cancelled.is_set():
            with self._lock:
                stream = self._stream
            if stream is None:
                return
            response, results = stream
            try:
                self._pump(results)
            except (WatchCompactedError, _WatchCancelledError) as exc:
                self._queue.put(exc)
                return
            except (httpx.HTTPError, OSError, ValueError, StoreError):
                pass  # the member went away or broke the stream: resume elsewhere
            finally:
                response.close()
            if self._cancelled.is_set():
                return
            self._reopen()

    def _reopen(self) -> None:
        try:
            self._refuse_if_compacted(self._next_revision)
            stream, _ = self._open(self._next_revision)
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer, which raises it
            self._queue.put(exc)
            with self._lock:
                self._stream = None
            return
        with self._lock:
            self._stream = stream
        if self._cancelled.is_set():
            stream[0].close()

    def _pump(self, results: Iterator[dict[str, Any]]) -> None:
        for result in results:
            if result.get("canceled"):
                compact = as_int(result.get("compact_revision"))
                if compact:
                    raise WatchCompactedError(self._next_revision, compact - 1)
                reason = str(result.get("cancel_reason", ""))[:200]
                raise _WatchCancelledError(f"etcd cancelled the watch: {reason}")
            for event in result.get("events") or ():
                self._queue.put(self._event(event))

    def _event(self, event: dict[str, Any]) -> WatchEvent:
        kv = event.get("kv") or {}
        key = unb64(kv.get("key"))[len(self._namespace) :].decode("ascii")
        revision = as_int(kv.get("mod_revision"))
        self._next_revision = revision + 1
        if event.get("type") == "DELETE":
            return WatchEvent(EventKind.DELETE, key, None, revision)
        payload, _expires_at = decode_value(key, unb64(kv.get("value")))
        return WatchEvent(EventKind.PUT, key, payload, revision)


def _results(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Yield the ``result`` objects of a gateway stream; end on an error object."""
    for line in response.iter_lines():
        if not line.strip():
            continue
        message = json.loads(line)
        result = message.get("result") if isinstance(message, dict) else None
        if not isinstance(result, dict):
            return
        yield result


def _shut_down(response: httpx.Response) -> None:
    """Wake a thread blocked reading ``response``: shut its socket down."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
