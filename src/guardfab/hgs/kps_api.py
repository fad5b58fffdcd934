"""The Key Protection Service's HTTPS routes: release, published metadata, administration.

Host-facing (no credential: the health certificate is the credential):

* ``POST /keyprotection/v1/release`` {health_certificate, key_protector (base64url)}
  -> 200 {release, egress_key_protector, kp_id, generation, egress_generation,
  kps_guardian}; refusals are 401 (certificate not genuine, untrusted, expired or
  denied), 403 (host revoked), 404 (KP for another fabric), 409 (rollback or
  replay), 422 (tampered KP); 503 when the KPS keys do not load. Error bodies
  carry the typed error's message, hint and reason: never key material.
* ``POST /keyprotection/v1/shielding-data/open`` {health_certificate,
  shielding_data (base64url of the PDK file)} -> 200 {opening, pdk_id,
  kps_guardian}: the PDK's secrets, encrypted to the certificate's ``cnf`` key
  and signed by the PDK's KPS guardian; refusals as for a release (401, 403),
  404 (PDK for another fabric) and 422 (PDK malformed, not signed by its owner,
  or its secrets tampered with). Every request is audited (ADR 0010).
* ``GET /keyprotection/v1/metadata``: the KPS guardian documents, primary first.
* ``GET /keyprotection/v1/metadata/guardian.jws``: the primary document alone, the
  file ``guardfab tenant guardian import`` reads.

Admin (``ADMIN`` changes, ``READER`` reads), under ``/admin/v1/kps/``: trusted
attestation signers, the deny-before date, KPS keys and the rotation report.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from guardfab.errors import FormatError
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.formats.health_certificate import MAX_TOKEN_BYTES
from guardfab.hgs.deps import ADMIN, READER, Strict, service_of_app
from guardfab.hgs.kps import KpsNotFoundError, KpsService
from guardfab.hgs.kps_config import MAX_KP_TEXT, MAX_PDK_TEXT
from guardfab.hgs.web import error_body
from guardfab.keyprotection import (
    CertificateRejectedError,
    ForeignKeyProtectorError,
    ForeignShieldingDataError,
    HostRevokedError,
    KeyProtectorRejectedError,
    KeyReleaseError,
    RollbackError,
    ShieldingDataRejectedError,
)

#: HTTP status of each refusal (first matching class wins).
RELEASE_STATUS: tuple[tuple[type[KeyReleaseError], int], ...] = (
    (CertificateRejectedError, 401),
    (HostRevokedError, 403),
    (ForeignKeyProtectorError, 404),
    (RollbackError, 409),
    (KeyProtectorRejectedError, 422),
    (ForeignShieldingDataError, 404),
    (ShieldingDataRejectedError, 422),
)
#: JSONResponse's encoder but for ``ensure_ascii`` (see release_body).
_ASCII_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


class ReleaseRequest(Strict):
    """A host's health certificate and the VM's key protector (its file, base64url)."""

    health_certificate: str = Field(max_length=MAX_TOKEN_BYTES)
    key_protector: str = Field(max_length=MAX_KP_TEXT)


class ReleaseResponse(BaseModel):
    """A granted release: the signed, host-encrypted keys and the VM's next KP (base64url)."""

    release: str
    egress_key_protector: str
    kp_id: str
    generation: int
    egress_generation: int
    kps_guardian: str


class OpenShieldingDataRequest(Strict):
    """A host's health certificate and a VM's shielding data (the PDK file, base64url)."""

    health_certificate: str = Field(max_length=MAX_TOKEN_BYTES)
    shielding_data: str = Field(max_length=MAX_PDK_TEXT)


class SignerRequest(Strict):
    """A signer's public JWK, or a JWK Set such as another HGS's /attestation/v1/signers."""

    jwk: dict[str, Any] | None = None
    jwks: dict[str, Any] | None = None


class DenyBeforeRequest(Strict):
    """Refuse health certificates issued before this time (Unix seconds)."""

    deny_before: int = Field(ge=0)


class KeyAddRequest(Strict):
    """Rotate: a new key generation of the primary KPS guardian (current at once if
    ``make_primary``); or, with ``new_guardian``, a second guardian (name, key family)."""

    name: str | None = Field(default=None, max_length=128)
    algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256
    make_primary: bool = False
    new_guardian: bool = False


