"""The management API (``/manage/v1``): FastAPI routes, role checks, audit of every change.

Roles: ``admin`` may change VMs (and attach a console where the VM's policy
allows); ``reviewer`` may only list and show. Every mutating request is audited
(:mod:`.audit`) whatever happens to it: refused for a missing, unknown, revoked
or read-only token; refused for a body the schema rejects; refused or failed by
the operation; or granted. Bodies are strict (unknown fields rejected) and
bounded (each field, and the whole body before it is read).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, StrictBool

from guardfab import __version__
from guardfab.access.bearer import Strict, role_of_request
from guardfab.errors import FormatError, GuardfabError, NotAuthorizedError, TransportError
from guardfab.formats.encoding import b64url_decode
from guardfab.formats.shielding_data import MAX_SHIELDING_DATA_BYTES
from guardfab.hgs.web import (
    BodyLimitMiddleware,
    guardfab_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from guardfab.host.manage.audit import FAILED, GRANTED, REFUSED, ManagementAudit
from guardfab.host.manage.material import ADMIN_ROLES, READ_ROLES, ManagementFiles
from guardfab.host.manage.operations import NAME_PATTERN, VmOperations
from guardfab.hypervisor.migrate import (
    MAX_NVRAM_BYTES,
    MAX_PAIRS,
    MigrationOffer,
    SealedPair,
    StreamEndpoint,
)
from guardfab.hypervisor.provision import ProvisionRequest
from guardfab.hypervisor.settings import LooseningRefusedError
from guardfab.hypervisor.spec import DirectKernel
from guardfab.hypervisor.vault import MAX_VAULT_BYTES

PREFIX = "/manage/v1"
_SMALL_FILE = 1024 * 1024
_PDK_B64 = MAX_SHIELDING_DATA_BYTES * 4 // 3 + 4
_SMALL_B64 = _SMALL_FILE * 4 // 3 + 4
_VAULT_B64 = MAX_VAULT_BYTES * 4 // 3 + 4
_NVRAM_B64 = MAX_NVRAM_BYTES * 4 // 3 + 4
#: The whole body: a PDK, a KP, a signature and paths; or a migration offer; base64url.
MAX_BODY_BYTES = max(_PDK_B64 + 2 * _SMALL_B64, _NVRAM_B64 + 2 * (_SMALL_B64 + _VAULT_B64)) + (
    64 * 1024
)
_WHAT = "a management API token"
_HINT = (
    "send 'Authorization: Bearer <token>' with this host's admin or reviewer token "
    "(the 0600 files admin.token / reviewer.token of the management directory)"
)

VmName = Annotated[str, Path(pattern=NAME_PATTERN, max_length=63)]
HostPath = Annotated[str, Field(min_length=2, max_length=4096, pattern=r"^/[^\x00]*$")]


class ProvisionBody(Strict):
    """A new VM: its template disk (a path on this host) and the tenant's files, base64url."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, max_length=63)]
    template: HostPath
    template_sig: Annotated[str, Field(min_length=1, max_length=_SMALL_B64)]
    pdk: Annotated[str, Field(min_length=1, max_length=_PDK_B64)]
    kp: Annotated[str, Field(min_length=1, max_length=_SMALL_B64)]
    port: Annotated[int | None, Field(ge=1, le=65535)] = None
    kernel: HostPath | None = None
    initrd: HostPath | None = None
    cmdline: Annotated[str, Field(max_length=1024)] = "quiet"

    def to_request(self) -> ProvisionRequest:
        """The hypervisor's request (files decoded, paths checked)."""
        if (self.kernel is None) != (self.initrd is None):
            raise FormatError("give both kernel and initrd, or neither")
        boot = None
        if self.kernel is not None and self.initrd is not None:
            boot = DirectKernel(FilePath(self.kernel), FilePath(self.initrd), self.cmdline)
        return ProvisionRequest(
            name=self.name,
            template_disk=FilePath(self.template),
            template_sig=b64url_decode(self.template_sig, what="template signature"),
            pdk=b64url_decode(self.pdk, what="shielding data"),
            kp=b64url_decode(self.kp, what="key protector"),
            boot=boot,
            host_port=self.port,
        )


