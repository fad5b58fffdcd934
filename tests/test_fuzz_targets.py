"""Run every atheris fuzz target under fuzz/ briefly, so CI catches crashes.

Each target is a script ``fuzz/fuzz_*.py``; a crash makes atheris exit
non-zero. Longer campaigns: ``.venv/bin/python fuzz/fuzz_X.py -max_total_time=600``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"
TARGETS = sorted(FUZZ_DIR.glob("fuzz_*.py"))
TARGETS = [t for t in TARGETS if t.name != "fuzz_common.py"]
RUNS = os.environ.get("GUARDFAB_FUZZ_RUNS", "3000")


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=[t.stem for t in TARGETS])
def test_fuzz_target_finds_no_crash(target: Path, tmp_path: Path) -> None:
    corpus = FUZZ_DIR / "corpus" / target.stem.removeprefix("fuzz_")
    args = [sys.executable, str(target), f"-runs={RUNS}", "-max_total_time=60"]
    if corpus.is_dir():
        # Copy the seeds: libFuzzer writes new inputs into the first corpus dir.
        work = tmp_path / "corpus"
        work.mkdir()
        for seed in corpus.iterdir():
            (work / seed.name).write_bytes(seed.read_bytes())
        args.append(str(work))
    env = {**os.environ, "PYTHONPATH": str(FUZZ_DIR)}
    result = subprocess.run(
        args, check=False, capture_output=True, text=True, env=env, timeout=180, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done" in result.stderr or "DONE" in result.stderr, result.stderr[-2000:]


def test_there_are_fuzz_targets() -> None:
    assert TARGETS, "no fuzz targets found under fuzz/"