class MakePrimaryRequest(Strict):
    """Which key generation of the guardian becomes current (default: its newest)."""

    key_generation: int | None = Field(default=None, ge=0, le=2**53 - 1)


#: No body, or an empty one: the guardian's newest key generation.
_NEWEST = MakePrimaryRequest()


#: The release route (also answered by guardfab.hgs.lean_routes).
RELEASE_PATH = "/keyprotection/v1/release"


def kps_of_app(app: FastAPI) -> KpsService:
    """The KpsService bound to ``app``."""
    kps: KpsService = app.state.kps
    return kps


def kps_of(request: Request) -> KpsService:
    """The KpsService bound to the running app."""
    return kps_of_app(request.app)


async def release_answer(kps: KpsService, body: ReleaseRequest) -> Response:
    """The answer of ``POST /keyprotection/v1/release``.

    Its commit is shared with the other releases and attestations of this event-loop
    turn (``hgs.audit_batch``). Encoded here, not by FastAPI (which would validate and
    re-encode a dict with jsonable_encoder on every release); ReleaseResponse
    documents the body.
    """
    result = await kps.release_batched(body.health_certificate, body.key_protector, kps.batcher)
    return Response(release_body(result.to_response()), media_type="application/json")


def release_body(answer: dict[str, Any]) -> bytes:
    """The bytes JSONResponse would send for ``answer``, at about half its CPU.

    A granted release is ASCII throughout (base64url, ids, integers), and for
    ASCII text the C encoder's ``ensure_ascii`` path writes the same bytes as
    JSONResponse's ``ensure_ascii=False`` one, about twice as fast on the ~10 KB
    of base64url an answer carries (tests/test_kps_release_path.py holds them equal).
    """
    return _ASCII_JSON.encode(answer).encode("ascii")


def release_status(exc: KeyReleaseError) -> int:
    """The HTTP status of a refused release."""
    for cls, status in RELEASE_STATUS:
        if isinstance(exc, cls):
            return status
    return 403


async def _release_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KeyReleaseError)
    body = error_body(exc)
    body["error"]["reason"] = exc.reason
    status = release_status(exc)
    headers = (
        {"WWW-Authenticate": 'HealthCertificate realm="guardfab-kps"'} if status == 401 else None
    )
    return JSONResponse(body, status_code=status, headers=headers)


async def _not_found_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KpsNotFoundError)
    return JSONResponse(error_body(exc), status_code=404)


def add_kps_routes(app: FastAPI) -> None:
    """Register the KPS routes and build the KpsService on ``app.state.kps``."""
    app.state.kps = KpsService(service_of_app(app))
    app.add_exception_handler(KeyReleaseError, _release_error_handler)
    app.add_exception_handler(KpsNotFoundError, _not_found_handler)
    _host_routes(app)
    _signer_routes(app)
    _key_routes(app)


def _host_routes(app: FastAPI) -> None:
    @app.post(RELEASE_PATH, tags=["key protection"], response_model=ReleaseResponse)
    # On the event loop, like attest: the thread-pool hop cost ~0.27 ms of ~2 ms per
    # release (measured in process); the store transaction is sub-millisecond and
    # shared with the loop turn's other commits (hgs.audit_batch).
    # Well-formed requests are answered by LeanRoutes (guardfab.hgs.lean_routes).
    async def release(request: Request, body: ReleaseRequest) -> Response:
        """Release a VM's keys to a host with a valid health certificate; re-key its KP."""
        return await release_answer(kps_of(request), body)

    @app.post("/keyprotection/v1/shielding-data/open", tags=["key protection"])
    # In the thread pool, unlike release: a PDK of up to 2 MiB takes milliseconds to
    # verify and decrypt, which must not hold up the event loop's other requests.
    def open_shielding_data(request: Request, body: OpenShieldingDataRequest) -> dict[str, Any]:
        """Open a VM's shielding data (PDK) for a host with a valid health certificate."""
        result = kps_of(request).open_shielding_data(body.health_certificate, body.shielding_data)
        return result.to_response()

    @app.get("/keyprotection/v1/metadata", tags=["key protection"])
    def metadata(request: Request) -> dict[str, Any]:
        """The KPS guardians' self-signed documents, primary first."""
        return kps_of(request).metadata()

    @app.get("/keyprotection/v1/metadata/guardian.jws", tags=["key protection"])
    def guardian_document(request: Request) -> Response:
        """The primary KPS guardian document: the file tenants import."""
        return Response(kps_of(request).primary_document(), media_type="application/jose")


