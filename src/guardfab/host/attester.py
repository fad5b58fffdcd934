"""How this host proves its health: one attempt against one HGS, per attestation mode.

An :class:`Attester` turns an :class:`~guardfab.host.attestation.HgsAttestationClient`
into an :class:`~guardfab.host.attestation.AttestationAnswer`. The agent decides
when and against which HGS; the attester only builds the evidence. In TPM mode
the TPM is opened for each attempt and closed after it: opening flushes whatever
an earlier crashed run left loaded, and between attempts the TPM stays free for
``guardfab host diagnose`` or ``host identity``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from guardfab.attestation.evidence import MAX_EVENT_LOG_BYTES
from guardfab.errors import UsageError
from guardfab.files import read_bounded
from guardfab.formats import jose
from guardfab.host.attestation import (
    AttestationAnswer,
    HgsAttestationClient,
    as_signer,
    attest_with_host_key,
    attest_with_tpm,
)
from guardfab.host.config import HostConfig, HostMode
from guardfab.host.keys import load_or_create_key, public_jwk
from guardfab.host.signer import HostSigner, open_signer
from guardfab.host.tpm import HostTpm, TpmDevice

TpmOpener = Callable[[], TpmDevice]


class Attester(Protocol):
    """Builds evidence and attests once; the agent owns scheduling and failover."""

    @property
    def ak_name(self) -> str | None:
        """The AK Name (hex) the last attempt used, for status and diagnose (TPM mode)."""

    def attest(self, client: HgsAttestationClient) -> AttestationAnswer:
        """Attest to the HGS behind ``client``.

        Raises:
            HgsUnavailableError: the HGS did not answer (try another).
            AttestationRefusedError: the HGS refused the host (``.body`` says why).
            GuardfabError: this host could not build its evidence (TPM, log, keys).
        """


def read_event_log(path: Path) -> bytes:
    """The boot event log, bounded as the HGS bounds it.

    Raises:
        UsageError: the log is missing or unreadable (securityfs not mounted, no TPM
            driver, not root).
    """
    try:
        return read_bounded(path, limit=MAX_EVENT_LOG_BYTES, what="TCG event log")
    except UsageError as exc:
        raise UsageError(
            str(exc),
            hint="mount securityfs (/sys/kernel/security), load the TPM driver, run as root, "
            "or set 'event_log' in the host configuration",
        ) from exc


class TpmAttester:
    """TPM mode: a quote bound to the nonce and host key, the event log, the EK and AK."""

    def __init__(self, open_tpm: TpmOpener, event_log: Path, host_key: dict[str, Any]) -> None:
        self._open_tpm = open_tpm
        self._event_log = event_log
        self._host_key = host_key
        self._ak_name: str | None = None

    @property
    def ak_name(self) -> str | None:
        """The AK Name (hex) of the last attempt."""
        return self._ak_name

    def attest(self, client: HgsAttestationClient) -> AttestationAnswer:
        """Attest with the TPM, answering an activation challenge on first contact."""
        log = read_event_log(self._event_log)
        tpm = self._open_tpm()
        try:
            self._ak_name = tpm.ensure_ak().name.hex()
            return attest_with_tpm(client, tpm, host_key=self._host_key, event_log=log)
        finally:
            tpm.close()


class HostKeyAttester:
    """Host-key mode: the registered signing key (a file or a token key) signs the binding."""

    def __init__(self, signer: HostSigner | jose.AsymmetricKey, host_key: dict[str, Any]) -> None:
        self._signer = as_signer(signer)
        self._host_key = host_key

    @property
    def ak_name(self) -> str | None:
        """Host-key mode has no AK."""
        return None

    def attest(self, client: HgsAttestationClient) -> AttestationAnswer:
        """Attest with the host signing key."""
        return attest_with_host_key(client, self._signer, host_key=self._host_key)


def tpm_opener(config: HostConfig) -> TpmOpener:
    """A function opening the configured TPM (TCTI, AK handle, EK profile)."""
    return lambda: HostTpm(config.tcti, ak_handle=config.ak_handle, ek_profile=config.ek_profile)


def load_host_key(path: Path, what: str) -> jose.AsymmetricKey:
    """Load a host key that ``guardfab host configure`` created (never create one here).

    The agent must not invent a signing key the HGS never registered, nor a new
    encryption key behind the back of a cached certificate that names the old one.

    Raises:
        UsageError: the key is missing or readable by others.
        FormatError: the file is not a PEM private key.
    """
    if not path.exists():
        raise UsageError(
            f"the {what} {path} does not exist",
            hint="run 'guardfab host configure' to create it (then register the identity)",
        )
    return load_or_create_key(path)


def make_attester(config: HostConfig, encryption_key: jose.AsymmetricKey) -> Attester:
    """The attester for the configured mode.

    Raises:
        UsageError, FormatError: the host signing key is missing or unreadable (a
            missing key file, a PKCS#11 token that refuses the PIN or lacks the key).
        TransportError: the PKCS#11 token could not be used.
    """
    host_key = public_jwk(encryption_key)
    if config.mode is HostMode.TPM:
        return TpmAttester(tpm_opener(config), config.event_log, host_key)
    if config.signing_key is None:  # HostConfig refuses this already
        raise UsageError("host-key mode needs a signing key")
    return HostKeyAttester(open_signer(config.signing_key), host_key)
