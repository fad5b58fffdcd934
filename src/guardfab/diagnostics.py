"""What `hgs diagnose` and `host diagnose` report: checks, each with its status and fix.

Both commands print the same text layout and the same JSON shape, so an operator
(or a monitoring job parsing ``--json``) reads them the same way:

    {"ok": bool, "counts": {"OK": n, "WARN": n, "FAIL": n, "SKIP": n},
     "checks": [{"check": name, "status": "OK", "message": ..., "fix": ...}, ...]}
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


class Status(enum.StrEnum):
    """The outcome of one check."""

    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Check:
    """One check's outcome, what was found, and the fix when it is not OK."""

    name: str
    status: Status
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {
            "check": self.name,
            "status": self.status.value,
            "message": self.message,
            "fix": self.fix,
        }


def ok(name: str, message: str) -> Check:
    """A check that passed."""
    return Check(name, Status.OK, message)


def fail(name: str, message: str, fix: str) -> Check:
    """A check that failed, with how to fix it."""
    return Check(name, Status.FAIL, message, fix)


def warn(name: str, message: str, fix: str) -> Check:
    """A check that passed with a warning, with what to do about it."""
    return Check(name, Status.WARN, message, fix)


def skip(name: str, why: str) -> Check:
    """A check that could not run (an earlier one failed, or it does not apply)."""
    return Check(name, Status.SKIP, f"not checked: {why}")


def passed(checks: Iterable[Check]) -> bool:
    """True when no check failed (warnings allowed)."""
    return all(check.status is not Status.FAIL for check in checks)


def counts(checks: Iterable[Check]) -> dict[str, int]:
    """How many checks ended in each status (every status present)."""
    found = {status.value: 0 for status in Status}
    for check in checks:
        found[check.status.value] += 1
    return found


def report_dict(checks: Sequence[Check], **context: Any) -> dict[str, Any]:
    """The JSON report: ``context`` members first, then ok, counts and every check."""
    return {
        **context,
        "ok": passed(checks),
        "counts": counts(checks),
        "checks": [check.to_dict() for check in checks],
    }


def report_text(title: str, checks: Sequence[Check]) -> str:
    """One line per check, the fix under each that is not OK, and a summary line."""
    lines = [title]
    for check in checks:
        lines.append(f"{check.status.value:<4} {check.name}: {check.message}")
        if check.fix and check.status is not Status.OK:
            lines.append(f"     fix: {check.fix}")
    found = counts(checks)
    lines.append(
        f"{len(checks)} checks: {found['FAIL']} failed, {found['WARN']} warning(s), "
        f"{found['SKIP']} not checked"
    )
    return "\n".join(lines)