class PairBody(Strict):
    """A KP and the vault sealed under the key it wraps (base64url): safe to carry."""

    kp: Annotated[str, Field(min_length=1, max_length=_SMALL_B64)]
    vault: Annotated[str, Field(min_length=1, max_length=_VAULT_B64)]

    def to_pair(self) -> SealedPair:
        """The hypervisor's form."""
        return SealedPair.from_dict(self.model_dump())


class OfferBody(Strict):
    """What a migration's source offers (public or sealed), and the port to listen on."""

    record: dict[str, Any]
    pairs: Annotated[list[PairBody], Field(min_length=1, max_length=MAX_PAIRS)]
    nvram: Annotated[str | None, Field(max_length=_NVRAM_B64)] = None
    disks_dir: HostPath
    port: Annotated[int | None, Field(ge=1, le=65535)] = None

    def to_offer(self) -> MigrationOffer:
        """The hypervisor's form (record and pairs checked)."""
        return MigrationOffer.from_dict(self.model_dump(exclude={"port"}))


class EndpointBody(Strict):
    """Where the destination listens, and its salt (base64url of 32 bytes)."""

    address: Annotated[str, Field(min_length=2, max_length=64, pattern=r"^[0-9A-Fa-f.:]+$")]
    port: Annotated[int, Field(ge=1, le=65535)]
    salt: Annotated[str, Field(min_length=43, max_length=43)]

    def to_endpoint(self) -> StreamEndpoint:
        """The hypervisor's form."""
        return StreamEndpoint.from_dict(self.model_dump())


class SettingsBody(Strict):
    """Settings a fabric administrator may ask to change (refused where the policy forbids)."""

    console: StrictBool


@dataclass
class ManagementContext:
    """What every request needs: the directory (tokens), the audit log, the VM operations."""

    files: ManagementFiles
    audit: ManagementAudit
    vms: VmOperations


def _context(request: Request) -> ManagementContext:
    context: ManagementContext = request.app.state.manage
    return context


def _who(context: ManagementContext, authorization: str | None) -> str:
    """The caller for an audit record: its role, or why it has none."""
    if not authorization or not authorization.startswith("Bearer "):
        return "no-token"
    try:
        return context.files.access().role_of(authorization.removeprefix("Bearer ").strip())
    except GuardfabError:
        return "unknown-token"


