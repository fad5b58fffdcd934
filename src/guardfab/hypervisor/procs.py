"""Child processes of the VM runtime: own process groups, optional death with the parent.

QEMU and swtpm each run in a process group of their own, so stopping one
signals everything it may have started and a Ctrl-C at the runtime's terminal
does not reach the VMs. A caller that must not leave VMs behind when it dies
(a test session) asks for ``die_with_parent``: the kernel then sends SIGKILL to
the child when the thread that started it exits (PR_SET_PDEATHSIG). A host
agent does not: its VMs should outlive an agent restart.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Callable

from guardfab.hypervisor.errors import HypervisorError

_PR_SET_PDEATHSIG = 1


def _dies_with(parent: int) -> Callable[[], None]:
    """In the child, before exec: die when the parent thread goes.

    A parent that died between the fork and the ``prctl`` never sends the
    signal (the child was already reparented): then the child exits at once
    instead of running on alone (seen with etcd members when pytest was killed).
    """

    def in_child() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return in_child


def child_setup(die_with_parent: bool) -> Callable[[], None] | None:
    """The ``preexec_fn`` for a child (``None`` unless it must die with its parent)."""
    return _dies_with(os.getpid()) if die_with_parent else None


def spawn(
    argv: list[str],
    *,
    stdout: int,
    die_with_parent: bool,
    pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new process group (stderr goes with stdout).

    Raises:
        HypervisorError: the program is missing or cannot run.
    """
    try:
        return subprocess.Popen(  # noqa: S603 -- argv built by the runtime, no shell
            argv,
            pass_fds=pass_fds,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=0o077,  # sockets, logs and state files it creates: owner only
            preexec_fn=child_setup(die_with_parent),  # noqa: PLW1509 -- one prctl, no locks
        )
    except OSError as exc:
        raise HypervisorError(
            f"cannot run {argv[0]}: {exc.strerror}",
            hint="install the VM runtime's packages with scripts/setup.sh",
        ) from exc


def stop_group(process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``process`` to exit; then SIGTERM and at last SIGKILL its process group."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            continue
        return
