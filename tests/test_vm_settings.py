"""VM settings (the console), the loosening a shielded VM refuses, and the console's plumbing.

Real files (vm.json, run.json), a real process standing for a running QEMU
(its command line names the run directory, as QEMU's does) and real Unix
sockets; test_vm_restore_and_console.py attaches to a real QEMU's console.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from guardfab.errors import FormatError, NotAuthorizedError, PolicyError, UsageError
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.hypervisor.argv import VmPaths
from guardfab.hypervisor.console import console_socket, relay
from guardfab.hypervisor.power import power_on
from guardfab.hypervisor.provision import RECORD_FILE, VmRecord, load_record, write_record
from guardfab.hypervisor.settings import LooseningRefusedError, change_settings
from guardfab.hypervisor.spec import DirectKernel

SHIELDED = SecurityPolicy.SHIELDED
ENCRYPTION_SUPPORTED = SecurityPolicy.ENCRYPTION_SUPPORTED


def _record(name: str, policy: SecurityPolicy, *, console: bool = False) -> VmRecord:
    return VmRecord(
        name=name,
        policy=policy,
        pdk_id="pdk-1",
        template="t.img",
        host_port=None,
        memory_mib=256,
        created_at=0,
        boot=DirectKernel(Path("/k"), Path("/i"), "quiet"),
        console=console,
    )


def _vm_dir(tmp_path: Path, policy: SecurityPolicy, *, console: bool = False) -> Path:
    vm_dir = tmp_path / "vm1"
    vm_dir.mkdir()
    write_record(vm_dir, _record("vm1", policy, console=console))
    return vm_dir


def _unchanged(vm_dir: Path) -> tuple[bytes, int]:
    path = vm_dir / RECORD_FILE
    return path.read_bytes(), path.stat().st_mtime_ns


def wait_for_cmdline(pid: int, needle: Path) -> None:
    """Until the new process's command line shows (it is empty for a moment after the fork)."""
    deadline = time.monotonic() + 10
    while str(needle).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the stand-in process did not start"
        time.sleep(0.01)


@dataclass
class Running:
    """A process whose command line names ``run_dir``, recorded in run.json like QEMU."""

    run_dir: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self, vm_dir: Path) -> None:
        self.process = subprocess.Popen(["sh", "-c", "sleep 60; :", str(self.run_dir)])
        wait_for_cmdline(self.process.pid, self.run_dir)
        info = {"pid": self.process.pid, "run_dir": str(self.run_dir)}
        (vm_dir / "run.json").write_text(json.dumps(info))


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    state = Running(run_dir)
    yield state
    if hasattr(state, "process"):
        state.process.kill()
        state.process.wait()


# --- the record ----------------------------------------------------------------------


def test_a_record_written_before_the_setting_loads_with_the_console_off(tmp_path: Path) -> None:
    data = _record("vm1", ENCRYPTION_SUPPORTED).to_dict()
    del data["console"]
    (tmp_path / RECORD_FILE).write_text(json.dumps(data))
    assert load_record(tmp_path).console is False
    data["console"] = "yes"
    (tmp_path / RECORD_FILE).write_text(json.dumps(data))
    with pytest.raises(FormatError, match="console"):
        load_record(tmp_path)


def test_the_console_setting_reaches_the_spec_and_the_kernel_command_line(tmp_path: Path) -> None:
    off = _record("vm1", ENCRYPTION_SUPPORTED).spec(tmp_path)
    on = _record("vm1", ENCRYPTION_SUPPORTED, console=True).spec(tmp_path)
    assert (off.debug.console, on.debug.console) == (False, True)
    assert off.kernel is not None
    assert off.kernel.cmdline == "quiet"
    assert on.kernel is not None
    assert on.kernel.cmdline == "quiet console=ttyS0"
    chosen = replace(
        _record("vm1", ENCRYPTION_SUPPORTED, console=True),
        boot=DirectKernel(Path("/k"), Path("/i"), "console=hvc0"),
    )
    assert chosen.spec(tmp_path).kernel == chosen.boot, "the guest's own console choice stays"


# --- change_settings ---------------------------------------------------------------


def test_a_shielded_vm_refuses_a_console_and_nothing_is_written(tmp_path: Path) -> None:
    vm_dir = _vm_dir(tmp_path, SHIELDED)
    before = _unchanged(vm_dir)
    with pytest.raises(LooseningRefusedError) as refused:
        change_settings(vm_dir, console=True)
    assert isinstance(refused.value, NotAuthorizedError)
    assert (refused.value.vm, refused.value.requested) == ("vm1", "console=on")
    assert "'vm1'" in str(refused.value)
    assert "console=on" in str(refused.value)
    assert "shielded" in refused.value.hint
    assert _unchanged(vm_dir) == before
    assert [p.name for p in vm_dir.iterdir()] == [RECORD_FILE], "no temp file left"
    assert change_settings(vm_dir, console=False).console is False  # not a loosening
    assert _unchanged(vm_dir) == before


def test_an_encryption_supported_vm_turns_its_console_on_and_off(tmp_path: Path) -> None:
    vm_dir = _vm_dir(tmp_path, ENCRYPTION_SUPPORTED)
    assert change_settings(vm_dir, console=True).console is True
    assert load_record(vm_dir).console is True
    assert stat.S_IMODE((vm_dir / RECORD_FILE).stat().st_mode) == 0o600
    assert change_settings(vm_dir, console=False).console is False
    assert load_record(vm_dir).console is False


