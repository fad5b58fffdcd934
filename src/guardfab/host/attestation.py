"""The guarded host's side of attestation: build evidence, talk to the HGS.

Protocol (see ARCHITECTURE.md): ask for a challenge, bind the nonce and the host
encryption key into evidence (a TPM quote, or a signature by the registered
host key), post it; on ``ActivationRequired`` answer the MakeCredential
challenge with the TPM and attest again.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from joserfc.jwk import ECKey, RSAKey

from guardfab.attestation.binding import quote_qualifying_data
from guardfab.attestation.evidence import HostKeyEvidence, TpmEvidence, canonical_claims
from guardfab.attestation.signing import HOST_KEY_TYP, binding_payload
from guardfab.errors import FormatError, InvalidInputError, TransportError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.host.keys import FileSigner
from guardfab.host.signer import HostSigner, detached_jws
from guardfab.host.tpm import TpmDevice
from guardfab.tpm.constants import TpmAlg

#: A host answers at most this many activation challenges in one attempt.
MAX_ACTIVATIONS = 1


class HgsUnavailableError(TransportError):
    """The HGS did not answer, or answered with a server error."""

    hint = "check the HGS URL, that the HGS is running, and that this host trusts its CA"


class AttestationRefusedError(VerificationError):
    """The HGS examined the evidence and refused the host."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        failed = ", ".join(body.get("failed_policies") or []) or "see the checks below"
        checks = "; ".join(f"{f['check']}: {f['reason']}" for f in body.get("failures") or [])
        super().__init__(
            f"attestation refused: {body.get('status')} ({failed})"
            + (f"; {checks}" if checks else "")
        )


@dataclass(frozen=True)
class AttestationAnswer:
    """A successful attestation: the health certificate, its expiry and the full result."""

    health_certificate: str
    expires_at: int
    body: dict[str, Any]


class HgsAttestationClient:
    """HTTPS client for the host-facing attestation API (TLS verified against the HGS CA)."""

    def __init__(self, url: str, ca_file: Path, *, timeout: float = 15.0) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        self._http = httpx.Client(base_url=url.rstrip("/"), verify=context, timeout=timeout)
        self.url = url

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise HgsUnavailableError(
                f"HGS at {self.url} unreachable ({type(exc).__name__})"
            ) from exc
        if response.status_code >= 500:
            raise HgsUnavailableError(f"HGS at {self.url} answered {response.status_code}")
        try:
            payload: dict[str, Any] = response.json()
        except ValueError as exc:
            raise HgsUnavailableError(f"HGS at {self.url} answered non-JSON") from exc
        return response.status_code, payload

    def challenge(self) -> bytes:
        """A fresh nonce (raw bytes)."""
        status, body = self._post("/attestation/v1/challenge")
        if status != 200:
            raise HgsUnavailableError(f"challenge refused: {status}")
        return b64url_decode(body["nonce"], what="nonce")

    def attest(self, nonce: bytes, evidence: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Post evidence bound to ``nonce``; return the status code and body."""
        return self._post(
            "/attestation/v1/attest", {"nonce": b64url_encode(nonce), "evidence": evidence}
        )

    def activate(self, activation_id: str, secret: bytes) -> None:
        """Send the secret the TPM recovered with ActivateCredential."""
        status, body = self._post(
            "/attestation/v1/activate",
            {"activation_id": activation_id, "secret": b64url_encode(secret)},
        )
        if status != 200:
            raise AttestationRefusedError({"status": "ActivationFailed", "failures": [
                {"check": "activation", "reason": body.get("error", {}).get("message", "")}
            ]})  # fmt: skip


def tpm_evidence(
    tpm: TpmDevice, *, nonce: bytes, host_key: dict[str, Any], event_log: bytes
) -> TpmEvidence:
    """Evidence from this host's TPM: EK, AK, a quote bound to nonce + host key, the log."""
    ek = tpm.read_ek()
    ak = tpm.ensure_ak()
    quote = tpm.quote(quote_qualifying_data(nonce, host_key))
    return TpmEvidence(
        ek_public=ek.public,
        ek_certificate=ek.certificate,
        ak_public=ak.public,
        quote_attest=quote.attest,
        quote_signature=quote.signature,
        pcrs=quote.pcrs[TpmAlg.SHA256],
        event_log=event_log,
        host_key=host_key,
    )


def as_signer(signing_key: HostSigner | jose.AsymmetricKey) -> HostSigner:
    """A :class:`HostSigner` for ``signing_key`` (an in-memory JOSE key is wrapped)."""
    if isinstance(signing_key, ECKey | RSAKey):
        return FileSigner(signing_key)
    return signing_key


def host_key_evidence(
    signer: HostSigner | jose.AsymmetricKey, *, nonce: bytes, host_key: dict[str, Any]
) -> HostKeyEvidence:
    """Evidence in host-key mode: the registered key signs the nonce + host key binding.

    The signature is a compact JWS with a detached payload (RFC 7515 appendix F)
    over :func:`~guardfab.attestation.signing.binding_payload`, made by the
    signer wherever its key lives (a file or a PKCS#11 token).
    """
    signer = as_signer(signer)
    claims: dict[str, Any] = {}
    payload = binding_payload(nonce, host_key, canonical_claims(claims))
    signature = detached_jws(signer, payload, typ=HOST_KEY_TYP)
    return HostKeyEvidence(signer.key_id, signature, claims, host_key)


def _answer(status: int, body: dict[str, Any]) -> AttestationAnswer:
    if status == 200 and body.get("health_certificate"):
        return AttestationAnswer(body["health_certificate"], int(body["expires_at"]), body)
    if status in (400, 413, 422):
        message = body.get("error", {}).get("message", "invalid request")
        raise InvalidInputError(f"HGS rejected the request: {message}")
    raise AttestationRefusedError(body)


def attest_with_tpm(
    client: HgsAttestationClient, tpm: TpmDevice, *, host_key: dict[str, Any], event_log: bytes
) -> AttestationAnswer:
    """Attest with the TPM, answering one activation challenge on first contact."""
    for _ in range(MAX_ACTIVATIONS + 1):
        nonce = client.challenge()
        evidence = tpm_evidence(tpm, nonce=nonce, host_key=host_key, event_log=event_log)
        status, body = client.attest(nonce, evidence.to_dict())
        activation = body.get("activation") if status == 200 else None
        if activation is None:
            return _answer(status, body)
        secret = tpm.activate_credential(
            b64url_decode(activation["credential_blob"], what="credential blob"),
            b64url_decode(activation["encrypted_secret"], what="encrypted secret"),
        )
        client.activate(activation["activation_id"], secret)
    raise FormatError("the HGS asked for activation again after a successful activation")


def attest_with_host_key(
    client: HgsAttestationClient,
    signer: HostSigner | jose.AsymmetricKey,
    *,
    host_key: dict[str, Any],
) -> AttestationAnswer:
    """Attest in host-key mode."""
    nonce = client.challenge()
    evidence = host_key_evidence(signer, nonce=nonce, host_key=host_key)
    return _answer(*client.attest(nonce, evidence.to_dict()))
