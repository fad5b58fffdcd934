"""How fast is the template disk digest, next to sha256sum, openssl and the machine's limit?

Creates a file (default 2 GiB) in a temporary directory, reads it once so it sits
in the page cache, then in the same run times:

* ``sha256sum`` and ``openssl dgst -sha256`` of the file (one core each),
* guardfab's chunked Merkle digest (``measure_disk``, every core), in a child
  process so its peak RSS is its own, for the full file and for a small one
  (memory must be flat in the disk's size),
* the SHA-256 limit: ``openssl speed -evp sha256 -bytes 4194304`` times the cores.

Usage: ``.venv/bin/python bench/disk_digest.py [--size 512M] [--repeat 5]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from guardfab.tenant.template import DEFAULT_CHUNK_SIZE, default_workers

_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
_SMALL = 64 * 1024 * 1024

# VmHWM, not getrusage's ru_maxrss: Linux carries the parent's RSS at fork
# into the child's ru_maxrss across exec, which would count the bench's own buffers.
_CHILD = """
import json, sys, time
from pathlib import Path
from guardfab.tenant.template import measure_disk
start = time.perf_counter()
m = measure_disk(sys.argv[1])
elapsed = time.perf_counter() - start
status = Path("/proc/self/status").read_text()
rss_kib = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1])
print(json.dumps({"seconds": elapsed, "rss_kib": rss_kib, "root": m.digest.root.hex()}))
"""


def parse_size(text: str) -> int:
    """Parse '2G', '512M', '1048576' into bytes."""
    match = re.fullmatch(r"(\d+)([KMG]?)(i?B)?", text.strip().upper().replace("IB", ""))
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2)]


def make_file(path: Path, size: int) -> None:
    """Write ``size`` bytes of random data (64 MiB of it, repeated) and pull it into the cache."""
    block = os.urandom(min(size, 64 * 1024 * 1024))
    with path.open("wb") as handle:
        left = size
        while left:
            left -= handle.write(block[: min(left, len(block))])
    with path.open("rb") as handle:
        while handle.read(16 * 1024 * 1024):
            pass


def time_command(args: list[str], repeat: int) -> list[float]:
    """Wall-clock seconds of each of ``repeat`` runs of a command (output discarded)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def digest_in_child(path: Path) -> dict[str, float]:
    """Run measure_disk in a fresh interpreter: its time, peak RSS and root."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def openssl_speed_limit(cores: int) -> float:
    """Single-core SHA-256 bytes/s on 4 MiB blocks (openssl speed), times ``cores``."""
    out = subprocess.run(
        ["openssl", "speed", "-evp", "sha256", "-bytes", "4194304", "-seconds", "3"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = [row for row in out.splitlines() if row.lower().startswith("sha256")][-1]
    per_core = float(line.split()[-1].rstrip("k")) * 1000
    return per_core * cores


def row(name: str, size: int, times: list[float], limit: float | None = None) -> str:
    """One table row: median seconds and GB/s (best in brackets), share of the limit."""
    median, best = statistics.median(times), min(times)
    rate = size / median / 1e9
    text = f"{name:<34} {median:8.3f} s {rate:7.2f} GB/s  (best {size / best / 1e9:.2f})"
    if limit:
        text += f"  {100 * size / median / limit:5.1f}% of limit"
    return text


def main() -> None:
    """Create the file, run every measurement, print the table, delete the file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=parse_size, default=2 * 1024**3, help="e.g. 2G, 512M")
    parser.add_argument("--repeat", type=int, default=5, help="runs per tool (median shown)")
    args = parser.parse_args()
    cores = default_workers()
    workdir = Path(tempfile.mkdtemp(prefix="guardfab-bench-"))
    try:
        big, small = workdir / "disk.img", workdir / "small.img"
        make_file(big, args.size)
        make_file(small, min(_SMALL, args.size))
        limit = openssl_speed_limit(cores)
        sums = time_command(["sha256sum", str(big)], args.repeat)
        dgst = time_command(["openssl", "dgst", "-sha256", str(big)], args.repeat)
        runs = [digest_in_child(big) for _ in range(args.repeat)]
        small_run = digest_in_child(small)
    finally:
        shutil.rmtree(workdir)
    size = args.size
    print(f"file: {size / 1024**3:.2f} GiB from the page cache; cores: {cores}; "
          f"chunk {DEFAULT_CHUNK_SIZE // 1024**2} MiB; {args.repeat} runs each")  # fmt: skip
    print(row("sha256sum", size, sums))
    print(row("openssl dgst -sha256", size, dgst))
    print(row("guardfab template digest", size, [r["seconds"] for r in runs], limit))
    print(f"{'SHA-256 limit (openssl speed x ' + str(cores) + ')':<34} {'':10} "
          f"{limit / 1e9:7.2f} GB/s  ({limit / cores / 1e9:.2f} per core)")  # fmt: skip
    print(f"peak RSS of the digest process: {max(r['rss_kib'] for r in runs) / 1024:.1f} MiB "
          f"for {size / 1024**2:.0f} MiB, {small_run['rss_kib'] / 1024:.1f} MiB "
          f"for {min(_SMALL, size) / 1024**2:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
