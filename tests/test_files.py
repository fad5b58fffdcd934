"""Atomic file output: complete or absent, never half-written."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from guardfab.errors import UsageError
from guardfab.files import PRIVATE, PUBLIC, create_directory_atomically


def test_directory_is_created_with_its_files_and_modes(tmp_path: Path) -> None:
    target = tmp_path / "store" / "one"
    create_directory_atomically(target, {"key": (b"k", PRIVATE), "doc": (b"d", PUBLIC)})
    assert (target / "key").read_bytes() == b"k"
    assert stat.S_IMODE((target / "key").stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o700


def test_a_failure_midway_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "one"
    with pytest.raises(TypeError):
        create_directory_atomically(
            target,
            {"first": (b"ok", PUBLIC), "second": ("not bytes", PUBLIC)},  # type: ignore[dict-item]
        )
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_refused_and_kept(tmp_path: Path) -> None:
    target = tmp_path / "one"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(UsageError):
        create_directory_atomically(target, {"new": (b"n", PUBLIC)})
    assert [p.name for p in target.iterdir()] == ["keep"]
