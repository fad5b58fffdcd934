"""The serial console of an encryption-supported VM: where it is, and a relay to a terminal.

An encryption-supported VM whose fabric administrator turned the console on
(:func:`guardfab.hypervisor.settings.change_settings`) starts with a serial port
on a QEMU chardev Unix socket in its run directory: the directory is 0700 and
the socket 0600, so only the host's root -- the agent -- reaches it. Nothing the
guest writes there is logged on the host: it goes to whoever is attached.

A shielded VM never has one: :func:`console_socket` refuses it, and QEMU's
command line for it carries ``-serial none`` whatever its record says
(:mod:`guardfab.hypervisor.policy`).
"""

from __future__ import annotations

import os
import selectors
import socket
import stat
import time
from pathlib import Path
from typing import BinaryIO

from guardfab.errors import NotAuthorizedError, UsageError
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.hypervisor.argv import VmPaths
from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.power import run_directory
from guardfab.hypervisor.provision import load_record

#: Seconds the relay still copies the guest's output after its input ended
#: (a piped command's answer arrives a moment after the command).
LINGER = 0.5
_CHUNK = 65536


def console_socket(vm_dir: Path) -> Path:
    """The Unix socket of the running VM's serial console.

    Raises:
        NotAuthorizedError: the VM is shielded, or its console is off.
        UsageError: the VM is not running, or runs without its console (started
            before the setting changed).
    """
    vm_dir = Path(vm_dir)
    record = load_record(vm_dir)
    if record.policy is SecurityPolicy.SHIELDED:
        raise NotAuthorizedError(
            f"VM {record.name!r} is shielded: it has no console, serial port or debugger",
            hint="reach it through its own network services (its page, SSH or RDP)",
        )
    if not record.console:
        raise NotAuthorizedError(
            f"VM {record.name!r} has its console off",
            hint="stop the VM, turn its console on (vm settings), start it again",
        )
    run_dir = run_directory(vm_dir)
    if run_dir is None:
        raise UsageError(f"VM {record.name!r} is not running", hint="start it first (vm start)")
    path = VmPaths(work_dir=vm_dir / "state", run_dir=run_dir).console_socket
    try:
        is_socket = stat.S_ISSOCK(path.lstat().st_mode)
    except FileNotFoundError:
        is_socket = False
    if not is_socket:
        raise UsageError(
            f"VM {record.name!r} runs without a console socket (started before it was turned on)",
            hint="stop the VM and start it again",
        )
    return path


def relay(path: Path, stdin: BinaryIO, stdout: BinaryIO, *, linger: float = LINGER) -> None:
    """Copy bytes both ways between a console socket and a terminal until EOF.

    Returns when the console closes (QEMU stopped), when ``stdout``'s reader
    is gone, or ``linger`` seconds after ``stdin`` ends. ``stdin`` must have a
    file descriptor; ``stdout`` is written and flushed per chunk.

    Raises:
        HypervisorError: the socket does not accept a connection.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise HypervisorError(f"cannot connect to the console at {path}: {reason}") from exc
        try:
            _pump(sock, stdin.fileno(), stdout, linger)
        except BrokenPipeError:
            return  # whoever read our output went away: nothing left to show


def _pump(sock: socket.socket, stdin_fd: int, stdout: BinaryIO, linger: float) -> None:
    # poll, not epoll: a console's input may be a regular file, which epoll refuses.
    with selectors.PollSelector() as selector:
        selector.register(sock, selectors.EVENT_READ, "console")
        selector.register(stdin_fd, selectors.EVENT_READ, "input")
        deadline: float | None = None
        while deadline is None or time.monotonic() < deadline:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            for key, _ in selector.select(timeout):
                if key.data == "console":
                    data = sock.recv(_CHUNK)
                    if not data:
                        return  # QEMU closed the console: the VM stopped
                    stdout.write(data)
                    stdout.flush()
                    continue
                data = os.read(stdin_fd, _CHUNK)
                if data:
                    sock.sendall(data)
                else:
                    selector.unregister(stdin_fd)
                    deadline = time.monotonic() + linger


__all__ = ["LINGER", "console_socket", "relay"]
