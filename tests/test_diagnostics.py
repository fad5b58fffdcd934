"""The report both diagnose commands print: one JSON shape and one text layout."""

from __future__ import annotations

from guardfab import diagnostics as diag
from guardfab.diagnostics import Status

CHECKS = [
    diag.ok("config", "host.json is valid"),
    diag.warn("clock", "12 s from the HGS", "run an NTP client"),
    diag.fail("tpm", "cannot open the TPM", "start the TPM resource manager"),
    diag.skip("ak", "the TPM did not open"),
]


def test_the_json_report_counts_every_status_and_keeps_every_check() -> None:
    report = diag.report_dict(CHECKS, config="/etc/guardfab/host.json")
    assert report == {
        "config": "/etc/guardfab/host.json",
        "ok": False,
        "counts": {"OK": 1, "WARN": 1, "FAIL": 1, "SKIP": 1},
        "checks": [check.to_dict() for check in CHECKS],
    }
    assert report["checks"][1] == {
        "check": "clock",
        "status": "WARN",
        "message": "12 s from the HGS",
        "fix": "run an NTP client",
    }
    assert diag.counts([])["FAIL"] == 0


def test_warnings_and_skips_do_not_fail_a_report() -> None:
    assert diag.passed([c for c in CHECKS if c.status is not Status.FAIL]) is True
    assert diag.passed(CHECKS) is False


def test_the_text_shows_a_fix_under_every_check_that_is_not_ok() -> None:
    text = diag.report_text("host diagnose: host.json", CHECKS).splitlines()
    assert text == [
        "host diagnose: host.json",
        "OK   config: host.json is valid",
        "WARN clock: 12 s from the HGS",
        "     fix: run an NTP client",
        "FAIL tpm: cannot open the TPM",
        "     fix: start the TPM resource manager",
        "SKIP ak: not checked: the TPM did not open",
        "4 checks: 1 failed, 1 warning(s), 1 not checked",
    ]


def test_an_ok_check_never_shows_a_fix() -> None:
    text = diag.report_text("t", [diag.Check("a", Status.OK, "fine", fix="never shown")])
    assert "never shown" not in text
