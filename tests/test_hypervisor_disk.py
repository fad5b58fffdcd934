"""LUKS images made by qemu-img with keys passed by pipe: encrypted, nothing left in clear."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from guardfab.errors import UsageError
from guardfab.hypervisor.disk import (
    DiskKey,
    create_encrypted_blank,
    create_encrypted_copy,
    create_encrypted_from_bytes,
)
from guardfab.hypervisor.errors import HypervisorError
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
