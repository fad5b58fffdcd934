"""Real etcd servers for tests: single members and 3-member clusters on 127.0.0.1.

Each member gets free client and peer ports and a data directory under the test's
temporary directory, is waited for until ``/health`` says so, and is stopped at
teardown. It also dies with the test process (PR_SET_PDEATHSIG), so a crashed or
killed pytest leaves no etcd behind. A missing ``etcd`` binary fails the test with
what to do; it never skips.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from guardfab.hypervisor.procs import child_setup
from guardfab.store.etcd import EtcdStore
from guardfab.store.etcd_codec import b64

START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
#: The harness runs etcd so that every transaction the interface accepts fits.
MAX_TXN_OPS = 512
_prefixes = itertools.count()


def etcd_binary() -> str:
    """Return the etcd executable, or fail the test saying how to install it."""
    path = shutil.which("etcd")
    if path is None:
        pytest.fail("etcd is not installed: run scripts/setup.sh --dev (Debian's etcd-server)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class TlsFiles:
    """Server (and optional client) certificate files for an https member."""

    ca: Path
    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass
class EtcdMember:
    """One etcd process."""

    name: str
    workdir: Path
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    tls: TlsFiles | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def argv(self, initial_cluster: str) -> list[str]:
        argv = [
            etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.workdir / f"{self.name}.etcd"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-state", "new",
            "--max-txn-ops", str(MAX_TXN_OPS),
            "--logger", "zap",
        ]  # fmt: skip
        if self.tls is not None:
            argv += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
            if self.tls.client_ca is not None:
                argv += ["--client-cert-auth", "--trusted-ca-file", str(self.tls.client_ca)]
        return argv

    def start(self, initial_cluster: str) -> None:
        with (self.workdir / f"{self.name}.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(initial_cluster),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=child_setup(die_with_parent=True),  # noqa: PLW1509 - tests, no locks taken
            )

    def kill(self) -> None:
        """Kill the member at once (SIGKILL), as a crash would."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """A set of members started together; stop() stops them all."""

    def __init__(self, workdir: Path, size: int = 1, *, tls: TlsFiles | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.members = [EtcdMember(f"m{i}", workdir, tls=tls) for i in range(size)]
        self._client_tls = tls

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self) -> EtcdCluster:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for member in self.members:
            member.start(initial)
        try:
            for member in self.members:
                self._wait_healthy(member)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self, member: EtcdMember) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        verify = self.client_verify()
        while time.monotonic() < deadline:
            if not member.running:
                raise RuntimeError(f"etcd {member.name} exited; see {member.workdir}")
            with contextlib.suppress(httpx.HTTPError):
                answer = httpx.get(member.endpoint + "/health", timeout=1, verify=verify)
                if answer.status_code == 200 and answer.json().get("health") == "true":
                    return
            time.sleep(0.05)
        raise RuntimeError(f"etcd {member.name} did not become healthy in {START_TIMEOUT} s")

    def client_verify(self) -> ssl.SSLContext | bool:
        """What the harness's own HTTP calls verify the members with."""
        tls = self._client_tls
        if tls is None:
            return False
        context = ssl.create_default_context(cafile=str(tls.ca))
        if tls.client_ca is not None:  # the server pair doubles as a client pair
            context.load_cert_chain(str(tls.cert), str(tls.key))
        return context

    def leader(self) -> EtcdMember:
        """Return the member that is Raft leader now, from the status endpoint."""
        for member in self.members:
            if not member.running:
                continue
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.post(member.endpoint + "/v3/maintenance/status", json={}, timeout=2)
                leader = int(status.json()["leader"])
                member_id = int(status.json()["header"]["member_id"])
                if leader == member_id:
                    return member
        raise RuntimeError("no etcd member says it is the leader")

    def compact(self, revision: int, *, via: EtcdMember | None = None) -> None:
        """Drop history before ``revision`` (etcd compaction), asking ``via`` or a live member."""
        member = via or next(m for m in self.members if m.running)
        answer = httpx.post(
            member.endpoint + "/v3/kv/compaction", json={"revision": revision}, timeout=5
        )
        answer.raise_for_status()

    def wipe(self, prefix: str) -> None:
        """Delete every key under ``prefix`` (so its leases expire on nothing)."""
        member = next(m for m in self.members if m.running)
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        body = {"key": b64(prefix.encode()), "range_end": b64(end.encode())}
        httpx.post(member.endpoint + "/v3/kv/deleterange", json=body, timeout=5)

    def stop(self) -> None:
        for member in self.members:
            member.stop()


def new_prefix() -> str:
    """A key prefix no other test in this session uses."""
    return f"test/{time.monotonic_ns()}/{next(_prefixes)}/"


@pytest.fixture(scope="session", name="etcd_server")
def etcd_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One single-member etcd for the session; tests isolate themselves by key prefix.

    Test modules import ``etcd_server_fixture`` (and ``etcd_stores_fixture``) and
    ask for ``etcd_server`` (``etcd_stores``) by name.
    """
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(name="etcd_stores")
def etcd_stores_fixture(etcd_server: EtcdCluster) -> Iterator[StoreOpener]:
    """Open EtcdStores under a fresh prefix; close them and wipe the prefix afterwards."""
    opener = StoreOpener(etcd_server, new_prefix())
    yield opener
    opener.close_all()
    etcd_server.wipe(opener.prefix)


class StoreOpener:
    """Opens EtcdStores on one cluster under one prefix."""

    def __init__(self, cluster: EtcdCluster, prefix: str) -> None:
        self.cluster = cluster
        self.prefix = prefix
        self.opened: list[EtcdStore] = []

    def __call__(self, endpoints: Sequence[str] | None = None, **kwargs: object) -> EtcdStore:
        kwargs.setdefault("prefix", self.prefix)
        kwargs.setdefault("max_txn_ops", MAX_TXN_OPS)
        store = EtcdStore(endpoints or self.cluster.endpoints, **kwargs)  # type: ignore[arg-type]
        self.opened.append(store)
        return store

    def close_all(self) -> None:
        for store in self.opened:
            store.close()