def test_a_running_vm_keeps_its_settings(tmp_path: Path, running: Running) -> None:
    vm_dir = _vm_dir(tmp_path, ENCRYPTION_SUPPORTED)
    running.start(vm_dir)
    before = _unchanged(vm_dir)
    with pytest.raises(UsageError, match="only while it is stopped"):
        change_settings(vm_dir, console=True)
    assert _unchanged(vm_dir) == before


class CountingKeySource:
    """Counts releases: a refused start must not spend a KP generation."""

    def __init__(self) -> None:
        self.calls = 0

    def release(self, kp: bytes) -> ReleasedKeys:
        self.calls += 1
        raise AssertionError("no release may happen")


def test_a_hand_edited_shielded_record_with_a_console_does_not_start(tmp_path: Path) -> None:
    vm_dir = _vm_dir(tmp_path, SHIELDED)
    data = json.loads((vm_dir / RECORD_FILE).read_text())
    data["console"] = True  # what change_settings refuses, written past it
    (vm_dir / RECORD_FILE).write_text(json.dumps(data))
    source = CountingKeySource()
    with pytest.raises(PolicyError, match="no-console"):
        power_on(vm_dir, source)
    assert source.calls == 0


# --- console_socket ------------------------------------------------------------------


def test_console_socket_refuses_a_shielded_vm_even_when_asked_by_a_forged_record(
    tmp_path: Path, running: Running
) -> None:
    vm_dir = _vm_dir(tmp_path, SHIELDED, console=True)
    running.start(vm_dir)
    with pytest.raises(NotAuthorizedError, match="shielded: it has no console"):
        console_socket(vm_dir)


def test_console_socket_refuses_a_console_that_is_off(tmp_path: Path, running: Running) -> None:
    vm_dir = _vm_dir(tmp_path, ENCRYPTION_SUPPORTED)
    running.start(vm_dir)
    with pytest.raises(NotAuthorizedError, match="console off"):
        console_socket(vm_dir)


def test_console_socket_needs_a_running_vm_with_its_socket(
    tmp_path: Path, running: Running
) -> None:
    vm_dir = _vm_dir(tmp_path, ENCRYPTION_SUPPORTED, console=True)
    with pytest.raises(UsageError, match="not running"):
        console_socket(vm_dir)
    running.start(vm_dir)
    with pytest.raises(UsageError, match="without a console socket"):
        console_socket(vm_dir)
    path = VmPaths(vm_dir / "state", running.run_dir).console_socket
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        assert console_socket(vm_dir) == path


# --- relay ---------------------------------------------------------------------------


class Collector:
    """A thread-safe stdout."""

    def __init__(self) -> None:
        self.data = b""
        self.changed = threading.Condition()

    def write(self, data: bytes) -> int:
        with self.changed:
            self.data += data
            self.changed.notify_all()
        return len(data)

    def flush(self) -> None: ...

    def wait_for(self, needle: bytes, timeout: float = 10) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: needle in self.data, timeout), self.data


def _upper_echo(listener: socket.socket, greeting: bytes, *, close_after: bytes) -> None:
    """A console that greets, then answers each chunk upper-cased; closes on ``close_after``."""
    connection, _ = listener.accept()
    with connection:
        connection.sendall(greeting)
        while data := connection.recv(4096):
            connection.sendall(data.upper())
            if close_after in data:
                return


def _relay_thread(path: Path, stdin_fd: int, out: Collector, linger: float) -> threading.Thread:
    stdin = os.fdopen(stdin_fd, "rb", closefd=False)  # the test closes the fd itself
    thread = threading.Thread(target=relay, args=(path, stdin, out), kwargs={"linger": linger})
    thread.start()
    return thread


def test_relay_copies_both_ways_and_ends_when_the_console_closes(tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        server = threading.Thread(
            target=_upper_echo,
            args=(
                listener,
                b"login: ",
            ),
            kwargs={"close_after": b"bye"},
        )
        server.start()
        read_end, write_end = os.pipe()
        out = Collector()
        thread = _relay_thread(path, read_end, out, linger=30)
        out.wait_for(b"login: ")
        os.write(write_end, b"hello\n")
        out.wait_for(b"HELLO\n")
        os.write(write_end, b"bye\n")
        thread.join(10)
        assert not thread.is_alive(), "the relay ends when the console closes"
        assert out.data == b"login: HELLO\nBYE\n"
        server.join(5)
        os.close(read_end)
        os.close(write_end)


def test_relay_ends_shortly_after_its_input_ends(tmp_path: Path) -> None:
    path = tmp_path / "console.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()
        server = threading.Thread(
            target=_upper_echo, args=(listener, b""), kwargs={"close_after": b"never"}
        )
        server.daemon = True
        server.start()
        read_end, write_end = os.pipe()
        out = Collector()
        os.write(write_end, b"one command\n")
        os.close(write_end)  # input ends at once: the answer still arrives within the linger
        thread = _relay_thread(path, read_end, out, linger=1.0)
        thread.join(10)
        assert not thread.is_alive()
        assert out.data == b"ONE COMMAND\n"
        os.close(read_end)


def test_relay_names_a_console_that_is_not_there(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    try:
        with (
            os.fdopen(read_end, "rb", closefd=False) as stdin,
            pytest.raises(Exception, match="cannot connect to the console"),
        ):
            relay(tmp_path / "missing.sock", stdin, Collector())  # type: ignore[arg-type]
    finally:
        os.close(read_end)
        os.close(write_end)
