"""A VM's vTPM: one ``swtpm`` process per QEMU launch, its state encrypted.

QEMU's ``tpm-emulator`` backend talks to swtpm over a control socket and hands
it the data channel itself; swtpm exits when its QEMU goes away, so every
launch starts a fresh swtpm on the VM's state directory. The state key (and,
for live migration, the migration key that encrypts the vTPM part of the
stream) reaches swtpm through a pipe (``--key fd=N``): ``ps`` shows ``fd=3``,
never the key, and a wrong key makes swtpm refuse the state and exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.procs import spawn, stop_group
from guardfab.hypervisor.secretfd import secret_pipe

#: AES-256-CBC, the strongest mode swtpm 0.7 offers for its state and migration blobs.
KEY_SIZE = 32
SWTPM_BINARY = "swtpm"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"the vTPM {what} key must be {KEY_SIZE} bytes")


class Swtpm:
    """The swtpm process behind one VM launch.

    Args:
        state_dir: the vTPM's persistent, encrypted state (created 0700 if missing).
        ctrl_socket: the control socket QEMU connects to.
        log_path: swtpm's own log (errors only: it holds no TPM content).
        die_with_parent: kill swtpm if the thread that started it dies (tests).
    """

    def __init__(
        self, state_dir: Path, ctrl_socket: Path, log_path: Path, *, die_with_parent: bool = False
    ) -> None:
        self.state_dir = state_dir
        self.die_with_parent = die_with_parent
        self.ctrl_socket = ctrl_socket
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running swtpm's process id, or ``None``."""
        return self._process.pid if self._process is not None else None

    def argv(self, key_fd: int, migration_key_fd: int | None) -> list[str]:
        """swtpm's command line: file descriptor numbers, never keys."""
        argv = [
            SWTPM_BINARY,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.state_dir},mode=0600",
            "--ctrl",
            f"type=unixio,path={self.ctrl_socket},mode=0600",
            "--key",
            f"fd={key_fd},mode=aes-256-cbc,format=binary",
            "--log",
            f"file={self.log_path},level=1",
            "--terminate",
        ]
        if migration_key_fd is not None:
            argv += ["--migration-key", f"fd={migration_key_fd},mode=aes-256-cbc,format=binary"]
        return argv

    def start(self, state_key: bytes, migration_key: bytes | None = None) -> None:
        """Start swtpm and wait until its control socket listens.

        Raises:
            HypervisorError: swtpm exited (a wrong state key, damaged state) or did not listen.
        """
        _check_key(state_key, "state")
        if migration_key is not None:
            _check_key(migration_key, "migration")
        if self._process is not None:
            raise HypervisorError("this swtpm is already running")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.ctrl_socket.unlink(missing_ok=True)
        with contextlib.ExitStack() as stack:
            key_fd = stack.enter_context(secret_pipe(state_key))
            fds = [key_fd]
            migration_fd = None
            if migration_key is not None:
                migration_fd = stack.enter_context(secret_pipe(migration_key))
                fds.append(migration_fd)
            self._process = spawn(
                self.argv(key_fd, migration_fd),
                stdout=subprocess.DEVNULL,
                die_with_parent=self.die_with_parent,
                pass_fds=tuple(fds),
            )
        self._wait_listening()

    def _wait_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while not _unix_socket_listening(self.ctrl_socket):
            status = self._process.poll()
            if status is not None:
                self._process = None
                raise HypervisorError(
                    f"swtpm exited at start-up with status {status}: {self._last_log_line()}",
                    hint="a wrong vTPM state key or damaged vTPM state makes swtpm refuse to start",
                )
            if time.monotonic() > deadline:
                self.stop()
                raise HypervisorError("swtpm did not open its control socket in time")
            time.sleep(0.01)

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "no log"

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for swtpm to exit; its status, or ``None``."""
        if self._process is None:
            return 0
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Stop swtpm (it normally exits with its QEMU): SIGTERM, then SIGKILL."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        stop_group(process, STOP_TIMEOUT)
        self.ctrl_socket.unlink(missing_ok=True)


#: ``__SO_ACCEPTCON`` in /proc/net/unix's Flags column: the socket is listening.
_ACCEPTCON = 0x10000


def _unix_socket_listening(path: Path) -> bool:
    """Whether a Unix socket at ``path`` is listening, without connecting to it.

    The socket file appears at bind(), before listen(): waiting for the file alone
    raced with swtpm (a connect in between is refused). A probe connection is no
    option either, since swtpm runs with --terminate and would exit when it closes.
    """
    if not path.exists():
        return False
    target = str(path)
    with contextlib.suppress(OSError), Path("/proc/net/unix").open(encoding="utf-8") as table:
        for line in table:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == target:
                return bool(int(fields[3], 16) & _ACCEPTCON)
    return False
