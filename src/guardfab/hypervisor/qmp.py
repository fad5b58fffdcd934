"""A small synchronous QMP client over a Unix socket, with file-descriptor passing.

Why not the official ``qemu.qmp`` package: it is asyncio-first; its synchronous
wrapper (``qemu.qmp.legacy``) is documented as a compatibility shim, installs an
event loop in the calling thread and cannot run inside one that is already
running (the host agent serves HTTP from one), and its ``send_fd_scm`` sends the
descriptor as a separate one-byte message through asyncio's private socket.
The protocol is small -- a greeting, ``qmp_capabilities``, then one JSON object
per line each way -- and this client attaches file descriptors to the very
message of the command that consumes them (``sendmsg`` with SCM_RIGHTS).

Command arguments may hold secrets (a disk passphrase sent to ``object-add``),
so they are never logged or copied into errors: errors name the command only.
"""

from __future__ import annotations

import json
import socket
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardfab.hypervisor.errors import HypervisorError, QmpCommandError

#: The longest single QMP message accepted (QEMU's replies here are a few KiB).
MAX_MESSAGE = 4 * 1024 * 1024
#: Events kept for :meth:`QmpClient.events`; older ones are dropped.
MAX_EVENTS = 256


class QmpClient:
    """One QMP session with one QEMU process. Not thread-safe: one caller at a time."""

    def __init__(self, sock: socket.socket, *, timeout: float = 30.0) -> None:
        """Take over a connected socket and negotiate capabilities.

        Raises:
            HypervisorError: QEMU did not greet or did not accept capabilities negotiation.
        """
        self._sock = sock
        self._sock.settimeout(timeout)
        self._buffer = b""
        self._next_id = 0
        self._events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        greeting = self._read_message()
        if "QMP" not in greeting:
            raise HypervisorError("QEMU's QMP socket did not send a QMP greeting")
        self.version: dict[str, Any] = greeting["QMP"].get("version", {})
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: Path, *, timeout: float = 30.0, wait: float = 10.0) -> QmpClient:
        """Connect to QEMU's QMP socket, waiting up to ``wait`` seconds for it to appear.

        Raises:
            HypervisorError: no QMP socket answered in time.
        """
        deadline = time.monotonic() + wait
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return cls(sock, timeout=timeout)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise HypervisorError(f"no QMP socket answered at {path}") from exc
                time.sleep(0.02)
            except BaseException:
                sock.close()
                raise

    def close(self) -> None:
        """Close the connection (QEMU keeps running)."""
        self._sock.close()

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, fds: Sequence[int] = ()
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        Args:
            command: the QMP command, e.g. ``query-status``.
            arguments: its arguments (may hold secrets: never logged).
            fds: file descriptors to pass with the command (for ``add-fd``, ``getfd``).

        Raises:
            QmpCommandError: QEMU answered with an error.
            HypervisorError: the connection broke or timed out.
        """
        self._next_id += 1
        message: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            message["arguments"] = arguments
        data = json.dumps(message).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self._sock, [data], list(fds))
            else:
                self._sock.sendall(data)
        except OSError as exc:
            raise HypervisorError(f"cannot send {command} to QEMU: {exc.strerror}") from exc
        reply = self._read_reply(self._next_id, command)
        if "error" in reply:
            error = reply["error"]
            raise QmpCommandError(command, str(error.get("class")), str(error.get("desc")))
        return reply.get("return")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The asynchronous events received so far (optionally only ``name``), oldest first."""
        return [event for event in self._events if name is None or event.get("event") == name]

    def _read_reply(self, message_id: int, command: str) -> dict[str, Any]:
        while True:
            message = self._read_message(command)
            if "event" in message:
                self._events.append(message)
            elif message.get("id") == message_id:
                return message

    def _read_message(self, command: str = "the greeting") -> dict[str, Any]:
        while b"\n" not in self._buffer:
            if len(self._buffer) > MAX_MESSAGE:
                raise HypervisorError("QEMU sent an oversized QMP message")
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise HypervisorError(f"QEMU did not answer {command} in time") from exc
            except OSError as exc:
                raise HypervisorError(f"QMP connection failed: {exc.strerror}") from exc
            if not chunk:
                raise HypervisorError(f"QEMU closed its QMP connection (waiting for {command})")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise HypervisorError("QEMU sent a QMP message that is not JSON") from exc
        if not isinstance(message, dict):
            raise HypervisorError("QEMU sent a QMP message that is not an object")
        return message
