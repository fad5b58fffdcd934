"""The agent's local API: a Unix socket through which the hypervisor layer asks for VM keys.

Who may connect is decided twice, so that one mistake does not open it:

1. the file system: the socket is 0600 in a 0700 directory owned by the agent's
   user (root), so another user cannot even connect;
2. the kernel's word on the peer (``SO_PEERCRED``): a connection whose process
   does not run as ``allowed_uid`` (root by default) is refused before a byte of
   its request is read.

Protocol: one JSON object per connection, one line each way, at most
:data:`MAX_MESSAGE_BYTES`. Requests::

    {"op": "status"}
    {"op": "attest", "use_fallback": false}
    {"op": "release", "kp": "<base64url of the VM's key protector>"}

Answers are ``{"ok": true, ...}`` or ``{"ok": false, "error": {"type", "message",
"hint"}}``. A release answers ``old_transport_key``, ``new_transport_key`` and
``egress_kp`` (base64url). They exist only in this process's memory and on the
socket: never in a file, a log line or an error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import stat
import struct
import threading
from pathlib import Path
from typing import Any, Protocol

from guardfab.errors import (
    FormatError,
    GuardfabError,
    NotAuthorizedError,
    TransportError,
    UsageError,
)
from guardfab.formats.encoding import b64url_decode, b64url_encode, require_dict
from guardfab.formats.key_protector import TransportKey
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.host.status import AgentStatus

logger = logging.getLogger(__name__)

#: A KP is a few KB (one JWE recipient per guardian); the answer holds one more.
MAX_MESSAGE_BYTES = 1024 * 1024
#: A client that does not send its request in this time is dropped.
REQUEST_TIMEOUT = 10.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AgentUnavailableError(TransportError):
    """The agent's socket does not exist or nobody answers on it."""

    hint = "start the agent ('systemctl start guardfab-host-agent' or 'guardfab host agent')"


class AgentRequestError(GuardfabError):
    """The agent answered a request with an error (its type, message and hint)."""

    def __init__(self, error: dict[str, Any]) -> None:
        message = str(error.get("message", "the agent refused the request"))
        super().__init__(message, hint=str(error.get("hint") or ""))
        self.type = str(error.get("type", ""))


class AgentBackend(Protocol):
    """What the socket serves (the :class:`~guardfab.host.agent.GuardedHostAgent`)."""

    def status(self) -> AgentStatus:
        """The current status."""

    def attest_now(self, *, use_fallback: bool = False) -> AgentStatus:
        """Attest now."""

    def release(self, kp: bytes) -> ReleasedKeys:
        """Release a VM's keys."""


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """The (pid, uid, gid) of the process at the other end, as the kernel saw it connect."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(data)
    return pid, uid, gid


def prepare_socket_path(path: Path) -> None:
    """Make the socket's directory (0700, ours) and remove a stale socket.

    Raises:
        UsageError: the directory belongs to another user, or another agent is
            already listening on ``path``.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = directory.stat()
    if info.st_uid != os.geteuid():
        raise UsageError(f"{directory} belongs to uid {info.st_uid}, not to the agent's user")
    directory.chmod(0o700)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise UsageError(f"{path} exists and is not a socket", hint="remove it or choose another")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # a socket left by an agent that died
            return
    raise UsageError(f"another agent is already listening on {path}")


def _read_line(conn: socket.socket) -> bytes:
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_MESSAGE_BYTES:
            raise FormatError(f"request larger than {MAX_MESSAGE_BYTES} bytes")
    return bytes(buffer).split(b"\n", 1)[0]


def _error(exc: GuardfabError) -> dict[str, Any]:
    error = {"type": type(exc).__name__, "message": str(exc), "hint": exc.hint}
    return {"ok": False, "error": error}


