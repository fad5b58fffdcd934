"""An swtpm manufactured like a TPM maker would, and a measured boot replayed into its PCRs.

``swtpm_setup --create-ek-cert --create-platform-cert`` with a local CA of the
caller's own (never the system's ``/var/lib/swtpm-localca``) gives a TPM whose EK
certificate an HGS can verify against that CA, the way it verifies a TPM
vendor's. :func:`simulate_measured_boot` then extends the PCRs as the firmware
that wrote a given event log would have.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from guardfab.host.tpm import TpmDevice
from guardfab.tpm.eventlog import parse_event_log
from guardfab.tpm.events import EventType

#: PCR banks the TPMs allocate: SHA-1 and SHA-256, like most firmware TPMs.
PCR_BANKS = "sha1,sha256"
#: Seconds swtpm_setup may take to manufacture one TPM (about one is usual).
MANUFACTURE_TIMEOUT = 60


@dataclass(frozen=True)
class LocalCa:
    """The local TPM vendor CA: what an HGS admin would trust for EK certificates."""

    directory: Path

    @property
    def root_pem(self) -> bytes:
        """The self-signed root certificate (PEM)."""
        return (self.directory / "swtpm-localca-rootca-cert.pem").read_bytes()

    @property
    def intermediate_pem(self) -> bytes:
        """The issuing CA certificate that signs the EK certificates (PEM)."""
        return (self.directory / "issuercert.pem").read_bytes()


def write_configs(workdir: Path) -> tuple[Path, LocalCa]:
    """Write swtpm_setup and swtpm-localca configs whose CA lives under ``workdir``.

    Returns:
        The swtpm_setup config to pass to :func:`manufacture`, and the CA (its
        files appear when the first TPM is manufactured).
    """
    ca_dir = workdir / "ca"
    ca_dir.mkdir(parents=True)
    localca = workdir / "swtpm-localca.conf"
    localca.write_text(
        f"statedir = {ca_dir}\n"
        f"signingkey = {ca_dir / 'signkey.pem'}\n"
        f"issuercert = {ca_dir / 'issuercert.pem'}\n"
        f"certserial = {ca_dir / 'certserial'}\n"
    )
    options = workdir / "swtpm-localca.options"
    options.write_text(
        "--platform-manufacturer guardfab-test\n--platform-version 2.1\n--platform-model swtpm\n"
    )
    setup = workdir / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {localca}\n"
        f"create_certs_tool_options = {options}\n"
        f"active_pcr_banks = {PCR_BANKS}\n"
    )
    return setup, LocalCa(ca_dir)


def manufacture(state_dir: Path, setup_config: Path, log: Path) -> None:
    """Manufacture a TPM 2.0 into ``state_dir``: EKs, EK and platform certificates, locked NV.

    Raises:
        RuntimeError: swtpm_setup failed (its log is quoted).
    """
    state_dir.mkdir(parents=True)
    argv = [
        "swtpm_setup",
        "--tpm2",
        "--create-ek-cert",
        "--create-platform-cert",
        "--lock-nvram",
        "--pcr-banks",
        PCR_BANKS,
        "--tpmstate",
        str(state_dir),
        "--config",
        str(setup_config),
        "--logfile",
        str(log),
    ]
    # A fixed argument list from the PATH's swtpm_setup, as its packagers install it.
    result = subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, timeout=MANUFACTURE_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed ({result.returncode}): {log.read_text()}")


def free_port_pair() -> int:
    """Return a port P such that P and P + 1 were both free on 127.0.0.1 (swtpm's two sockets)."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def simulate_measured_boot(tpm: TpmDevice, event_log: bytes) -> dict[int, dict[int, bytes]]:
    """Extend the TPM's PCRs as the firmware that wrote ``event_log`` did.

    Every event but EV_NO_ACTION (never extended) is extended with its digests in
    every bank the TPM has allocated, using guardfab's own parser, so afterwards
    the TPM's PCRs equal the log's replay. Returns that replay for the banks the
    TPM and the log share.

    Raises:
        ValueError: the log starts PCR 0 at a locality other than 0, which an
            extend from software cannot reproduce.
    """
    log = parse_event_log(event_log)
    if log.startup_locality:
        raise ValueError(f"the log starts at locality {log.startup_locality}; cannot simulate")
    banks = set(tpm.pcr_banks())
    for event in log.events:
        if event.event_type == EventType.EV_NO_ACTION:
            continue
        digests = {bank: digest for bank, digest in event.digests.items() if bank in banks}
        if digests:
            tpm.extend(event.pcr, digests)
    return log.replay([bank for bank in log.replayable_banks if bank in banks])
