"""Test helper (not a test module): manufactured swtpm TPMs for guarded-host tests.

A guarded host's TPM in tests is a real swtpm, manufactured the way a TPM maker
would: ``swtpm_setup --create-ek-cert --create-platform-cert`` with a local CA that
belongs to the test session (never ``/var/lib/swtpm-localca``), so the HGS side can
verify EK certificates against that CA's root and intermediate.

Manufacturing costs about a second, so it happens once per session and per
distinct TPM (:class:`TpmFactory`); each test copies the manufactured state into its
own directory and starts ``swtpm socket`` on free loopback ports (:class:`Swtpm`),
which gives it a fresh TPM with the same EK in a few milliseconds. Every swtpm is
stopped at teardown, and also dies with the test process (PR_SET_PDEATHSIG) if
pytest itself is killed.

Fixtures are imported explicitly by the test modules that use them::

    import swtpm_harness

    tpm_factory = swtpm_harness.tpm_factory  # a module-level name makes it a fixture there
    start_swtpm = swtpm_harness.start_swtpm
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guardfab.host.tpm import TpmDevice
from guardfab.tpm.eventlog import parse_event_log
from guardfab.tpm.events import EventType

#: Seconds to wait for swtpm to listen, and to exit after SIGTERM.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
#: PCR banks the test TPMs allocate: SHA-1 and SHA-256, like most firmware TPMs.
PCR_BANKS = "sha1,sha256"


@dataclass(frozen=True)
class LocalCa:
    """The session's swtpm-localca: what an HGS admin would trust for EK certificates."""

    directory: Path

    @property
    def root_pem(self) -> bytes:
        """The self-signed root certificate (PEM)."""
        return (self.directory / "swtpm-localca-rootca-cert.pem").read_bytes()

    @property
    def intermediate_pem(self) -> bytes:
        """The issuing CA certificate that signs the EK certificates (PEM)."""
        return (self.directory / "issuercert.pem").read_bytes()


def _write_configs(workdir: Path) -> tuple[Path, LocalCa]:
    """Write swtpm_setup and swtpm-localca configs whose CA lives under ``workdir``."""
    ca_dir = workdir / "ca"
    ca_dir.mkdir(parents=True)
    localca = workdir / "swtpm-localca.conf"
    localca.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir / 'signkey.pem'}\n"
        f"issuercert = {ca_dir / 'issuercert.pem'}\n"
        f"certserial = {ca_dir / 'certserial'}\n"
    )
    options = workdir / "swtpm-localca.options"
    options.write_text(
        "--platform-manufacturer guardfab-test\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    setup = workdir / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {localca}\n"
        f"create_certs_tool_options = {options}\n"
        f"active_pcr_banks = {PCR_BANKS}\n"
    )
    return setup, LocalCa(ca_dir)


def manufacture(state_dir: Path, setup_config: Path, log: Path) -> None:
    """Manufacture a TPM 2.0 into ``state_dir``: EKs, EK and platform certificates, locked NV.

    Raises:
        RuntimeError: swtpm_setup failed (its log is quoted).
    """
    state_dir.mkdir(parents=True)
    argv = [
        "swtpm_setup",
        "--tpm2",
        "--create-ek-cert",
        "--create-platform-cert",
        "--lock-nvram",
        "--pcr-banks",
        PCR_BANKS,
        "--tpmstate",
        str(state_dir),
        "--config",
        str(setup_config),
        "--logfile",
        str(log),
    ]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed ({result.returncode}): {log.read_text()}")


class TpmFactory:
    """Manufactured TPM states of one test session, made on first use and shared by name.

    Every state is signed by the same :attr:`ca`; two names give two TPMs with
    different endorsement keys.
    """

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._setup, self.ca = _write_configs(workdir)
        self._states: dict[str, Path] = {}

    def state(self, name: str = "host-a") -> Path:
        """Return the pristine manufactured state directory of TPM ``name`` (do not run it)."""
        if name not in self._states:
            path = self._workdir / "states" / name
            manufacture(path, self._setup, self._workdir / f"{name}-setup.log")
            self._states[name] = path
        return self._states[name]


