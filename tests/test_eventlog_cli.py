"""``guardfab eventlog``: the human listing, the JSON shape, PCR filters and errors."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from guardfab.cli.main import cli
from test_eventlog_builder import vectors_fixture  # noqa: F401 (the vectors fixture)


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["eventlog", *args])
    return result.exit_code, result.stdout, result.stderr


def test_human_listing(vectors: Path) -> None:
    code, out, _ = _run(str(vectors / "event-sd-boot-fedora37.bin"))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "crypto-agile event log, 28 events, banks: sha256"
    assert any(
        "EV_EFI_VARIABLE_DRIVER_CONFIG" in line and "SecureBoot: disabled" in line for line in lines
    )
    assert "PCRs (sha256):" in lines
    assert "  12  73b2090e3e72430531e7bc7d63e88826891ef4e04d6c1e250dc5c52db24f2f48" in lines
    assert any(line.startswith("  secure_boot ") and "false" in line for line in lines)
    assert any(line.startswith("  hibernation_disabled ") and "unknown" in line for line in lines)


def test_verbose_shows_full_digests_and_fields(vectors: Path) -> None:
    code, out, _ = _run("--verbose", "--pcr", "5", str(vectors / "event-arch-linux.bin"))
    assert code == 0
    assert "sha256: dcc6b7eaf2b013c6a37c720fe1d5098b5daf56ac9922f222125df7a1126b9596" in out
    assert "partitions:" in out
    assert "EV_EFI_VARIABLE_DRIVER_CONFIG" not in out


def test_json_shape(vectors: Path) -> None:
    code, out, _ = _run("--json", str(vectors / "event-gce-ubuntu-2104-log.bin"))
    assert code == 0
    doc = json.loads(out)
    assert set(doc) == {"events", "pcrs", "facts"}
    assert set(doc["pcrs"]) == {"sha1", "sha256", "sha384"}
    assert doc["pcrs"]["sha256"]["14"] == (
        "8351c65483c5419079e8c96758dd2130bee075d71fea226f68ec4eb5bfc71983"
    )
    assert doc["facts"]["secure_boot"] is False
    assert doc["facts"]["separators_ok"] is True
    event = doc["events"][3]
    assert event["pcr"] == 7
    assert event["type"] == "EV_EFI_VARIABLE_DRIVER_CONFIG"
    assert event["digests"]["sha1"] == "57cd4dc19442475aa82743484f3b1caa88e142b8"
    assert event["data"]["name"] == "SecureBoot"
    assert event["digest_verified"] is True
    assert doc["events"][23]["digest_verified"] is None  # an image: digest not of the data


def test_json_pcr_filter(vectors: Path) -> None:
    code, out, _ = _run("--json", "--pcr", "7", "--pcr", "0", str(vectors / "event-arch-linux.bin"))
    assert code == 0
    doc = json.loads(out)
    assert {e["pcr"] for e in doc["events"]} == {0, 7}
    assert set(doc["pcrs"]["sha256"]) == {"0", "7"}
    assert doc["facts"]["separators_ok"] is True  # facts always read the whole log


def test_truncated_log_is_one_error_with_the_offset(vectors: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.bin"
    cut.write_bytes((vectors / "event-arch-linux.bin").read_bytes()[:200])
    code, out, err = _run(str(cut))
    assert code == 1
    assert out == ""
    assert "error: event log truncated in event 2 (offset 157): no room for a 32-byte sha256" in err
    assert "hint:" in err


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = _run(str(tmp_path / "absent.bin"))
    assert code == 2
    assert "cannot read event log" in err


def test_pcr_out_of_range_is_refused(vectors: Path) -> None:
    code, _, err = _run("--pcr", "24", str(vectors / "event.bin"))
    assert code == 2
    assert "24" in err
