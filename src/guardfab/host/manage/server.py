"""The management API served by uvicorn over HTTPS in a thread of the agent.

The listening socket is bound before the thread starts, so a port in use fails
``start`` with a clear error and port 0 (tests) is known at once. uvicorn
installs no signal handlers outside the main thread: the agent's own handlers
stop everything, this server included (:meth:`ManagementServer.stop`).
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from guardfab.access.serving import UVICORN_SETTINGS
from guardfab.errors import UsageError
from guardfab.host.config import check_listen
from guardfab.host.manage.material import ManagementFiles

START_TIMEOUT = 10.0


class ManagementServer:
    """uvicorn serving ``app`` on ``listen`` with the TLS material of ``files``."""

    def __init__(self, app: FastAPI, listen: str, files: ManagementFiles) -> None:
        self._host, self._port = check_listen(listen)
        self._config = uvicorn.Config(
            app,
            ssl_certfile=str(files.server_cert),
            ssl_keyfile=str(files.server_key),
            **UVICORN_SETTINGS,
            lifespan="off",
            loop="asyncio",
            http="h11",
        )
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> ManagementServer:
        """Bind, then serve in a background thread; returns once it accepts connections.

        Raises:
            UsageError: the address cannot be bound, or the server did not come up.
        """
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            self._socket = socket.create_server((self._host, self._port), family=family)
        except OSError as exc:
            raise UsageError(
                f"the management API cannot listen on {self._host}:{self._port} ({exc.strerror})",
                hint="choose another 'manage_listen' in the host configuration",
            ) from exc
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="manage-api"
        )
        self._thread.daemon = True
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise UsageError("the management API did not start (see the agent's log)")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        """The bound port (the system's choice when configured as 0)."""
        if self._socket is None:
            raise UsageError("the management API is not listening")
        port: int = self._socket.getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """The API's base URL on this machine."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._host, self._host)  # noqa: S104
        return f"https://{f'[{host}]' if ':' in host else host}:{self.port}"

    def stop(self) -> None:
        """Stop serving (requests in progress get a short grace period) and close the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
