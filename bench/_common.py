"""Shared pieces of the benches: boot log, software hosts, a served HGS, tables, process CPU.

The boot log is the test fixture's golden boot (``tests/test_attestation_fixtures.Boot``)
reshaped so that *both* guardfab and Keylime's verifier (tpm2_eventlog + its
"example" measured-boot policy) can read it: real UEFI structures where the
fixture has placeholders (EFI_SIGNATURE_LISTs in PK/KEK/db/dbx, UEFI_IMAGE_LOAD_EVENTs
with file device paths), an S-CRTM version, shim's MokList/MokListX in PCR 14
and GRUB's kernel command line in PCR 8. 100 events, SHA-1 and SHA-256 banks.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# ruff: noqa: E402 (the software EK/AK live in tests/, importable only after the path is set)
from etcd_harness import MAX_TXN_OPS as ETCD_MAX_TXN_OPS
from etcd_harness import EtcdCluster
from guardfab.attestation.baseline import baseline_from_log
from guardfab.attestation.trust import CiPolicy, TrustState
from guardfab.hgs import registry as reg
from guardfab.hgs.state import HgsState
from guardfab.softhost.boot import CI_POLICY_FILE, Boot
from guardfab.softhost.eventlog import (
    EFI_GLOBAL,
    EFI_SECURITY_DB,
    EV_EFI_PLATFORM_FIRMWARE_BLOB,
    EV_EFI_VARIABLE_BOOT,
    EV_EFI_VARIABLE_DRIVER_CONFIG,
    EV_IPL,
    EV_SEPARATOR,
    SHA1,
    SHA256,
    Ev,
    variable,
)
from guardfab.store.base import Store
from guardfab.store.etcd import EtcdStore
from guardfab.store.sqlite import SqliteStore
from test_attestation_fixtures import SoftHost
from test_tpm_quote import SoftAk, soft_ak

EV_S_CRTM_VERSION = 0x08
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EFI_CERT_X509 = uuid.UUID("a5c059a1-94e4-4aa7-87b5-ab155c2bf072").bytes_le
EFI_CERT_SHA256 = uuid.UUID("c1c41626-504c-4092-aca9-41f936934328").bytes_le
OWNER = uuid.UUID("77fa9abd-0359-4d32-bd60-28f4e78f784b").bytes_le
#: PCRs the bench quotes: the boot PCRs and shim's PCR 14 (Keylime's example policy needs it).
QUOTED_PCRS = (*range(10), 14)
#: Events in the bench log (the issue's "100-event log").
BENCH_EVENTS = 100
CI_POLICY = CiPolicy("ima-appraise-bench", hashlib.sha256(CI_POLICY_FILE).digest())


def _digests(content: bytes) -> dict[int, bytes]:
    return {SHA1: hashlib.sha1(content).digest(), SHA256: hashlib.sha256(content).digest()}


def signature_list(sig_type: bytes, entries: Sequence[bytes]) -> bytes:
    """EFI_SIGNATURE_LIST of same-size entries, each owned by OWNER."""
    size = 16 + len(entries[0])
    body = b"".join(OWNER + entry for entry in entries)
    return sig_type + struct.pack("<III", 28 + len(body), 0, size) + body


def _fake_cert(name: bytes) -> bytes:
    """DER-shaped placeholder bytes for an X.509 certificate (only hashed and compared)."""
    payload = b"certificate of " + name + bytes(200)
    return b"\x30\x82" + len(payload).to_bytes(2, "big") + payload


def image_load(path: str) -> bytes:
    """UEFI_IMAGE_LOAD_EVENT with a MEDIA_FILEPATH_DP device path."""
    name = path.encode("utf-16-le") + b"\0\0"
    device_path = struct.pack("<BBH", 4, 4, 4 + len(name)) + name + b"\x7f\xff\x04\x00"
    return struct.pack("<QQQQ", 0x7D000000, 0x100000, 0, len(device_path)) + device_path


def _app(path: str) -> Ev:
    return Ev(
        4, EV_EFI_BOOT_SERVICES_APPLICATION, image_load(path), _digests(b"PE " + path.encode())
    )


def _file(pcr: int, path: bytes, content: bytes) -> Ev:
    return Ev(pcr, EV_IPL, path, _digests(content))


def _command(text: bytes) -> Ev:
    """A GRUB command in PCR 8: logged as "grub_cmd: ...\\0", measured without prefix and NUL."""
    return Ev(8, EV_IPL, text + b"\0", _digests(text.split(b": ", 1)[1]))


@dataclass(frozen=True)
class BenchBoot(Boot):
    """The fixture's golden boot with real UEFI structures (see the module docstring)."""

    grub_commands: int = BENCH_EVENTS - 28

    def events(self) -> list[Ev]:
        """S-CRTM and firmware, secure boot policy, separators, shim, GRUB, kernel."""
        x509, sha = EFI_CERT_X509, EFI_CERT_SHA256
        events = [
            Ev(0, EV_S_CRTM_VERSION, "1.0".encode("utf-16-le") + b"\0\0"),
            Ev(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, struct.pack("<QQ", 0x820000, 0xE0000)),
            Ev(0, EV_EFI_PLATFORM_FIRMWARE_BLOB, struct.pack("<QQ", 0x900000, 0xC00000)),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_GLOBAL, "SecureBoot", b"\x01")),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG,
               variable(EFI_GLOBAL, "PK", signature_list(x509, [_fake_cert(b"PK")]))),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG,
               variable(EFI_GLOBAL, "KEK", signature_list(x509, [_fake_cert(b"KEK")]))),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG,
               variable(EFI_SECURITY_DB, "db", signature_list(x509, [_fake_cert(self.db)]))),
            Ev(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable(EFI_SECURITY_DB, "dbx", signature_list(
                sha, [hashlib.sha256(bytes([n])).digest() for n in range(4)]))),
            Ev(1, EV_EFI_VARIABLE_BOOT, variable(EFI_GLOBAL, "BootOrder", self.boot_order)),
        ]  # fmt: skip
        events += [Ev(pcr, EV_SEPARATOR, bytes(4)) for pcr in range(8)]
        events += [
            Ev(7, EV_EFI_VARIABLE_AUTHORITY,
               variable(EFI_SECURITY_DB, "db", OWNER + _fake_cert(self.db))),
            _app("\\EFI\\debian\\shimx64.efi"),
            Ev(14, EV_IPL, b"MokList\0", _digests(b"mok list")),
            Ev(14, EV_IPL, b"MokListX\0", _digests(b"mok list x")),
            _app("\\EFI\\debian\\grubx64.efi"),
            _file(9, b"(hd0,gpt2)/boot/grub/grub.cfg\0", b"set timeout=0\n"),
            _file(9, b"(hd0,gpt2)/boot/grub/ima-policy\0", CI_POLICY_FILE),
        ]  # fmt: skip
        events += [
            _command(f"grub_cmd: set option_{n}=value_{n}".encode())
            for n in range(self.grub_commands)
        ]
        events += [
            _command(b"kernel_cmdline: /boot/vmlinuz-6.12 root=/dev/vda2 ro quiet"),
            _file(9, b"(hd0,gpt2)/boot/vmlinuz-6.12\0", b"kernel image 6.12"),
            _file(9, b"(hd0,gpt2)/boot/initrd.img-6.12\0", b"initrd 6.12"),
            _app("\\vmlinuz-6.12"),
        ]
        return events


