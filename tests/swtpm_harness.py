"""Test helper (not a test module): manufactured swtpm TPMs for guarded-host tests.

A guarded host's TPM in tests is a real swtpm, manufactured the way a TPM maker
would (:mod:`guardfab.softhost.swtpm`, which the demo's host uses too) with a local
CA that belongs to the test session (never ``/var/lib/swtpm-localca``), so the HGS
side can verify EK certificates against that CA's root and intermediate.

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

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from guardfab.hypervisor.procs import child_setup
from guardfab.softhost.swtpm import (
    free_port_pair,
    manufacture,
    simulate_measured_boot,
    write_configs,
)
from guardfab.tpm.eventlog import parse_event_log

#: What the tests use; ``simulate_measured_boot`` is re-exported from
#: guardfab.softhost.swtpm so that it comes from here with the fixtures.
__all__ = [
    "Swtpm",
    "TpmFactory",
    "expected_pcrs",
    "simulate_measured_boot",
    "start_swtpm",
    "swtpm",
    "tpm_factory",
]

#: Seconds to wait for swtpm to listen, and to exit after SIGTERM.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class TpmFactory:
    """Manufactured TPM states of one test session, made on first use and shared by name.

    Every state is signed by the same :attr:`ca`; two names give two TPMs with
    different endorsement keys.
    """

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._setup, self.ca = write_configs(workdir)
        self._states: dict[str, Path] = {}

    def state(self, name: str = "host-a") -> Path:
        """Return the pristine manufactured state directory of TPM ``name`` (do not run it)."""
        if name not in self._states:
            path = self._workdir / "states" / name
            manufacture(path, self._setup, self._workdir / f"{name}-setup.log")
            self._states[name] = path
        return self._states[name]


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
            self.port = free_port_pair()
            self._process = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=child_setup(die_with_parent=True),  # noqa: PLW1509 - tests, single-threaded start
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