def _free_port_pair() -> int:
    """Return a port P such that P and P + 1 were both free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, so no swtpm outlives it."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Swtpm:
    """One running ``swtpm socket`` on a copy of a manufactured state, loopback only."""

    def __init__(self, state: Path, workdir: Path) -> None:
        self.state_dir = workdir / "tpmstate"
        shutil.copytree(state, self.state_dir)
        (self.state_dir / ".lock").unlink(missing_ok=True)
        self._log = workdir / "swtpm.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        """The TCTI string for tpm2-pytss."""
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> Swtpm:
        """Start swtpm on free ports and wait until it accepts connections.

        A port taken between the choice and swtpm's bind makes swtpm exit; then
        other ports are tried.
        """
        for _ in range(5):
            self.port = _free_port_pair()
            self._process = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - tests, single-threaded start
            )
            if self._wait_listening():
                return self
            self.stop()
        raise RuntimeError(f"swtpm did not start; see {self._log}")

    def _argv(self) -> list[str]:
        return [
            "swtpm",
            "socket",
            "--tpm2",
            "--server",
            f"type=tcp,port={self.port},bindaddr=127.0.0.1",
            "--ctrl",
            f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--flags",
            "startup-clear",
            "--log",
            f"file={self._log}",
        ]

    def _wait_listening(self) -> bool:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=0.2):
                    return True
            except OSError:
                time.sleep(0.01)
        return False

    def stop(self) -> None:
        """Terminate swtpm and wait for it (kill it if it ignores SIGTERM)."""
        process, self._process = self._process, None
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
        """Whether the swtpm process is alive."""
        return self._process is not None and self._process.poll() is None


def simulate_measured_boot(tpm: TpmDevice, event_log: bytes) -> dict[int, dict[int, bytes]]:
    """Extend the TPM's PCRs as the firmware that wrote ``event_log`` did.

    Every event but EV_NO_ACTION (never extended) is extended with its digests in
    every bank the TPM has allocated, using guardfab's own parser, so afterwards
    the TPM's PCRs equal the log's replay. Returns that replay for the banks the
    TPM and the log share.

    Raises:
        ValueError: the log starts PCR 0 at a locality other than 0, which an
            extend from software cannot reproduce.
    """
    log = parse_event_log(event_log)
    if log.startup_locality:
        raise ValueError(f"the log starts at locality {log.startup_locality}; cannot simulate")
    banks = set(tpm.pcr_banks())
    for event in log.events:
        if event.event_type == EventType.EV_NO_ACTION:
            continue
        digests = {bank: digest for bank, digest in event.digests.items() if bank in banks}
        if digests:
            tpm.extend(event.pcr, digests)
    return log.replay([bank for bank in log.replayable_banks if bank in banks])


def expected_pcrs(event_log: bytes, bank: int) -> dict[int, bytes]:
    """All 24 PCR values of ``bank`` that a verifier expects from the log alone."""
    log = parse_event_log(event_log)
    values = dict(enumerate(log.initial_pcrs(bank)))
    values.update(log.replay([bank])[bank])
    return values


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tpm_factory(tmp_path_factory: pytest.TempPathFactory) -> TpmFactory:
    """Manufactured TPM states and their CA, shared by the whole session."""
    return TpmFactory(tmp_path_factory.mktemp("swtpm-manufactured"))


@pytest.fixture
def start_swtpm(tpm_factory: TpmFactory, tmp_path: Path) -> Iterator[Callable[[str], Swtpm]]:
    """Start a fresh copy of a manufactured TPM by name; every one is stopped at teardown."""
    started: list[Swtpm] = []

    def start(name: str = "host-a") -> Swtpm:
        workdir = tmp_path / f"swtpm-{name}-{len(started)}"
        workdir.mkdir()
        swtpm = Swtpm(tpm_factory.state(name), workdir)
        started.append(swtpm)
        return swtpm.start()

    yield start
    for swtpm in started:
        swtpm.stop()


@pytest.fixture
def swtpm(start_swtpm: Callable[[str], Swtpm]) -> Swtpm:
    """A running fresh copy of the session's first manufactured TPM."""
    return start_swtpm("host-a")
