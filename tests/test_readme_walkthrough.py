"""The README walkthrough runs as written, so the docs cannot rot.

The demo (scripts/demo.sh) runs the same extracted commands.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from walkthrough import extract  # noqa: E402

from hgs_harness import free_port  # noqa: E402


@pytest.mark.slow
def test_readme_walkthrough_runs(tmp_path: Path) -> None:
    script = extract((ROOT / "README.md").read_text(encoding="utf-8"))
    (tmp_path / "walkthrough.sh").write_text(script)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "GUARDFAB_HOME": str(tmp_path / "home"),
        "GUARDFAB_REPO": str(ROOT),
        "GUARDFAB_DEMO_PORT": str(free_port()),
    }
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "walkthrough.sh"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_extract_requires_markers() -> None:
    with pytest.raises(SystemExit):
        extract("no markers here")
    text = "<!-- walkthrough:start -->\n```sh\necho one\n```\n<!-- walkthrough:end -->\n"
    assert extract(text) == "echo one\n"
