"""The VM runtime's small parts without a VM: QMP, secret pipes, answer files, keys, probes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guardfab.errors import FormatError, PolicyError, UsageError
from guardfab.hypervisor import accel, migration, vtpm
from guardfab.hypervisor.disk import DiskKey
from guardfab.hypervisor.errors import HypervisorError, QmpCommandError
from guardfab.hypervisor.qmp import QmpClient
from guardfab.hypervisor.secretfd import secret_pipe
from guardfab.hypervisor.spec import DirectKernel, Firmware, SecurityLevel, VmSpec
from guardfab.hypervisor.specialize import AnswerFile
from guardfab.hypervisor.vm import QemuVm, VmKeys, VmRuntime

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}

# A fake QEMU: reads one command per line and answers it with this handler.
# Returning None makes it hang up, like a QEMU that exits.
Handler = Callable[[dict[str, Any], list[int]], list[dict[str, Any]] | None]


def _serve(sock: socket.socket, handler: Handler) -> None:
    sock.sendall(json.dumps(GREETING).encode() + b"\n")
    buffer = b""
    with sock:
        while True:
            data, fds, _flags, _addr = socket.recv_fds(sock, 65536, 4)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                replies = handler(json.loads(line), fds)
                if replies is None:
                    return
                for reply in replies:
                    sock.sendall(json.dumps(reply).encode() + b"\n")
                fds = []


@pytest.fixture
def fake_qemu() -> Iterator[Callable[[Handler], QmpClient]]:
    threads: list[threading.Thread] = []
    clients: list[QmpClient] = []

    def connect(handler: Handler) -> QmpClient:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        thread = threading.Thread(target=_serve, args=(theirs, handler), daemon=True)
        thread.start()
        threads.append(thread)
        client = QmpClient(ours, timeout=5)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
    for thread in threads:
        thread.join(5)


def _echo(message: dict[str, Any], fds: list[int]) -> list[dict[str, Any]]:
    reply: dict[str, Any] = {"id": message["id"]}
    if message["execute"] == "fail":
        reply["error"] = {"class": "GenericError", "desc": "Invalid password, cannot unlock"}
    elif message["execute"] == "add-fd":
        contents = [os.read(fd, 100).decode() for fd in fds]
        for fd in fds:
            os.close(fd)
        reply["return"] = {"fdset-id": 1, "fd": 42, "contents": contents}
    else:
        reply["return"] = {"echo": message.get("arguments", {})}
    event = {"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}
    return [event, reply]


def test_qmp_negotiates_and_returns_results(fake_qemu: Callable[[Handler], QmpClient]) -> None:
    client = fake_qemu(_echo)
    assert client.version["qemu"]["major"] == 7
    assert client.execute("query-status", {"a": 1}) == {"echo": {"a": 1}}
    assert [event["event"] for event in client.events("STOP")] == ["STOP", "STOP"]


def test_qmp_errors_name_the_command_not_its_arguments(
    fake_qemu: Callable[[Handler], QmpClient],
) -> None:
    client = fake_qemu(_echo)
    with pytest.raises(QmpCommandError) as caught:
        client.execute("fail", {"data": "c2VjcmV0LWtleQ=="})
    assert caught.value.command == "fail"
    assert "Invalid password" in caught.value.description
    assert "c2VjcmV0" not in str(caught.value)


def test_qmp_passes_a_file_descriptor_with_its_command(
    fake_qemu: Callable[[Handler], QmpClient],
) -> None:
    client = fake_qemu(_echo)
    with secret_pipe(b"passphrase-in-a-pipe") as fd:
        reply = client.execute("add-fd", fds=[fd])
    assert reply["contents"] == ["passphrase-in-a-pipe"]


def test_qmp_reports_a_closed_connection(fake_qemu: Callable[[Handler], QmpClient]) -> None:
    client = fake_qemu(
        lambda message, fds: None if message["execute"] == "quit" else _echo(message, fds)
    )
    with pytest.raises(HypervisorError, match="closed its QMP connection"):
        client.execute("quit")


def test_qmp_refuses_a_peer_that_is_not_qemu() -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b'{"hello": 1}\n')
        with pytest.raises(HypervisorError, match="greeting"):
            QmpClient(ours, timeout=2)


def test_qmp_connect_gives_up_on_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(HypervisorError, match="no QMP socket"):
        QmpClient.connect(tmp_path / "none.sock", wait=0.1)


def test_secret_pipe_holds_exactly_the_secret() -> None:
    with secret_pipe(b"k" * 64) as fd:
        assert os.read(fd, 1000) == b"k" * 64
        assert os.read(fd, 1000) == b""  # end of file: the write end is closed
    with pytest.raises(OSError):
        os.fstat(fd)


def test_disk_keys_never_show_themselves() -> None:
    key = DiskKey.generate()
    assert key.material.hex() not in repr(key)
    assert "redacted" in repr(key)
    assert key.passphrase() == key.material.hex().encode()
    assert key == DiskKey(key.material)
    assert key != DiskKey.generate()
    with pytest.raises(ValueError, match="32 bytes"):
        DiskKey(b"short")


def test_answer_file_round_trip_and_redaction() -> None:
    answer = AnswerFile("web-01", "$y$j9T$salt$hash", "hello.txt", b"tenant data")
    text = answer.to_bytes().decode()
    assert text.splitlines() == [
        "hostname=web-01",
        "admin_password_hash=$y$j9T$salt$hash",
        "file_name=hello.txt",
        "file_b64=dGVuYW50IGRhdGE=",
    ]
    assert "hash" not in repr(answer)
    assert "tenant" not in repr(answer)


@pytest.mark.parametrize(
    "fields",
    [
        {"hostname": "bad host"},
        {"hostname": "x\nadmin_password_hash=$1$a$b"},
        {"hostname": "ok", "admin_password_hash": "plain-password"},
        {"hostname": "ok", "admin_password_hash": "$y$a$b\nhostname=evil"},
        {"hostname": "ok", "file_name": "../etc/shadow"},
        {"hostname": "ok", "file_name": "f", "file_content": b"x" * (256 * 1024 + 1)},
    ],
)
def test_answer_files_that_could_inject_lines_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        AnswerFile(**fields)


@pytest.mark.parametrize(("value", "name"), [("tcg", "tcg"), ("kvm", "kvm"), ("TCG", "tcg")])
def test_accelerator_can_be_forced(monkeypatch: pytest.MonkeyPatch, value: str, name: str) -> None:
    monkeypatch.setenv("GUARDFAB_ACCEL", value)
    assert accel.choose_accelerator().name == name


def test_an_unknown_accelerator_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUARDFAB_ACCEL", "hvf")
    with pytest.raises(UsageError, match="GUARDFAB_ACCEL"):
        accel.choose_accelerator()


def test_the_probe_is_a_boot_sector() -> None:
    sector = accel.PROBE_BOOT_SECTOR
    assert len(sector) == 512
    assert sector.endswith(b"\x55\xaa")


@pytest.mark.slow
def test_the_long_mode_probe_runs_under_tcg(tmp_path: Path) -> None:
    """The probe itself is sound: TCG runs it to the debug-exit port."""
    disk = tmp_path / "probe.img"
    disk.write_bytes(accel.PROBE_BOOT_SECTOR.ljust(1024 * 1024, b"\0"))
    argv = [arg.replace("accel=kvm", "accel=tcg") for arg in accel._probe_argv(disk, None)]
    assert subprocess.run(argv, timeout=30, check=False).returncode == accel.PROBE_EXIT_STATUS


def test_psk_directory_is_private_tmpfs_and_removed() -> None:
    psk = migration.new_migration_psk()
    with migration.psk_directory(psk) as directory:
        assert migration._filesystem_type(directory) == "tmpfs"
        assert directory.stat().st_mode & 0o777 == 0o700
        key_file = directory / "keys.psk"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.read_text() == f"guardfab:{psk.hex()}\n"
    assert not directory.exists()


def test_a_missing_program_is_a_clear_transport_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(vtpm, "SWTPM_BINARY", str(tmp_path / "no-swtpm"))
    tpm = vtpm.Swtpm(tmp_path / "state", tmp_path / "ctrl.sock", tmp_path / "log")
    with pytest.raises(HypervisorError, match="cannot run") as caught:
        tpm.start(bytes(32))
    assert "scripts/setup.sh" in caught.value.diagnostics()
    assert tpm.pid is None


@pytest.mark.slow
def test_qemu_failing_at_start_up_reports_why_and_leaves_nothing(tmp_path: Path) -> None:
    spec = VmSpec(
        "broken",
        SecurityLevel.NORMAL,
        firmware=Firmware.BIOS,
        kernel=DirectKernel(tmp_path / "no-kernel", tmp_path / "no-initrd"),
    )
    vm = QemuVm(spec, tmp_path / "vm", accel=accel.Accelerator("tcg", None, "test"))
    with pytest.raises(HypervisorError, match="exited at start-up") as caught:
        vm.start(VmKeys(vtpm_state=bytes(32)))
    assert "no-kernel" in str(caught.value)
    assert not vm.running
    assert vm.swtpm_pid is None


def test_qemu_vm_is_a_vm_runtime(tmp_path: Path) -> None:
    spec = VmSpec("x", SecurityLevel.NORMAL, firmware=Firmware.BIOS, vtpm=False)
    assert isinstance(QemuVm(spec, tmp_path, accel=accel.Accelerator("tcg", None, "t")), VmRuntime)


def test_a_refused_spec_leaves_nothing_on_the_host(tmp_path: Path) -> None:
    spec = VmSpec("loose", SecurityLevel.SHIELDED, firmware=Firmware.BIOS)
    vm = QemuVm(spec, tmp_path / "vm", accel=accel.Accelerator("tcg", None, "t"))
    with pytest.raises(PolicyError, match="secure-boot"):
        vm.start(VmKeys(vtpm_state=bytes(32)))
    assert not (tmp_path / "vm").exists()
