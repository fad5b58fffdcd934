"""Shared fixtures: a private guardfab home per test, guardians generated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardfab.formats.guardian import KeyAlgorithm
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys

# Fixtures that start real processes (an HGS over HTTPS) live in their own module.
pytest_plugins = ["hgs_harness"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty guardfab home, also set as $GUARDFAB_HOME for CLI calls."""
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("GUARDFAB_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def guardian_keys() -> dict[str, GuardianKeys]:
    """A few EC guardians, made once per test session (key generation is the slow part)."""
    return {
        name: new_guardian_keys(name, KeyAlgorithm.EC_P256)
        for name in ("owner", "fabric", "fabric2", "mallory")
    }
