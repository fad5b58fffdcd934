"""The agent's local API: who may connect, what it answers, what it refuses.

A real Unix socket server and real client processes (one of them running as the
unprivileged user ``nobody``); the agent behind the socket is a fake, since what
is tested here is the socket's own rules.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from guardfab.errors import UsageError
from guardfab.formats.key_protector import TransportKey
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.host.localapi import (
    MAX_MESSAGE_BYTES,
    AgentClient,
    AgentRequestError,
    AgentUnavailableError,
    LocalApiServer,
    prepare_socket_path,
)
from guardfab.host.status import AgentStatus

NOBODY = 65534
OLD, NEW = TransportKey(b"\x01" * 32), TransportKey(b"\x02" * 32)


@dataclass
class FakeBackend:
    calls: list[str] = field(default_factory=list)

    def status(self) -> AgentStatus:
        self.calls.append("status")
        return AgentStatus(mode="tpm", attestation_status="Passed")

    def attest_now(self, *, use_fallback: bool = False) -> AgentStatus:
        self.calls.append(f"attest:{use_fallback}")
        return AgentStatus(mode="tpm", attestation_status="Passed", using_fallback=use_fallback)

    def release(self, kp: bytes) -> ReleasedKeys:
        self.calls.append("release")
        return ReleasedKeys(OLD, NEW, b"egress-of-" + kp)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory other users can traverse (unlike pytest's 0700 tmp_path)."""
    path = Path(tempfile.mkdtemp(prefix="guardfab-localapi-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(world_dir: Path) -> Iterator[tuple[LocalApiServer, FakeBackend]]:
    backend = FakeBackend()
    api = LocalApiServer(world_dir / "run" / "agent.sock", backend).start()
    try:
        yield api, backend
    finally:
        api.close()


def raw(path: Path, data: bytes) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(path))
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    result: dict[str, object] = json.loads(answer)
    return result


def as_nobody(path: Path) -> str:
    """Connect to ``path`` as user nobody and say what happened."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({str(path)!r})\n"
        "except OSError as e:\n"
        "    print('connect-failed', e.errno); sys.exit(0)\n"
        "try:\n"
        "    s.sendall(b'{}\\n')\n"
        "except BrokenPipeError:\n"
        "    pass\n"
        "print(s.recv(65536).decode())\n"
    )
    result = subprocess.run(
        ["/usr/bin/python3", "-c", code],
        user=NOBODY,
        group=NOBODY,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


def test_root_gets_status_attest_and_keys(server: tuple[LocalApiServer, FakeBackend]) -> None:
    api, backend = server
    client = AgentClient(api.path)
    assert client.status().attestation_status == "Passed"
    assert client.attest(use_fallback=True).using_fallback
    keys = client.release(b"the-kp")
    assert (keys.old_transport_key, keys.new_transport_key) == (OLD, NEW)
    assert keys.egress_kp == b"egress-of-the-kp"
    assert repr(keys) == "ReleasedKeys()", "no key in a repr"
    assert backend.calls == ["status", "attest:True", "release"]


def test_socket_is_0600_in_a_0700_directory(server: tuple[LocalApiServer, FakeBackend]) -> None:
    api, _ = server
    assert api.path.stat().st_mode & 0o777 == 0o600
    assert api.path.parent.stat().st_mode & 0o777 == 0o700


def test_another_user_cannot_even_connect(server: tuple[LocalApiServer, FakeBackend]) -> None:
    api, backend = server
    assert as_nobody(api.path).split()[0] == "connect-failed"
    assert backend.calls == []


def test_a_non_root_peer_that_reaches_the_socket_is_refused_by_its_credentials(
    server: tuple[LocalApiServer, FakeBackend],
) -> None:
    api, backend = server
    api.path.parent.chmod(0o755)  # as if the file system layer were misconfigured
    api.path.chmod(0o666)
    answer = json.loads(as_nobody(api.path))
    assert answer["ok"] is False
    assert answer["error"]["type"] == "NotAuthorizedError"
    assert f"uid {NOBODY}" in answer["error"]["message"]
    assert backend.calls == []


def test_a_configured_uid_other_than_the_caller_is_refused(world_dir: Path) -> None:
    backend = FakeBackend()
    api = LocalApiServer(world_dir / "run" / "agent.sock", backend, allowed_uid=12345).start()
    try:
        with pytest.raises(AgentRequestError) as refused:
            AgentClient(api.path).release(b"kp")
    finally:
        api.close()
    assert refused.value.type == "NotAuthorizedError"
    assert "uid 0 may not use" in str(refused.value)
    assert backend.calls == []


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"not json\n", "unreadable request"),
        (b"[1, 2]\n", "expected a JSON object"),
        (b'{"op": "format-disk"}\n', "unknown op"),
        (b'{"op": "release"}\n', "'kp' must be"),
        (b'{"op": "release", "kp": "a+b/"}\n', "not valid base64url"),
        (b'{"op": "status", "pad": "' + b"x" * MAX_MESSAGE_BYTES + b'"}\n', "larger than"),
    ],
)
def test_bad_requests_get_a_clear_error_and_reach_nothing(
    server: tuple[LocalApiServer, FakeBackend], request_bytes: bytes, message: str
) -> None:
    api, backend = server
    answer = raw(api.path, request_bytes)
    assert answer["ok"] is False
    assert message in answer["error"]["message"]  # type: ignore[index]
    assert backend.calls == []


def test_stale_socket_is_replaced_and_a_live_one_is_not(world_dir: Path) -> None:
    path = world_dir / "run" / "agent.sock"
    path.parent.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: an agent that died
    api = LocalApiServer(path, FakeBackend()).start()
    try:
        with pytest.raises(UsageError, match="already listening"):
            LocalApiServer(path, FakeBackend())
    finally:
        api.close()
    assert not path.exists(), "a clean stop removes the socket"
    with pytest.raises(AgentUnavailableError):
        AgentClient(path).status()


def test_a_socket_directory_owned_by_someone_else_is_refused(world_dir: Path) -> None:
    directory = world_dir / "run"
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=f"belongs to uid {NOBODY}"):
        prepare_socket_path(directory / "agent.sock")
    regular = world_dir / "file"
    regular.write_text("x")
    with pytest.raises(UsageError, match="not a socket"):
        prepare_socket_path(regular)
