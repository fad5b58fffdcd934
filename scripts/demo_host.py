"""Stand-in hardware for the demo: a guarded host's TPM and its measured boot.

A real guarded host has a TPM and firmware that measured its boot into the
TPM's PCRs and into the event log at
``/sys/kernel/security/tpm0/binary_bios_measurements``. For the demo, this
script manufactures an swtpm with an EK certificate (its own local CA, like a
TPM vendor's), starts it on 127.0.0.1, replays a synthetic UEFI boot into its
PCRs and writes that boot's event log where the host configuration points. It is
a demo aid, not part of the product; what it uses comes from guardfab.softhost,
so it runs from the runtime virtualenv (no pytest, nothing from tests/).

    python scripts/demo_host.py start DIR [--boot golden|tampered]   # prints the TCTI
    python scripts/demo_host.py stop DIR
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from guardfab.host.tpm import HostTpm
from guardfab.softhost.boot import CI_POLICY_FILE, Boot
from guardfab.softhost.swtpm import (
    free_port_pair,
    manufacture,
    simulate_measured_boot,
    write_configs,
)

BOOTS = {"golden": Boot(), "tampered": Boot(extra_app=b"unexpected.efi")}


def start(directory: Path, boot: str) -> None:
    """Manufacture and start the TPM, measure the boot, write the log and CI policy."""
    # swtpm --daemon changes to /, so every path it is given must be absolute.
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=False)
    setup, _ca = write_configs(directory / "vendor")
    manufacture(directory / "tpm", setup, directory / "swtpm-setup.log")
    port = free_port_pair()
    subprocess.run(
        ["swtpm", "socket", "--tpm2", "--daemon", "--pid", f"file={directory / 'swtpm.pid'}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
         "--tpmstate", f"dir={directory / 'tpm'}", "--flags", "startup-clear",
         "--log", f"file={directory / 'swtpm.log'}"],
        check=True, timeout=30,
    )  # fmt: skip
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    _wait(port)
    log = BOOTS[boot].log_bytes()
    with HostTpm(tcti) as tpm:
        simulate_measured_boot(tpm, log)
    (directory / "binary_bios_measurements").write_bytes(log)
    (directory / "ima-policy").write_bytes(CI_POLICY_FILE)
    (directory / "tcti").write_text(tcti + "\n")
    print(tcti)


def _wait(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port + 1), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("swtpm did not start")


def stop(directory: Path) -> None:
    """Stop the TPM started in ``directory`` (if it runs)."""
    pid_file = directory / "swtpm.pid"
    if pid_file.is_file():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
        pid_file.unlink(missing_ok=True)


def main() -> None:
    """Parse the command line and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("start", help="manufacture, start and boot a host TPM in DIR")
    run.add_argument("directory", type=Path)
    run.add_argument("--boot", choices=sorted(BOOTS), default="golden")
    halt = sub.add_parser("stop", help="stop the host TPM of DIR")
    halt.add_argument("directory", type=Path)
    args = parser.parse_args()
    if args.command == "start":
        start(args.directory, args.boot)
    else:
        stop(args.directory)


if __name__ == "__main__":
    main()