def _signer_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/kps/signers", tags=["key protection admin"])
    def signers(request: Request, _role: Annotated[str, Depends(READER)]) -> dict[str, Any]:
        """Trusted attestation signers."""
        return {"signers": kps_of(request).signers()}

    @app.post("/admin/v1/kps/signers", tags=["key protection admin"])
    def add_signer(
        request: Request, body: SignerRequest, role: Annotated[str, Depends(ADMIN)]
    ) -> dict[str, Any]:
        """Trust the attestation signer(s) of a JWK or JWK Set."""
        if (body.jwk is None) == (body.jwks is None):
            raise FormatError("give exactly one of 'jwk' and 'jwks'")
        document = body.jwk if body.jwk is not None else body.jwks
        return {"added": kps_of(request).add_signers(document, actor=role)}

    @app.delete("/admin/v1/kps/signers/{kid}", tags=["key protection admin"])
    def remove_signer(
        request: Request, kid: str, role: Annotated[str, Depends(ADMIN)]
    ) -> dict[str, Any]:
        """Stop trusting an attestation signer."""
        kps_of(request).remove_signer(kid, actor=role)
        return {"removed": kid}

    @app.get("/admin/v1/kps/deny-before", tags=["key protection admin"])
    def deny_before(request: Request, _role: Annotated[str, Depends(READER)]) -> dict[str, Any]:
        """The deny-before date (Unix seconds), or null."""
        return {"deny_before": kps_of(request).deny_before()}

    @app.put("/admin/v1/kps/deny-before", tags=["key protection admin"])
    def set_deny_before(
        request: Request, body: DenyBeforeRequest, role: Annotated[str, Depends(ADMIN)]
    ) -> dict[str, Any]:
        """Refuse health certificates issued before a date."""
        kps_of(request).set_deny_before(body.deny_before, actor=role)
        return {"deny_before": body.deny_before}

    @app.delete("/admin/v1/kps/deny-before", tags=["key protection admin"])
    def clear_deny_before(request: Request, role: Annotated[str, Depends(ADMIN)]) -> dict[str, Any]:
        """Clear the deny-before date."""
        kps_of(request).set_deny_before(None, actor=role)
        return {"deny_before": None}


def _key_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/kps/keys", tags=["key protection admin"])
    def keys(request: Request, _role: Annotated[str, Depends(READER)]) -> dict[str, Any]:
        """The KPS keys, primary first."""
        return {"keys": kps_of(request).list_keys()}

    @app.post("/admin/v1/kps/keys", tags=["key protection admin"])
    def add_key(
        request: Request, body: KeyAddRequest, role: Annotated[str, Depends(ADMIN)]
    ) -> dict[str, Any]:
        """Add a key generation to the primary KPS guardian (or a new guardian)."""
        return kps_of(request).add_key(
            actor=role,
            name=body.name,
            algorithm=body.algorithm,
            make_primary=body.make_primary,
            new_guardian=body.new_guardian,
        )

    @app.post("/admin/v1/kps/keys/{key_id}/make-primary", tags=["key protection admin"])
    def make_primary(
        request: Request,
        key_id: str,
        role: Annotated[str, Depends(ADMIN)],
        body: Annotated[MakePrimaryRequest, Body()] = _NEWEST,
    ) -> dict[str, Any]:
        """Make a KPS key (at a key generation, default its newest) primary and current."""
        number = kps_of(request).make_primary(
            key_id, actor=role, key_generation=body.key_generation
        )
        return {"primary": key_id, "key_generation": number}

    @app.get("/admin/v1/kps/report", tags=["key protection admin"])
    def report(request: Request, _role: Annotated[str, Depends(READER)]) -> dict[str, Any]:
        """KPs last seen under a KPS key that is not the primary."""
        return kps_of(request).report()