def reader(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """Admit the admin and reviewer roles (reads are not audited)."""
    access = _context(request).files.access()
    return role_of_request(access, authorization, READ_ROLES, what=_WHAT, hint=_HINT)


def admin(operation: str) -> Callable[..., str]:
    """Admit only the admin role; a refusal is audited as ``operation`` on the path's VM."""

    def dependency(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
        context = _context(request)
        try:
            return role_of_request(
                context.files.access(), authorization, ADMIN_ROLES, what=_WHAT, hint=_HINT
            )
        except NotAuthorizedError as exc:
            context.audit.record(
                actor=_who(context, authorization),
                operation=operation,
                vm=request.path_params.get("name"),
                outcome=REFUSED,
                reason=str(exc),
            )
            raise

    return dependency


def audited(
    context: ManagementContext,
    role: str,
    operation: str,
    vm: str | None,
    action: Callable[[], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``action`` and audit its outcome (granted, refused or failed) and reason."""
    try:
        result = action()
    except GuardfabError as exc:
        details: dict[str, Any] = {"error": type(exc).__name__}
        if isinstance(exc, LooseningRefusedError):
            details["refusal"] = "loosening-shielded-vm"
        outcome = FAILED if isinstance(exc, TransportError) else REFUSED
        context.audit.record(
            actor=role, operation=operation, vm=vm, outcome=outcome, reason=str(exc),
            details=details,
        )  # fmt: skip
        raise
    except Exception as exc:
        context.audit.record(
            actor=role, operation=operation, vm=vm, outcome=FAILED,
            reason=f"unexpected {type(exc).__name__}",
        )  # fmt: skip
        raise
    context.audit.record(actor=role, operation=operation, vm=vm, outcome=GRANTED, reason="done")
    return result


async def _audited_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A mutating request whose path or body the schema refused: audited, then the 422."""
    if request.method != "GET" and hasattr(request.app.state, "manage"):
        context = _context(request)
        route = request.scope.get("route")
        context.audit.record(
            actor=_who(context, request.headers.get("authorization")),
            operation=str(getattr(route, "name", "unknown")),
            vm=None,
            outcome=REFUSED,
            reason="invalid request (schema)",
        )
    return await validation_error_handler(request, exc)


def create_app(context: ManagementContext) -> FastAPI:
    """The management API around ``context``."""
    app = FastAPI(
        title="guardfab guarded-host management API",
        version=__version__,
        description="VM lifecycle on one guarded host; admin and reviewer bearer tokens.",
    )
    app.state.manage = context
    app.add_exception_handler(GuardfabError, guardfab_error_handler)
    app.add_exception_handler(RequestValidationError, _audited_validation_error)
    app.add_exception_handler(Exception, unexpected_error_handler)
    app.add_middleware(BodyLimitMiddleware, limit=MAX_BODY_BYTES)
    _read_routes(app)
    _lifecycle_routes(app)
    _migration_routes(app)
    _policy_routes(app)
    return app


def _read_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, str]:
        """Liveness: the agent's API answers."""
        return {"status": "ok"}

    @app.get(f"{PREFIX}/whoami", tags=["read"])
    def whoami(role: Annotated[str, Depends(reader)]) -> dict[str, str]:
        """The role of the presented token."""
        return {"role": role}

    @app.get(f"{PREFIX}/vms", tags=["read"])
    def list_vms(request: Request, _role: Annotated[str, Depends(reader)]) -> list[dict[str, Any]]:
        """The VMs on this host (public facts: name, policy, PDK id, template, running)."""
        return _context(request).vms.list()

    @app.get(f"{PREFIX}/vms/{{name}}", tags=["read"])
    def show_vm(
        request: Request, name: VmName, _role: Annotated[str, Depends(reader)]
    ) -> dict[str, Any]:
        """One VM's public facts."""
        return _context(request).vms.show(name)


def _lifecycle_routes(app: FastAPI) -> None:
    @app.post(f"{PREFIX}/vms", tags=["lifecycle"], name="provision", status_code=201)
    def provision_vm(
        request: Request, body: ProvisionBody, role: Annotated[str, Depends(admin("provision"))]
    ) -> dict[str, Any]:
        """Provision a VM: template checked against the PDK, encrypted disks, KP released."""
        vms = _context(request).vms
        return audited(
            _context(request),
            role,
            "provision",
            body.name,
            lambda: vms.provision(body.to_request()),
        )

    def simple(operation: str, run: Callable[[VmOperations, str], dict[str, Any]]) -> None:
        only_admin = admin(operation)

        # The dependency is a default value, not an annotation: annotations are
        # strings here (PEP 563) and FastAPI resolves them in the module's globals.
        def route(
            request: Request,
            name: VmName,
            role: str = Depends(only_admin),
        ) -> dict[str, Any]:
            context = _context(request)
            return audited(context, role, operation, name, lambda: run(context.vms, name))

        route.__doc__ = run.__doc__
        app.post(f"{PREFIX}/vms/{{name}}/{operation}", tags=["lifecycle"], name=operation)(route)

    simple("start", VmOperations.start)
    simple("stop", VmOperations.stop)
    simple("checkpoint", VmOperations.checkpoint)
    simple("restore", VmOperations.restore)


def _migration_routes(app: FastAPI) -> None:
    """Both halves of a live migration; the CLI drives two agents, each with its own token."""
    prefix = f"{PREFIX}/vms/{{name}}"

    def route(path: str, operation: str, run: Callable[..., dict[str, Any]], doc: str) -> None:
        only_admin = admin(operation)

        def handler(request: Request, name: VmName, role: str = Depends(only_admin)) -> Any:
            context = _context(request)
            return audited(context, role, operation, name, lambda: run(context, name))

        handler.__doc__ = doc
        app.post(prefix + path, tags=["migration"], name=operation)(handler)

    def with_body(path: str, operation: str, body_type: Any, run: Any, doc: str) -> None:
        only_admin = admin(operation)

        def handler(
            request: Request, name: VmName, body: Any, role: str = Depends(only_admin)
        ) -> Any:
            context = _context(request)
            return audited(context, role, operation, name, lambda: run(context, name, body))

        handler.__annotations__ = {**handler.__annotations__, "body": body_type}
        handler.__doc__ = doc
        app.post(prefix + path, tags=["migration"], name=operation)(handler)

    route(
        "/outgoing",
        "migrate-offer",
        lambda c, n: c.vms.migrations.offer(n),
        "Source: offer the running VM (record, sealed pairs, NVRAM, disks' path).",
    )
    with_body(
        "/outgoing/send",
        "migrate-send",
        EndpointBody,
        lambda c, n, b: c.vms.migrations.send(n, b.to_endpoint()),
        "Source: send the VM's state to the destination's endpoint (TLS-PSK).",
    )
    route(
        "/outgoing/leave",
        "migrate-leave",
        lambda c, n: c.vms.migrations.leave(n),
        "Source: the destination runs the guest; stop here and remove this host's files.",
    )
    with_body(
        "/outgoing/take-back",
        "migrate-take-back",
        PairBody,
        lambda c, n, b: c.vms.migrations.take_back(n, b.to_pair()),
        "Source: keep the destination's pair as pending; run the VM on.",
    )
    with_body(
        "/incoming",
        "migrate-receive",
        OfferBody,
        lambda c, n, b: c.vms.migrations.receive(n, b.to_offer(), b.port),
        "Destination: release with this host's certificate, start QEMU, listen.",
    )
    route(
        "/incoming/finish",
        "migrate-finish",
        lambda c, n: c.vms.migrations.finish(n),
        "Destination: the stream arrived; run the guest and commit its key pair.",
    )
    route(
        "/incoming/forward",
        "migrate-forward",
        lambda c, n: c.vms.migrations.forward(n),
        "Destination: open the VM's host port (once the source let it go).",
    )
    route(
        "/incoming/abort",
        "migrate-abort",
        lambda c, n: c.vms.migrations.abort(n),
        "Destination: stop an unfinished migration; answer its sealed pair for the source.",
    )


def _policy_routes(app: FastAPI) -> None:
    @app.patch(f"{PREFIX}/vms/{{name}}/settings", tags=["policy"], name="settings")
    def change_settings(
        request: Request,
        name: VmName,
        body: SettingsBody,
        role: Annotated[str, Depends(admin("settings"))],
    ) -> dict[str, Any]:
        """Turn the console on or off; refused (and audited) for a shielded VM."""
        vms = _context(request).vms
        return audited(
            _context(request), role, "settings", name,
            lambda: vms.change_settings(name, console=body.console),
        )  # fmt: skip

    @app.post(f"{PREFIX}/vms/{{name}}/console", tags=["policy"], name="console")
    def console(
        request: Request, name: VmName, role: Annotated[str, Depends(admin("console"))]
    ) -> dict[str, Any]:
        """The running VM's console socket on this host; refused for a shielded VM."""
        context = _context(request)
        return audited(context, role, "console", name, lambda: context.vms.console(name))

    @app.post(
        f"{PREFIX}/vms/{{name}}/key-protector/restore-last-known-good",
        tags=["policy"],
        name="restore-last-known-good",
    )
    def restore_last_known_good(
        request: Request,
        name: VmName,
        role: Annotated[str, Depends(admin("restore-last-known-good"))],
    ) -> dict[str, Any]:
        """Go back to the VM's last known good key protector."""
        context = _context(request)
        return audited(
            context, role, "restore-last-known-good", name,
            lambda: context.vms.restore_last_known_good(name),
        )  # fmt: skip
