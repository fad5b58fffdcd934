"""The HGS HTTPS API (FastAPI): host-facing attestation and the admin API.

Host-facing routes need no credential (the evidence is the credential). Admin
routes need a bearer token: the ``admin`` role may change state, the
``reviewer`` role may only read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from guardfab import __version__
from guardfab.errors import GuardfabError
from guardfab.hgs.admin_api import add_admin_routes
from guardfab.hgs.deps import READER, Strict, service_of, service_of_app
from guardfab.hgs.kps_api import (
    RELEASE_PATH,
    ReleaseRequest,
    add_kps_routes,
    kps_of_app,
    release_answer,
)
from guardfab.hgs.lean_routes import LeanRoute, LeanRoutes
from guardfab.hgs.service import HgsService
from guardfab.hgs.web import (
    LOG,
    BodyLimitMiddleware,
    guardfab_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from guardfab.store.base import Store


class ChallengeResponse(BaseModel):
    """A fresh nonce and its expiry (Unix seconds)."""

    nonce: str
    expires_at: int


class AttestRequest(Strict):
    """A challenge nonce and the evidence bound to it (see the evidence formats)."""

    nonce: str
    evidence: dict[str, Any]


class ActivateRequest(Strict):
    """The secret a host's TPM recovered with TPM2_ActivateCredential (base64url)."""

    activation_id: str
    secret: str


#: How often a worker removes expired nonces and activation challenges from the store.
#: Every second, so the work trickles: removing an entry costs ~40 us of store time (its
#: delete event included); a minute's backlog at 1,000 attestations/s (60,000 keys) is
#: 2.4 s of it, and even 10 s worth, swept at once, slowed the requests beside it on a
#: busy machine (bench/README.md, round 6). With nothing expired a sweep is one read.
COMPACT_INTERVAL = 1.0
#: Expired entries removed per store transaction by the sweep, and the pause after each
#: full batch. In one transaction on the event loop, 34,000 keys stalled every request
#: of both workers for 177 ms (bench/README.md, round 6); in batches on a thread,
#: requests take the write lock between two. Small batches: a request that finds the
#: lock taken sleeps in SQLite's busy handler in growing steps, so a short hold matters.
SWEEP_BATCH = 32
SWEEP_PAUSE = 0.01


def sweep_expired(
    store: Store,
    *,
    batch: int = SWEEP_BATCH,
    pause: float = SWEEP_PAUSE,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Remove every expired entry in transactions of at most ``batch``; return how many.

    Blocks (it waits for the store): run it on a thread, not on the event loop.
    """
    removed = 0
    while True:
        count = store.compact_expired(limit=batch)
        removed += count
        if count < batch:
            return removed
        sleep(pause)  # leave the write lock to requests between two batches


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the store's expiry sweep in the background while the app serves."""

    async def sweep() -> None:
        while True:
            await asyncio.sleep(COMPACT_INTERVAL)
            try:
                await asyncio.to_thread(sweep_expired, service_of_app(app).store)
            except GuardfabError as exc:  # a busy store: try again next round
                LOG.warning("expiry sweep skipped: %s", exc)

    task = asyncio.create_task(sweep())
    try:
        yield
    finally:
        task.cancel()


def challenge_answer(service: HgsService) -> JSONResponse:
    """The answer of ``POST /attestation/v1/challenge``."""
    nonce = service.challenge()
    return JSONResponse({"nonce": nonce.token, "expires_at": nonce.expires_at})


#: The answer's media type (what JSONResponse sends).
_JSON = "application/json"


async def attest_answer(service: HgsService, body: AttestRequest) -> Response:
    """The answer of ``POST /attestation/v1/attest`` (403 when refused)."""
    outcome = await service.attest_batched(body.nonce, body.evidence)
    refused = not outcome.result.passed and outcome.activation is None
    return Response(outcome.body(), status_code=403 if refused else 200, media_type=_JSON)


def _lean_routes(app: FastAPI) -> dict[str, LeanRoute]:
    """The hot host-facing routes, answered by the same functions as their FastAPI routes."""
    return {
        "/attestation/v1/challenge": LeanRoute(
            None, lambda _body: challenge_answer(service_of_app(app))
        ),
        "/attestation/v1/attest": LeanRoute(
            AttestRequest, lambda body: attest_answer(service_of_app(app), body)
        ),
        RELEASE_PATH: LeanRoute(ReleaseRequest, lambda body: release_answer(kps_of_app(app), body)),
    }


def create_app(service: HgsService, *, lean_routes: bool = True) -> FastAPI:
    """Build the ASGI application around ``service``.

    ``lean_routes=False`` leaves every request to FastAPI (tests compare the two).
    """
    app = FastAPI(
        lifespan=_lifespan,
        title="guardfab Host Guardian Service",
        version=__version__,
        description="Attestation and key protection for a guarded fabric of Linux/KVM hosts.",
    )
    app.state.service = service
    app.add_exception_handler(GuardfabError, guardfab_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    if lean_routes:  # added first, so it runs inside the body limit (the last added is outermost)
        app.add_middleware(LeanRoutes, fastapi_app=app, routes=_lean_routes(app))
    app.add_middleware(BodyLimitMiddleware)
    _host_routes(app)
    _admin_routes(app)
    add_admin_routes(app)
    add_kps_routes(app)
    return app


def _host_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    # The challenge, attest and release routes are answered by LeanRoutes when
    # well-formed (see guardfab.hgs.lean_routes); these declarations describe them
    # in the OpenAPI document and answer every request LeanRoutes hands on.
    @app.post("/attestation/v1/challenge", tags=["attestation"], response_model=ChallengeResponse)
    async def challenge(request: Request) -> JSONResponse:
        """A single-use nonce the host binds into its evidence."""
        return challenge_answer(service_of(request))

    @app.post("/attestation/v1/attest", tags=["attestation"])
    # On the event loop: the hop to the thread pool cost about 200 us per request
    # (measured in process), a third of a host-key attestation. Store lock waits
    # are short (the store's write gate, sub-millisecond transactions), and the
    # commits of one loop turn are shared (hgs.audit_batch); should waits grow,
    # run more workers rather than threads.
    async def attest(request: Request, body: AttestRequest) -> Response:
        """Verify evidence; answer a health certificate, an activation challenge or a refusal.

        200 with ``health_certificate`` when the host passed; 200 with ``activation``
        when its AK must first be bound to its EK; 403 with every verdict otherwise.
        """
        return await attest_answer(service_of(request), body)

    @app.post("/attestation/v1/activate", tags=["attestation"])
    # Rare (first contact only), so it may wait in the thread pool.
    def activate(request: Request, body: ActivateRequest) -> dict[str, str]:
        """Bind the host's AK to its EK after a correct ActivateCredential answer."""
        binding = service_of(request).activate(body.activation_id, body.secret)
        return {"host_id": binding.host_id, "ak_name": binding.ak_name.hex()}

    @app.get("/attestation/v1/signers", tags=["attestation"])
    async def signers(request: Request) -> dict[str, Any]:
        """Public keys that sign this HGS's health certificates (JWK Set)."""
        return service_of(request).signers()


def _admin_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/whoami", tags=["admin"])
    async def whoami(role: Annotated[str, Depends(READER)]) -> dict[str, str]:
        """The role of the presented token."""
        return {"role": role}
