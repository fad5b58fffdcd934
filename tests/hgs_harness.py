"""Start a real HGS (``guardfab hgs serve``) over HTTPS on 127.0.0.1 for a test.

The server is a separate process on a free loopback port; it is always stopped
at teardown.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from guardfab.hgs.state import HgsConfig, init_state


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningHgs:
    """A live HGS: its URL, state directory, tokens and process."""

    url: str
    directory: Path
    tokens: dict[str, str]
    process: subprocess.Popen[bytes]

    @property
    def ca(self) -> str:
        return str(self.directory / "tls" / "ca.pem")

    def client(self, role: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        context = ssl.create_default_context(cafile=self.ca)
        return httpx.Client(base_url=self.url, verify=context, headers=headers, timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_hgs(directory: Path, *, workers: int = 1, init: bool = True) -> RunningHgs:
    """Initialize (unless ``init`` is false) and serve an HGS from ``directory``."""
    tokens: dict[str, str] = {}
    if init:
        tokens = init_state(directory, HgsConfig(service_name="test-hgs"))
    else:
        for role in ("admin", "reviewer"):
            tokens[role] = (directory / "tokens" / f"{role}.token").read_text().strip()
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "guardfab",
        "hgs",
        "serve",
        "--dir",
        str(directory),
        "--listen",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
    ]
    process = subprocess.Popen(command, env=dict(os.environ), stderr=subprocess.PIPE)
    hgs = RunningHgs(f"https://127.0.0.1:{port}", directory, tokens, process)
    _wait_ready(hgs)
    return hgs


def _wait_ready(hgs: RunningHgs, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hgs.process.poll() is not None:
            err = hgs.process.stderr.read().decode() if hgs.process.stderr else ""
            raise RuntimeError(f"HGS exited early: {err[-2000:]}")
        try:
            with hgs.client() as client:
                if client.get("/healthz").status_code == 200:
                    return
        except httpx.TransportError:
            time.sleep(0.1)
    hgs.stop()
    raise RuntimeError("HGS did not become ready")


@pytest.fixture
def running_hgs(tmp_path: Path) -> Iterator[RunningHgs]:
    """A fresh HGS served over HTTPS for one test."""
    hgs = start_hgs(tmp_path / "hgs")
    try:
        yield hgs
    finally:
        hgs.stop()