@dataclass(frozen=True)
class BenchHost(SoftHost):
    """A software host whose AK is RSA-2048 (RSASSA) or ECC P-256 (ECDSA)."""

    ak_kind: str = "ecc"

    @property
    def ak(self) -> SoftAk:
        return soft_ak(self.ak_kind, index=self.index)


def bench_trust(hosts: Iterable[SoftHost], log: bytes, **changes: object) -> TrustState:
    """Trust registering and binding ``hosts``, a baseline made from ``log``, the CI policy."""
    hosts = tuple(hosts)
    return TrustState(
        tpm_hosts=tuple(h.registration() for h in hosts),
        ak_bindings=tuple(h.binding() for h in hosts),
        baselines=(baseline_from_log("bench-boot", log),),
        ci_policies=(CI_POLICY,),
        **changes,  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------ measuring


def timed_rate(call: Callable[[], object], seconds: float, *, min_calls: int = 3) -> float:
    """Calls per second of ``call`` run back to back for about ``seconds``."""
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while calls < min_calls or time.perf_counter() < deadline:
        call()
        calls += 1
    return calls / (time.perf_counter() - start)


def best_rate(call: Callable[[], object], seconds: float, repeat: int) -> float:
    """The best of ``repeat`` timed runs (noise on a shared machine only slows a run down)."""
    call()  # warm caches and lazy imports
    return max(timed_rate(call, seconds / repeat) for _ in range(repeat))


def interleaved_best_rates(
    calls: Mapping[str, Callable[[], object]], seconds: float, rounds: int
) -> dict[str, float]:
    """The best rate of each call over ``rounds`` rounds in which the calls take turns.

    Each call gets about ``seconds`` in all. Taking turns exposes every call to
    the same spells of load from other processes, so the ratios of the rates
    hold on a shared machine far better than timing one call after another.
    """
    for call in calls.values():
        call()  # warm caches and lazy imports
    best = dict.fromkeys(calls, 0.0)
    for _ in range(rounds):
        for name, call in calls.items():
            best[name] = max(best[name], timed_rate(call, seconds / rounds))
    return best


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (from /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its waited-for children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (through /proc/<pid>/task/*/children)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


# ------------------------------------------------------- a served HGS, a tiny HTTPS client


class Hgs:
    """A guardfab HGS in a temporary directory, served on a free loopback port."""

    def __init__(self, workers: int, *, etcd_members: int = 0) -> None:
        """``etcd_members``: keep the state in a local etcd cluster of that size (0: SQLite)."""
        self.dir = Path(tempfile.mkdtemp(prefix="guardfab-hgs-bench-")) / "hgs"
        self.workers = workers
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.etcd: EtcdCluster | None = None
        if etcd_members:
            self.etcd = EtcdCluster(self.dir.parent / "etcd", etcd_members)

    @property
    def store_name(self) -> str:
        if self.etcd is None:
            return "SQLite store"
        return f"etcd store, {len(self.etcd.members)} member(s) on 127.0.0.1, counted as the HGS's"

    def init(self, puts: list[tuple[str, Any]], *, nonce_ttl: int | None = None) -> None:
        """``guardfab hgs init`` (nonces living ``nonce_ttl`` s if given), then trusted state."""
        cli = [sys.executable, "-m", "guardfab", "hgs", "init", "--dir", str(self.dir)]
        cli += ["--name", "bench-hgs"]
        if self.etcd is not None:
            self.etcd.start()
            for endpoint in self.etcd.endpoints:
                cli += ["--store-etcd", endpoint]
            cli += ["--store-etcd-max-txn-ops", str(ETCD_MAX_TXN_OPS)]
        subprocess.run(cli, check=True, capture_output=True)
        if nonce_ttl is not None:
            config_path = self.dir / "hgs.json"
            config = json.loads(config_path.read_text())
            config["nonce_ttl"] = nonce_ttl
            config_path.write_text(json.dumps(config, indent=2))
        store = self._open_store()
        try:
            reg.Registry.trust_txn(puts).commit(store)
        finally:
            store.close()

    def _open_store(self) -> Store:
        state = HgsState(self.dir)
        if self.etcd is None:
            return SqliteStore(state.store_path())
        settings = state.etcd_settings()
        return EtcdStore(
            list(settings.endpoints), prefix=settings.prefix, max_txn_ops=ETCD_MAX_TXN_OPS
        )

    def start(self) -> None:
        """Serve, in a session of its own (stopped as one group), until /healthz answers."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        command = [sys.executable, "-m", "guardfab", "hgs", "serve", "--dir", str(self.dir)]
        command += ["--listen", f"127.0.0.1:{self.port}", "--workers", str(self.workers)]
        self.process = subprocess.Popen(command, start_new_session=True, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"the HGS exited at start: {err[-1500:]}")
            if len(self.pids()) > self.workers and _answers(self.port, self.ca):
                return
            time.sleep(0.2)
        raise RuntimeError("the HGS did not answer /healthz within 30 s")

    @property
    def ca(self) -> Path:
        return self.dir / "tls" / "ca.pem"

    def pids(self) -> list[int]:
        """The serve process and its uvicorn workers."""
        if self.process is None or self.process.poll() is not None:
            return []
        store = [] if self.etcd is None else [m.process.pid for m in self.etcd.members if m.process]
        return [self.process.pid, *descendants(self.process.pid), *store]

    def cpu(self) -> dict[int, float]:
        """CPU seconds used so far by each process of the HGS (serve process, workers)."""
        used = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                used[pid] = cpu_seconds(pid)
        return used

    def workers_pids(self) -> list[int]:
        """The uvicorn worker processes (multiprocessing spawn children)."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    def used_since(self, before: dict[int, float]) -> tuple[float, str]:
        """CPU seconds since ``before``, and each worker's share of the workers' CPU."""
        after = self.cpu()
        used = {pid: after[pid] - before.get(pid, 0.0) for pid in after}
        workers = [used.get(pid, 0.0) for pid in self.workers_pids()]
        total = sum(workers) or 1.0
        split = "/".join(f"{100 * w / total:.0f}" for w in sorted(workers, reverse=True))
        return sum(used.values()), split + "%"

    def stop(self) -> None:
        """SIGINT to the whole session, SIGKILL if it lingers; remove the directory."""
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self.etcd is not None:
            self.etcd.stop()
        shutil.rmtree(self.dir.parent, ignore_errors=True)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # the session this bench started (start_new_session)


def _answers(port: int, ca: Path) -> bool:
    try:
        status, _ = asyncio.run(_one_get(port, ca, "/healthz"))
    except OSError:
        return False
    return status == 200


async def _one_get(port: int, ca: Path, path: str) -> tuple[int, bytes]:
    conn = await Connection.open(port, ssl.create_default_context(cafile=str(ca)))
    try:
        return await conn.request("GET", path)
    finally:
        conn.close()


_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")


class _Responses(asyncio.Protocol):
    """Reads Content-Length framed responses, one awaited at a time.

    A protocol, not asyncio streams: the generator shares the HGS's two cores,
    and the streams' reader and writer layers cost it CPU on every request.
    """

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's SSL transport is not an asyncio.Transport
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._deliver()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = ConnectionError(f"connection closed by the server ({exc})")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def _deliver(self) -> None:
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[: end + 2])
        match = _CONTENT_LENGTH.search(head)
        if match is None:
            waiter.set_exception(ConnectionError("response without Content-Length"))
            return
        total = end + 4 + int(match.group(1))
        if len(self.buffer) < total:
            return
        body = bytes(self.buffer[end + 4 : total])
        del self.buffer[:total]
        waiter.set_result((int(head[9:12]), body))


class Connection:
    """One keep-alive HTTPS connection speaking just enough HTTP/1.1."""

    def __init__(self, protocol: _Responses) -> None:
        self.protocol = protocol

    @classmethod
    async def open(cls, port: int, context: ssl.SSLContext) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(
            _Responses, "127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"
        )
        return cls(protocol)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request, read one response (Content-Length framed)."""
        protocol = self.protocol
        if protocol.lost is not None or protocol.transport is None:
            raise ConnectionError("connection closed")
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if method == "POST":
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        protocol.waiter = asyncio.get_running_loop().create_future()
        protocol.transport.write(head.encode() + b"\r\n" + body)
        return await protocol.waiter

    def close(self) -> None:
        if self.protocol.transport is not None:
            self.protocol.transport.close()


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (tmpfs makes commits cheaper than disk)."""
    best, kind = "", "unknown filesystem"
    for line in Path("/proc/mounts").read_text().splitlines():
        _dev, mount, fstype, *_ = line.split()
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, fstype
    return kind


# ------------------------------------------------------------------ tools and output


def ensure_debian_tools(wanted: dict[str, str], notes: list[str]) -> list[str]:
    """Install Debian packages for missing tools (benchmarks only); return what is still missing.

    ``wanted`` maps a check (an executable name, or a path to a library/file) to
    its package. Every install is recorded in ``notes`` for the output.
    """
    missing = {pkg for check, pkg in wanted.items() if not _present(check)}
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        packages = sorted(missing)
        notes.append(f"installed Debian package(s) {', '.join(packages)} for this bench only")
        run = subprocess.run(
            ["apt-get", "install", "-y", "-qq", *packages],
            capture_output=True,
            text=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            check=False,
        )
        if run.returncode != 0:
            notes.append(f"apt-get install failed: {run.stderr.strip()[-300:]}")
    return sorted({pkg for check, pkg in wanted.items() if not _present(check)})


def _present(check: str) -> bool:
    if check.startswith("/"):
        return Path(check).exists()
    if check.endswith(".so") or ".so." in check:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False)
        return check in out.stdout
    return shutil.which(check) is not None


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, numeric: bool = True) -> str:
    """A plain text table: first column left-aligned, the others right-aligned if ``numeric``."""
    rows = [list(r) for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = []
    for n, row in enumerate([list(headers), *rows]):
        cells = [
            str(c).rjust(w) if i and numeric else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> str:
    """Date, CPU model, cores and Python: what the numbers were measured on."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    today = datetime.date.today().isoformat()
    return f"{today}, {model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"
