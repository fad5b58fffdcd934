"""Test helper (not a test module): guarded hosts and their agents against real HGS processes.

* :class:`FakeClock`: the agent's injected clock. ``advance`` moves time; the
  agent's sleeps return as soon as the fake time passes their deadline, so a
  test reaches a renewal point hours away in milliseconds.
* :class:`FakeKeyReleaser`: an in-memory KPS standing in for
  ``guardfab.host.keyrelease`` where the test is about the agent, not the KPS.
* HGS helpers: an HGS with a short certificate lifetime, a second HGS node on the
  same state directory (two service processes over one SQLite store, which is
  what an HGS cluster is), registration straight into the store.
* :func:`host_config`: a complete host configuration in a temp directory, with
  its keys, for TPM or host-key mode.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guardfab.attestation.baseline import baseline_from_log
from guardfab.attestation.trust import AttestationMode, CiPolicy, HostKey, TpmHost, ek_digest
from guardfab.errors import TransportError
from guardfab.formats import jose
from guardfab.formats.key_protector import TransportKey
from guardfab.hgs import registry as reg
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.host.config import HgsSite, HostConfig, HostMode, RetrySettings
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.host.keys import load_or_create_key
from guardfab.host.tpm import HostTpm
from guardfab.store.audit import AuditLog
from guardfab.store.sqlite import SqliteStore
from hgs_harness import RunningHgs, _wait_ready, start_hgs
from test_attestation_fixtures import CI_POLICY_FILE

# --------------------------------------------------------------------------- clock


class FakeClock:
    """A settable clock whose sleeps end when the fake time reaches their deadline."""

    def __init__(self, start: float) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        deadline = self.now() + seconds
        while self.now() < deadline and not wake.wait(0.005):
            pass


# --------------------------------------------------------------------------- KPS fake


@dataclass
class FakeKeyReleaser:
    """An in-memory KPS: derives keys from the KP and remembers who asked with what."""

    down: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)

    def release(
        self, url: str, ca_file: Path, health_certificate: str, kp: bytes, host_key: Any
    ) -> ReleasedKeys:
        assert ca_file.exists()
        if url in self.down:
            raise TransportError(f"KPS at {url} unreachable (ConnectError)")
        self.calls.append((url, health_certificate))
        old = hashlib.sha256(b"old" + kp).digest()
        new = hashlib.sha256(b"new" + kp + health_certificate.encode()).digest()
        return ReleasedKeys(TransportKey(old), TransportKey(new), b"egress:" + new[:8] + kp)


# --------------------------------------------------------------------------- HGS


def init_hgs(directory: Path, *, lifetime: int = 8 * 3600) -> None:
    """Initialize an HGS state directory with a given certificate lifetime."""
    init_state(directory, HgsConfig(service_name="test-hgs", health_certificate_lifetime=lifetime))


def serve_hgs(directory: Path, port: int | None = None) -> RunningHgs:
    """Another ``guardfab hgs serve`` on an initialized directory (a second node, or a restart)."""
    if port is None:
        return start_hgs(directory, init=False)
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
    ]
    process = subprocess.Popen(command, env=dict(os.environ), stderr=subprocess.PIPE)
    tokens = {r: (directory / "tokens" / f"{r}.token").read_text().strip() for r in ("admin",)}
    hgs = RunningHgs(f"https://127.0.0.1:{port}", directory, tokens, process)
    _wait_ready(hgs)
    return hgs


def port_of(hgs: RunningHgs) -> int:
    return int(hgs.url.rsplit(":", 1)[1])


def register(directory: Path, puts: list[tuple[str, object]]) -> None:
    """Write trusted state into an HGS's store, as the admin API would."""
    store = SqliteStore(HgsState(directory).store_path())
    try:
        reg.Registry.trust_txn(puts).commit(store)
    finally:
        store.close()


def register_tpm_host(directory: Path, name: str, ek_public: bytes, golden_log: bytes) -> None:
    """Register a TPM host by EK, the golden boot as baseline, and the CI policy."""
    host = TpmHost(name, ek_digest(ek_public))
    baseline = baseline_from_log("golden", golden_log)
    ci = CiPolicy("ima-appraise", hashlib.sha256(CI_POLICY_FILE).digest())
    register(
        directory,
        [
            (reg.TPM_HOSTS + host.host_id, host.to_dict()),
            (reg.BASELINES + baseline.name, baseline.to_dict()),
            (reg.CI_POLICIES + ci.digest.hex(), ci.to_dict()),
        ],
    )


def register_host_key(directory: Path, name: str, signing_key: jose.AsymmetricKey) -> None:
    """Enable host-key mode (next to TPM mode) and register a host signing key."""
    key = HostKey(jose.thumbprint(signing_key), name, jose.public_jwk(signing_key))
    register(
        directory,
        [
            (reg.MODES_KEY, [AttestationMode.TPM.value, AttestationMode.HOST_KEY.value]),
            (reg.HOST_KEYS + key.key_id, key.to_dict()),
        ],
    )


def audit_kinds(directory: Path) -> list[tuple[str, str]]:
    """(kind, outcome) of every audit record of the HGS, in order."""
    store = SqliteStore(HgsState(directory).store_path())
    try:
        return [(r.kind, r.outcome) for r in AuditLog(store).iter_records()]
    finally:
        store.close()


def ek_public_of(tcti: str) -> bytes:
    with HostTpm(tcti) as tpm:
        return tpm.read_ek().public


# --------------------------------------------------------------------------- host


def host_config(
    root: Path,
    primary: RunningHgs,
    *,
    fallback: RunningHgs | None = None,
    mode: HostMode = HostMode.TPM,
    tcti: str = "device:/dev/tpmrm0",
    event_log: bytes | None = None,
    **changes: Any,
) -> HostConfig:
    """A configuration under ``root`` with its host keys created (as 'host configure' does)."""
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "binary_bios_measurements"
    if event_log is not None:
        log_path.write_bytes(event_log)
    (root / "keys").mkdir(mode=0o700, exist_ok=True)
    encryption = root / "keys" / "host-encryption.pem"
    load_or_create_key(encryption)
    signing = None
    if mode is HostMode.HOST_KEY:
        signing = root / "keys" / "host-signing.pem"
        load_or_create_key(signing)
    values: dict[str, Any] = {
        "mode": mode,
        "primary": HgsSite(primary.url, primary.url),
        "fallback": None if fallback is None else HgsSite(fallback.url, fallback.url),
        "ca_file": Path(primary.ca),
        "tcti": tcti,
        "event_log": log_path,
        "encryption_key": encryption,
        "signing_key": signing,
        "state_dir": root / "state",
        "socket": root / "run" / "agent.sock",
        "retry": RetrySettings(
            initial_delay=1, max_delay=8, jitter=0.25, failback_after=120, http_timeout=5
        ),
    }
    values.update(changes)
    return HostConfig(**values)


def grep_tree(root: Path, needles: list[bytes]) -> list[Path]:
    """Files under ``root`` that contain any of ``needles``."""
    return [
        path
        for path in sorted(root.rglob("*"))
        if path.is_file() and any(n in path.read_bytes() for n in needles)
    ]


def secret_spellings(secret: bytes) -> list[bytes]:
    """The ways a key could show up in a file or a log: raw, hex, base64url, base64."""
    return [
        secret,
        secret.hex().encode(),
        base64.urlsafe_b64encode(secret).rstrip(b"="),
        base64.b64encode(secret).rstrip(b"="),
    ]
