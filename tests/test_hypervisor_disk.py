"""LUKS images made by qemu-img with keys passed by pipe: encrypted, nothing left in clear."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from guardfab.errors import UsageError
from guardfab.hypervisor.disk import (
    DiskKey,
    blockdev_options,
    copy_template_privately,
    create_encrypted_blank,
    create_encrypted_copy,
    create_encrypted_from_bytes,
)
from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.qmp import QmpClient
from guardfab.hypervisor.spec import DiskSpec
from guardfab.hypervisor.template_image import build_marker_template, build_template

pytestmark = pytest.mark.slow


def _info(path: Path) -> dict[str, object]:
    result = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        check=True,
    )
    info: dict[str, object] = json.loads(result.stdout)
    return info


def test_template_copy_is_luks_and_holds_no_plaintext(tmp_path: Path) -> None:
    marker = "guardfab-disk-test-marker-5d1e"
    build_marker_template(tmp_path / "template.img", marker)
    assert marker.encode() in (tmp_path / "template.img").read_bytes()  # the input is clear
    copy = tmp_path / "vm" / "os.qcow2"
    copy.parent.mkdir()
    key = DiskKey.generate()
    create_encrypted_copy(tmp_path / "template.img", copy, key)
    info = _info(copy)
    assert info["encrypted"] is True
    assert info["format-specific"]["data"]["encrypt"]["format"] == "luks"  # type: ignore[index]
    data = copy.read_bytes()
    assert marker.encode() not in data
    assert key.passphrase() not in data
    assert copy.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in copy.parent.iterdir()] == ["os.qcow2"]


def test_content_from_memory_never_touches_the_file_system(tmp_path: Path) -> None:
    content = b"hostname=x\nadmin_password_hash=$y$j9T$only-in-memory$abc\n"
    create_encrypted_from_bytes(content, tmp_path / "spec.qcow2", DiskKey.generate())
    assert [p.name for p in tmp_path.iterdir()] == ["spec.qcow2"]
    assert b"only-in-memory" not in (tmp_path / "spec.qcow2").read_bytes()
    assert _info(tmp_path / "spec.qcow2")["virtual-size"] == 512


def test_blank_data_disk(tmp_path: Path) -> None:
    create_encrypted_blank(tmp_path / "data.qcow2", 64 * 1024 * 1024, DiskKey.generate())
    assert _info(tmp_path / "data.qcow2")["virtual-size"] == 64 * 1024 * 1024


def test_existing_images_are_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "os.qcow2").write_bytes(b"precious")
    with pytest.raises(UsageError, match="already exists"):
        create_encrypted_blank(tmp_path / "os.qcow2", 1024 * 1024, DiskKey.generate())
    assert (tmp_path / "os.qcow2").read_bytes() == b"precious"


def test_a_failed_copy_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        create_encrypted_copy(tmp_path / "missing.img", tmp_path / "os.qcow2", DiskKey.generate())
    with pytest.raises(HypervisorError, match="qemu-img create failed"):
        create_encrypted_blank(tmp_path / "huge.qcow2", -1, DiskKey.generate())
    assert list(tmp_path.iterdir()) == []


def test_template_file_names_stay_inside_the_disk(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="inside the disk"):
        build_template(tmp_path / "t.img", {"../escape": b"x"})
    assert not (tmp_path / "t.img").exists()


# ------------------------------------------------------------------ the private template copy


def test_the_template_copy_is_private_and_exact(tmp_path: Path) -> None:
    template = tmp_path / "template.img"
    template.write_bytes(b"signed content" * 10_000)
    copy_template_privately(template, tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == template.read_bytes()
    assert (tmp_path / "copy.raw").stat().st_mode & 0o777 == 0o600


def _fifo(tmp_path: Path) -> Path:
    os.mkfifo(tmp_path / "fifo")
    return tmp_path / "fifo"


def _link(tmp_path: Path) -> Path:
    (tmp_path / "real.img").write_bytes(b"x")
    (tmp_path / "link.img").symlink_to(tmp_path / "real.img")
    return tmp_path / "link.img"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_link, "cannot open template disk"),  # O_NOFOLLOW: a symlink is not followed
        (_fifo, "not a regular file"),
        (lambda t: t, "not a regular file"),  # a directory
        (lambda t: t / "missing.img", "cannot open template disk"),
    ],
)
def test_the_template_copy_refuses_what_is_not_a_regular_file(
    tmp_path: Path, make: Callable[[Path], Path], reason: str
) -> None:
    source = make(tmp_path)
    dest = tmp_path / "out" / "copy.raw"
    dest.parent.mkdir()
    with pytest.raises(UsageError, match=reason):
        copy_template_privately(source, dest)
    assert list(dest.parent.iterdir()) == []


# ------------------------------------------------------------------ no backing file, ever


def test_blockdev_options_name_no_backing_file(tmp_path: Path) -> None:
    options = blockdev_options(DiskSpec("os", tmp_path / "os.qcow2"))
    assert "backing" in options
    assert options["backing"] is None  # JSON null: QEMU opens no backing file


def test_qemu_does_not_open_a_backing_file_named_in_an_edited_image(tmp_path: Path) -> None:
    """A qcow2 whose header names a host file as backing: QEMU opens the image alone."""
    secret = tmp_path / "host-secret.raw"
    secret.write_bytes(b"host-secret-marker".ljust(1024 * 1024, b"\0"))
    image = tmp_path / "os.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(secret), str(image)],
        check=True,
    )
    assert _info(image)["backing-filename"] == str(secret)  # the attack is in place
    socket_path = tmp_path / "qmp.sock"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-qmp", f"unix:{socket_path},server=on,wait=off"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with QmpClient.connect(socket_path) as qmp:
            qmp.execute("blockdev-add", blockdev_options(DiskSpec("os", image, encrypted=False)))
            nodes = qmp.execute("query-named-block-nodes")
    finally:
        qemu.kill()
        qemu.wait(timeout=10)
    opened = {node["file"] for node in nodes}
    assert str(image) in opened
    assert str(secret) not in opened
    assert all(node.get("backing_file_depth", 0) == 0 for node in nodes)
