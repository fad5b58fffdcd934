"""The benchmarks still run: each script once, as briefly as it allows, checking its output's shape.

The benches are the evidence for the speed goals of issues 3, 4 and 6, and
none of them runs otherwise in CI, so a library change could break one
unnoticed (session 3: ``bench/power_on.py`` still called ``provision()`` without
the keyword that had become required). Nothing here reads a rate or a time:
the numbers belong to ``bench/README.md``, measured on a quiet machine.
``verify_core.py`` is left out: it installs Keylime in its own venv.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BRIEF_HGS = ["--duration", "1", "--clients", "1", "--connections", "2"]


def run_bench(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize(
    ("mode", "rows", "goal"),
    [
        ("attest", ["host-key max load", "host-key half load"], "goal (issue 3):"),
        ("release", ["release max load", "release half load"], "goal (issue 4):"),
    ],
)
def test_hgs_throughput_runs(mode: str, rows: list[str], goal: str) -> None:
    phases = ["--phases", "host-key"] if mode == "attest" else []
    out = run_bench("bench/hgs_throughput.py", "--mode", mode, *BRIEF_HGS, *phases)
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("phase"))
    errors_end = header.index("errors") + len("errors")  # a right-aligned column
    for row in rows:
        line = next((line for line in lines if line.startswith(row)), None)
        assert line is not None, out
        assert line[:errors_end].split()[-1] == "0", f"errors in {line!r}"
    assert any(line.startswith(goal) for line in lines), out
    if mode == "release":  # the answers were unwrapped with the host key and checked
        assert "answers unwrapped with the host key and checked" in out


def test_power_on_runs() -> None:
    out = run_bench("bench/power_on.py", "--runs", "1")
    assert "shielding adds" in out
