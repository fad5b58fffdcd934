"""A served HGS worker freezes its start-up heap, so full collections stay short.

Run in a fresh interpreter: freezing is process-wide and must not touch the test
process. Measured before the change: every full collection in a serving worker
walked the whole start-up heap (30-100 ms; bench/README.md, round 6).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_PROBE = """
import gc, json
from guardfab.hgs.server import app_from_environment
app_from_environment()
print(json.dumps({"frozen": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""


def test_a_worker_app_leaves_its_startup_heap_out_of_collections(tmp_path: Path) -> None:
    directory = tmp_path / "hgs"
    cli = [sys.executable, "-m", "guardfab", "hgs", "init", "--dir", str(directory)]
    subprocess.run([*cli, "--name", "heap-test"], check=True, capture_output=True)
    env = {**os.environ, "GUARDFAB_HGS_DIR": str(directory)}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, check=True, capture_output=True, text=True
    )
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["frozen"] > 20_000  # modules, FastAPI, pydantic, the app's keys
    assert counts["tracked"] < 1_000  # what a full collection still walks