class _Handler(socketserver.BaseRequestHandler):
    server: LocalApiServer

    def handle(self) -> None:
        conn: socket.socket = self.request
        conn.settimeout(REQUEST_TIMEOUT)
        pid, uid, _ = peer_credentials(conn)
        if uid != self.server.allowed_uid:
            logger.warning("refused a local API connection from uid %d (pid %d)", uid, pid)
            refusal = NotAuthorizedError(f"uid {uid} may not use the guarded-host agent")
            self._send(conn, _error(refusal))
            return
        try:
            request = json.loads(_read_line(conn).decode("utf-8"))
            answer = self.server.dispatch(require_dict(request, what="request"))
        except (ValueError, OSError) as exc:
            answer = _error(FormatError(f"unreadable request ({type(exc).__name__})"))
        except GuardfabError as exc:
            answer = _error(exc)
        self._send(conn, answer)

    @staticmethod
    def _send(conn: socket.socket, answer: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the client went away
            conn.sendall(json.dumps(answer).encode("utf-8") + b"\n")


class LocalApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """The agent's socket server (one thread per connection)."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, path: Path, backend: AgentBackend, *, allowed_uid: int = 0) -> None:
        self.path = Path(path)
        self.backend = backend
        self.allowed_uid = allowed_uid
        prepare_socket_path(self.path)
        old_umask = os.umask(0o177)  # the socket is born 0600, never briefly wider
        try:
            super().__init__(str(self.path), _Handler)
        finally:
            os.umask(old_umask)
        self.path.chmod(0o600)
        self._thread: threading.Thread | None = None

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request; the answer never holds more than the request asked for."""
        op = request.get("op")
        if op == "status":
            return {"ok": True, "status": self.backend.status().to_dict()}
        if op == "attest":
            use_fallback = request.get("use_fallback", False) is True
            return {
                "ok": True,
                "status": self.backend.attest_now(use_fallback=use_fallback).to_dict(),
            }
        if op == "release":
            kp = request.get("kp")
            if not isinstance(kp, str) or not kp:
                raise FormatError("release: 'kp' must be the key protector in base64url")
            keys = self.backend.release(b64url_decode(kp, what="key protector"))
            return {
                "ok": True,
                "old_transport_key": b64url_encode(keys.old_transport_key.reveal()),
                "new_transport_key": b64url_encode(keys.new_transport_key.reveal()),
                "egress_kp": b64url_encode(keys.egress_kp),
            }
        raise FormatError(f"unknown op {str(op)[:32]!r} (status, attest or release)")

    def start(self) -> LocalApiServer:
        """Serve in a background thread."""
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name="local-api", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and remove the socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class AgentClient:
    """What the hypervisor layer and ``guardfab host`` use to talk to the agent."""

    def __init__(self, path: Path, *, timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the answer.

        Raises:
            AgentUnavailableError: no agent listens on the socket.
            AgentRequestError: the agent answered with an error.
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(self.timeout)
            try:
                conn.connect(str(self.path))
                with contextlib.suppress(BrokenPipeError):  # refused unread: the answer says why
                    conn.sendall(json.dumps(request).encode("utf-8") + b"\n")
                line = _read_line(conn)
            except OSError as exc:
                raise AgentUnavailableError(
                    f"no agent answers on {self.path} ({exc.strerror or type(exc).__name__})"
                ) from exc
        try:
            answer = require_dict(json.loads(line.decode("utf-8")), what="agent answer")
        except (ValueError, FormatError) as exc:
            raise AgentUnavailableError(f"the agent on {self.path} answered garbage") from exc
        if answer.get("ok") is not True:
            raise AgentRequestError(require_dict(answer.get("error"), what="agent error"))
        return answer

    def status(self) -> AgentStatus:
        """The agent's current status."""
        return AgentStatus.from_dict(self.call({"op": "status"})["status"])

    def attest(self, *, use_fallback: bool = False) -> AgentStatus:
        """Make the agent attest now."""
        answer = self.call({"op": "attest", "use_fallback": use_fallback})
        return AgentStatus.from_dict(answer["status"])

    def release(self, kp: bytes) -> ReleasedKeys:
        """Ask the agent for a VM's keys."""
        answer = self.call({"op": "release", "kp": b64url_encode(kp)})
        return ReleasedKeys(
            TransportKey(b64url_decode(answer["old_transport_key"], what="old transport key")),
            TransportKey(b64url_decode(answer["new_transport_key"], what="new transport key")),
            b64url_decode(answer["egress_kp"], what="egress key protector"),
        )
