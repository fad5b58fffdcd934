"""The guarded host's key request: ask a KPS over HTTPS, verify its answer, unwrap the keys.

Power-on steps 5 to 7 seen from the host: post the health certificate and the
VM's key protector to ``/keyprotection/v1/release``; the KPS answers the VM's
current and new transport keys, encrypted to the host encryption key, and the
egress KP. :func:`guardfab.keyprotection.unwrap_release` checks that the answer
is signed by a KPS guardian of the KP's own (owner-signed) guardian set, that the
egress KP is the successor of the KP sent, and only then decrypts.

The HTTP exchange sits behind :class:`KpsTransport`, so the logic is tested
with an in-memory transport; every failure to talk to the KPS becomes a
:class:`KpsUnreachableError` (try the fallback HGS), every refusal a
:class:`KeyReleaseRefusedError` carrying the KPS's status and reason (401 means:
attest again, then ask again).

Provisioning asks the same KPS, with the same certificate, to open a VM's
shielding data (PDK): :func:`request_shielding_secrets` posts it to
``/keyprotection/v1/shielding-data/open``, and
:func:`guardfab.keyprotection.open_shielding_answer` checks that the answer is
signed by a KPS guardian the PDK's owner named and bound to that PDK and that
certificate before it decrypts the secrets with the host encryption key.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Protocol

import httpx

from guardfab.errors import InvalidInputError, TransportError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_encode
from guardfab.formats.key_protector import TransportKey, load_key_protector
from guardfab.formats.shielding_data import load_shielding_data
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.keyprotection import ReleasedKeys, open_shielding_answer, unwrap_release
from guardfab.keyprotection.shielding_host import certificate_id_of

RELEASE_PATH = "/keyprotection/v1/release"
OPEN_SHIELDING_DATA_PATH = "/keyprotection/v1/shielding-data/open"


class KpsUnreachableError(TransportError):
    """The KPS did not answer, or failed while answering (5xx)."""

    hint = "check the HGS URL and CA, that the HGS runs, or use the fallback HGS"


class KeyReleaseRefusedError(InvalidInputError):
    """The KPS examined the request and refused it.

    Attributes:
        status: the HTTP status (401 certificate, 403 revoked host, 404 KP or
            PDK for another fabric, 409 rollback/replay, 422 tampered KP or PDK).
        reason: the KPS's stable reason token, e.g. ``certificate-expired``.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        hint: str | None,
        *,
        request: str = "the release",
    ) -> None:
        super().__init__(f"the KPS refused {request} ({status} {reason}): {message}", hint=hint)
        self.status = status
        self.reason = reason


class KpsTransport(Protocol):
    """Posts one request to a KPS; returns the status code and the JSON body."""

    def post_release(self, body: dict[str, Any]) -> tuple[int, Any]:
        """Send ``body`` to the release endpoint.

        Raises:
            KpsUnreachableError: no answer, a 5xx, or a non-JSON answer.
        """
        ...

    def post_open_shielding_data(self, body: dict[str, Any]) -> tuple[int, Any]:
        """Send ``body`` to the shielding data endpoint (raises as :meth:`post_release`)."""
        ...


class HttpsKpsTransport:
    """The real transport: HTTPS verified against the HGS CA."""

    def __init__(self, url: str, ca_file: Path, *, timeout: float = 15.0) -> None:
        context = ssl.create_default_context(cafile=str(ca_file))
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, verify=context, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def post_release(self, body: dict[str, Any]) -> tuple[int, Any]:
        """See :meth:`KpsTransport.post_release`."""
        return self._post(RELEASE_PATH, body)

    def post_open_shielding_data(self, body: dict[str, Any]) -> tuple[int, Any]:
        """See :meth:`KpsTransport.post_open_shielding_data`."""
        return self._post(OPEN_SHIELDING_DATA_PATH, body)

    def _post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        try:
            response = self._http.post(path, json=body)
        except httpx.HTTPError as exc:
            raise KpsUnreachableError(
                f"KPS at {self.url} unreachable ({type(exc).__name__})"
            ) from None
        if response.status_code >= 500:
            raise KpsUnreachableError(f"KPS at {self.url} answered {response.status_code}")
        try:
            return response.status_code, response.json()
        except ValueError:
            raise KpsUnreachableError(f"KPS at {self.url} answered non-JSON") from None


def release_keys(
    transport: KpsTransport,
    health_certificate: str,
    kp: bytes,
    host_private_key: jose.AsymmetricKey,
) -> ReleasedKeys:
    """Ask for the keys of ``kp`` and unwrap them with the host encryption key.

    Raises:
        InvalidInputError: ``kp`` does not load (nothing is sent), or the answer
            does not verify.
        KeyReleaseRefusedError: the KPS refused.
        KpsUnreachableError: the KPS did not answer.
    """
    ingress = load_key_protector(kp)
    status, body = transport.post_release(
        {"health_certificate": health_certificate, "key_protector": b64url_encode(kp)}
    )
    if status != 200:
        raise _refusal(status, body)
    return unwrap_release(body, host_private_key, ingress=ingress)


def open_shielding_data(
    transport: KpsTransport,
    health_certificate: str,
    pdk: bytes,
    host_private_key: jose.AsymmetricKey,
) -> ShieldingSecrets:
    """Ask the KPS to open ``pdk`` for this host; verify and decrypt its answer.

    Raises:
        InvalidInputError: ``pdk`` does not load (nothing is sent), or the answer
            does not verify.
        KeyReleaseRefusedError: the KPS refused.
        KpsUnreachableError: the KPS did not answer.
    """
    load_shielding_data(pdk)
    status, body = transport.post_open_shielding_data(
        {"health_certificate": health_certificate, "shielding_data": b64url_encode(pdk)}
    )
    if status != 200:
        raise _refusal(status, body, request="to open the shielding data")
    return open_shielding_answer(
        body, host_private_key, pdk=pdk, certificate_id=certificate_id_of(health_certificate)
    )


def _refusal(status: int, body: Any, *, request: str = "the release") -> KeyReleaseRefusedError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return KeyReleaseRefusedError(status, "refused", "no reason given", None, request=request)
    return KeyReleaseRefusedError(
        status,
        str(error.get("reason") or error.get("type") or "refused")[:64],
        str(error.get("message") or "")[:1000],
        str(error.get("hint") or "") or None,
        request=request,
    )


def request_release(
    url: str,
    ca: Path,
    health_certificate: str,
    kp_bytes: bytes,
    host_private_key: jose.AsymmetricKey,
) -> tuple[TransportKey, TransportKey, bytes]:
    """Release a VM's keys from the KPS at ``url`` over HTTPS.

    Returns:
        The current transport key (opens the VM's key vault now), the new one
        (re-encrypt the vault under it) and the egress KP bytes (store them with
        the VM before using the new key: the KP sent is refused from now on).
    """
    transport = HttpsKpsTransport(url, Path(ca))
    try:
        keys = release_keys(transport, health_certificate, kp_bytes, host_private_key)
    finally:
        transport.close()
    return keys.current, keys.new, keys.egress_kp


def request_shielding_secrets(
    url: str,
    ca: Path,
    health_certificate: str,
    pdk_bytes: bytes,
    host_private_key: jose.AsymmetricKey,
) -> ShieldingSecrets:
    """Have the KPS at ``url`` open a VM's shielding data for this host, over HTTPS.

    Returns:
        The PDK's secrets (in memory only; their repr is redacted).
    """
    transport = HttpsKpsTransport(url, Path(ca))
    try:
        return open_shielding_data(transport, health_certificate, pdk_bytes, host_private_key)
    finally:
        transport.close()
