"""The demo's software host runs from the runtime virtualenv: no pytest, nothing from tests/.

``scripts/demo.sh`` installs only requirements.lock, so ``scripts/demo_host.py``
and :mod:`guardfab.softhost` must not need the test harness. Each check runs in
a fresh interpreter whose import system refuses the development-only packages
and every module that lives under tests/ (even after a script puts tests/ on
sys.path, as demo_host.py once did), so it fails the day either comes back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from guardfab.host.tpm import HostTpm
from guardfab.softhost.boot import CI_POLICY_FILE, Boot

ROOT = Path(__file__).resolve().parent.parent
DEMO_HOST = ROOT / "scripts" / "demo_host.py"

#: Run before the code under test: a meta path finder that refuses what the demo must not need.
GUARD = f"""
import importlib.machinery, pathlib, sys
TESTS = pathlib.Path({str(ROOT / "tests")!r})
DEV_ONLY = {{"pytest", "_pytest", "hypothesis", "pluggy", "iniconfig", "xdist", "mypy", "ruff",
            "schemathesis", "atheris", "swtpm_harness", "test_attestation_fixtures",
            "test_eventlog_builder"}}

class RefuseTestHarness:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in DEV_ONLY:
            raise ModuleNotFoundError(f"the demo imported {{name}} (development only)")
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        origin = getattr(spec, "origin", None)
        if origin and pathlib.Path(origin).resolve().is_relative_to(TESTS):
            raise ModuleNotFoundError(f"the demo imported {{name}} from tests/")
        return None

sys.meta_path.insert(0, RefuseTestHarness)
sys.path = [p for p in sys.path if p and not pathlib.Path(p).resolve().is_relative_to(TESTS)]
"""


def run_guarded(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` after GUARD in an isolated interpreter (-I: no PYTHONPATH, no cwd on path)."""
    return subprocess.run(
        [sys.executable, "-I", "-c", GUARD + code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_demo_host(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run scripts/demo_host.py as ``__main__`` with ``args``, under the guard."""
    code = (
        f"import runpy; sys.argv = [{str(DEMO_HOST)!r}, *{list(args)!r}]; "
        f"runpy.run_path({str(DEMO_HOST)!r}, run_name='__main__')"
    )
    return run_guarded(code, cwd)


@pytest.mark.parametrize(
    "code",
    [
        "import pytest",
        "import hypothesis",
        f"sys.path.insert(0, {str(ROOT / 'tests')!r}); import hgs_harness",
        f"sys.path.insert(0, {str(ROOT / 'tests')!r}); import swtpm_harness",
    ],
)
def test_the_guard_refuses_the_test_harness(tmp_path: Path, code: str) -> None:
    """The check below is only worth something if the guard really refuses these."""
    result = run_guarded(code, tmp_path)
    assert result.returncode != 0
    assert "ModuleNotFoundError" in result.stderr


def test_softhost_imports_without_the_test_harness(tmp_path: Path) -> None:
    result = run_guarded(
        "import guardfab.softhost.swtpm\n"
        "from guardfab.softhost.boot import Boot\n"
        "print(len(Boot().log_bytes()))",
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(Boot().log_bytes())


def test_demo_host_help_runs_without_the_test_harness(tmp_path: Path) -> None:
    result = run_demo_host(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    assert "start" in result.stdout
    assert "stop" in result.stdout


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_demo_host_starts_a_measured_tpm_without_the_test_harness(tmp_path: Path) -> None:
    """start: a TPM whose PCRs hold its log's boot, with an EK certificate from the vendor CA."""
    host = tmp_path / "host-a"
    result = run_demo_host(tmp_path, "start", str(host), "--boot", "golden")
    pid_file = host / "swtpm.pid"
    pid = int(pid_file.read_text()) if pid_file.is_file() else 0
    try:
        assert result.returncode == 0, result.stderr
        tcti = (host / "tcti").read_text().strip()
        assert result.stdout.strip() == tcti
        assert tcti.startswith("swtpm:host=127.0.0.1,")
        assert (host / "binary_bios_measurements").read_bytes() == Boot().log_bytes()
        assert (host / "ima-policy").read_bytes() == CI_POLICY_FILE
        with HostTpm(tcti) as tpm:
            assert tpm.read_pcrs(range(10)) == Boot().pcrs()
            certificate = tpm.read_ek().certificate
        assert certificate is not None
        issuer = (host / "vendor" / "ca" / "issuercert.pem").read_bytes()
        x509.load_der_x509_certificate(certificate).verify_directly_issued_by(
            x509.load_pem_x509_certificate(issuer)
        )
    finally:
        stopped = run_demo_host(tmp_path, "stop", str(host))
        gone = _wait_gone(pid) if pid else True
        if not gone:
            os.kill(pid, signal.SIGKILL)
    assert stopped.returncode == 0, stopped.stderr
    assert pid, "start wrote no swtpm.pid"
    assert gone, "stop left swtpm running"
    assert not pid_file.exists()
