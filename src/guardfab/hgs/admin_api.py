"""The HGS admin API (``/admin/v1``): thin routes over :mod:`guardfab.hgs.admin`.

Every body is a strict pydantic model (unknown fields refused), so the OpenAPI
document describes each request exactly and malformed input is refused (422)
before any code runs. Changes need the ``admin`` role; reads (and ``what-if``,
which changes nothing) also admit the ``reviewer`` role. Status codes: 201 a
record was created, 400 bad input, 403 role, 404 unknown record, 409 duplicate,
locked policy, decided candidate or a concurrent change.

Handlers are plain ``def``: FastAPI runs them in its thread pool, so the store's
blocking I/O never stalls the event loop that serves attestations.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import Field, StringConstraints

from guardfab.attestation.baseline import (
    DEFAULT_BASELINE_PCRS,
    CandidateState,
    baseline_from_log,
)
from guardfab.attestation.policies import LockedPolicyError
from guardfab.attestation.trust import CiPolicy, PolicyState
from guardfab.attestation.whatif import (
    AddBaseline,
    AddCiPolicy,
    RemoveBaseline,
    RemoveCiPolicy,
    RevokeHost,
    SetPolicyState,
    TrustChange,
)
from guardfab.errors import GuardfabError
from guardfab.formats.encoding import b64url_decode
from guardfab.hgs import admin as adm
from guardfab.hgs import admin_baselines as base
from guardfab.hgs import admin_reports as reports
from guardfab.hgs import admin_trust as trust
from guardfab.hgs.admin_trust import CaKind
from guardfab.hgs.deps import ADMIN, READER, Strict, service_of
from guardfab.hgs.web import error_body

_B64URL = r"^[A-Za-z0-9_-]*$"
_HEX64 = r"^[0-9a-fA-F]{64}$"
#: base64url characters of the largest event log accepted.
_MAX_LOG_CHARS = (base.MAX_LOG_BYTES * 4 + 2) // 3

Name = Annotated[str, StringConstraints(pattern=adm.NAME_PATTERN, max_length=128)]
Text = Annotated[str, StringConstraints(max_length=trust.MAX_PEM_CHARS)]
Log = Annotated[str, StringConstraints(pattern=_B64URL, min_length=1, max_length=_MAX_LOG_CHARS)]
Pcr = Annotated[int, Field(ge=0, le=23)]
Reason = Annotated[str, StringConstraints(max_length=512)]
PathName = Annotated[str, Path(pattern=adm.NAME_PATTERN, max_length=128)]
PathHost = PathName
PolicyName = Annotated[str, Path(pattern=r"^Hgs_[A-Za-z]{1,60}$")]
KeyId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{43}$")]
CertId = Annotated[str, Path(pattern=r"^[0-9a-f]{64}$")]
CandidateId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]
Admin = Annotated[str, Depends(ADMIN)]
Reader = Annotated[str, Depends(READER)]


class ModesRequest(Strict):
    """The attestation modes to accept from now on (admin-group is deprecated)."""

    modes: list[Literal["tpm", "host-key", "admin-group"]] = Field(min_length=1, max_length=3)


class SettingsRequest(Strict):
    """Trust settings to change; omitted fields keep their value."""

    admit_certified_eks: bool | None = None
    ci_policy_pcr: Pcr | None = None


class TpmHostRequest(Strict):
    """A TPM host: its EK public (TPM2B_PUBLIC base64url, or PEM) and/or EK certificate."""

    name: Name
    ek_public: Text | None = None
    ek_certificate: Text | None = Field(None, description="PEM, or DER as base64url")


class CaRequest(Strict):
    """A CA certificate (PEM, or DER as base64url)."""

    certificate: Text


class EkCaRequest(CaRequest):
    """A TPM vendor CA: a root, or an intermediate that EK certificates chain through."""

    kind: Literal["root", "intermediate"] = "root"


class HostKeyRequest(Strict):
    """A host's public signing key: PEM SubjectPublicKeyInfo or JWK (JSON text)."""

    name: Name
    public_key: Text


class GroupRequest(Strict):
    """A host group (admin-group mode, deprecated)."""

    name: Name


class CiPolicyRequest(Strict):
    """A CI policy: its name and the policy file's SHA-256, or the file (base64url)."""

    name: Name
    digest: Annotated[str, StringConstraints(pattern=_HEX64)] | None = None
    content: Log | None = None


class BaselineRequest(Strict):
    """A TPM baseline from a reference host's TCG event log (base64url)."""

    name: Name
    event_log: Log
    pcrs: list[Pcr] | None = Field(None, min_length=1, max_length=24)


class CandidateRequest(Strict):
    """File a host's last verified boot as a candidate baseline."""

    host_id: Name
    name: Name
    reason: Reason = ""


class ApproveRequest(Strict):
    """Approve a candidate, optionally under another name."""

    name: Name | None = None


class RejectRequest(Strict):
    """Reject a candidate, saying why."""

    reason: Annotated[str, StringConstraints(min_length=1, max_length=512)]


class PolicyStateRequest(Strict):
    """The new state of an attestation policy (locking is one-way)."""

    state: Literal["enabled", "disabled", "locked"]


class RevokeRequest(Strict):
    """Revoke a host: it fails attestation in every mode until unrevoked."""

    host_id: Name
    reason: Annotated[str, StringConstraints(max_length=256)] = ""


class SetPolicyChange(Strict):
    """What if a policy were enabled, disabled or locked."""

    kind: Literal["set-policy-state"]
    policy: Annotated[str, StringConstraints(max_length=64)]
    state: Literal["enabled", "disabled", "locked"]


class AddBaselineChange(Strict):
    """What if a baseline from this event log were added."""

    kind: Literal["add-baseline"]
    name: Name
    event_log: Log
    pcrs: list[Pcr] | None = Field(None, min_length=1, max_length=24)


class RemoveBaselineChange(Strict):
    """What if a baseline were removed."""

    kind: Literal["remove-baseline"]
    name: Name


class AddCiPolicyChange(Strict):
    """What if a CI policy were added."""

    kind: Literal["add-ci-policy"]
    name: Name
    digest: Annotated[str, StringConstraints(pattern=_HEX64)] | None = None
    content: Log | None = None


class RemoveCiPolicyChange(Strict):
    """What if a CI policy were removed."""

    kind: Literal["remove-ci-policy"]
    name: Name


class RevokeHostChange(Strict):
    """What if a host were revoked."""

    kind: Literal["revoke-host"]
    host_id: Name


Change = Annotated[
    SetPolicyChange
    | AddBaselineChange
    | RemoveBaselineChange
    | AddCiPolicyChange
    | RemoveCiPolicyChange
    | RevokeHostChange,
    Field(discriminator="kind"),
]


class WhatIfRequest(Strict):
    """A proposed change, evaluated against every host's last verified boot."""

    change: Change


def trust_change(change: Change) -> TrustChange:
    """The engine's change object for a what-if request."""
    if isinstance(change, SetPolicyChange):
        return SetPolicyState(change.policy, PolicyState(change.state))
    if isinstance(change, AddBaselineChange):
        log = b64url_decode(change.event_log, what="event log")
        pcrs = tuple(change.pcrs) if change.pcrs else DEFAULT_BASELINE_PCRS
        return AddBaseline(
            adm.valid(lambda: baseline_from_log(change.name, log, pcrs=pcrs), "baseline")
        )
    if isinstance(change, AddCiPolicyChange):
        digest = trust.ci_policy_digest(change.digest, change.content)
        return AddCiPolicy(adm.valid(lambda: CiPolicy(change.name, digest), "CI policy"))
    if isinstance(change, RemoveBaselineChange):
        return RemoveBaseline(change.name)
    if isinstance(change, RemoveCiPolicyChange):
        return RemoveCiPolicy(change.name)
    return RevokeHost(change.host_id)


def _ctx(request: Request, role: str) -> adm.Admin:
    return adm.Admin.of(service_of(request), role)


def _status_handler(status: int) -> Any:
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, GuardfabError)
        return JSONResponse(error_body(exc), status_code=status)

    return handler


def add_admin_routes(app: FastAPI) -> None:
    """Register every ``/admin/v1`` route (except ``whoami``, which the app defines)."""
    app.add_exception_handler(adm.NotFoundError, _status_handler(404))
    app.add_exception_handler(LockedPolicyError, _status_handler(409))
    _mode_routes(app)
    _host_routes(app)
    _ca_routes(app)
    _baseline_routes(app)
    _policy_routes(app)
    _report_routes(app)


def _mode_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/mode", tags=["admin"])
    def get_mode(request: Request, role: Reader) -> dict[str, Any]:
        """The active attestation modes (Get-HgsServer)."""
        return adm.show_modes(_ctx(request, role))

    @app.put("/admin/v1/mode", tags=["admin"])
    def put_mode(request: Request, role: Admin, body: ModesRequest) -> dict[str, Any]:
        """Set the attestation modes (Set-HgsServer -TrustTpm/-TrustHostKey/...).

        Issued health certificates stay valid: they are self-contained tokens.
        """
        return adm.set_modes(_ctx(request, role), body.modes)

    @app.get("/admin/v1/settings", tags=["admin"])
    def get_settings(request: Request, role: Reader) -> dict[str, Any]:
        """Trust settings: admit vendor-certified EKs, the CI policy PCR."""
        return adm.show_settings(_ctx(request, role))

    @app.patch("/admin/v1/settings", tags=["admin"])
    def patch_settings(request: Request, role: Admin, body: SettingsRequest) -> dict[str, Any]:
        """Change trust settings (omitted fields keep their value)."""
        return adm.update_settings(
            _ctx(request, role),
            admit_certified_eks=body.admit_certified_eks,
            ci_policy_pcr=body.ci_policy_pcr,
        )


def _host_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/tpm-hosts", tags=["admin"])
    def get_tpm_hosts(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Registered TPM hosts (Get-HgsAttestationTpmHost)."""
        return trust.list_tpm_hosts(_ctx(request, role))

    @app.post("/admin/v1/tpm-hosts", tags=["admin"], status_code=201)
    def post_tpm_host(request: Request, role: Admin, body: TpmHostRequest) -> dict[str, Any]:
        """Register a TPM host by EK public key and/or certificate (Add-HgsAttestationTpmHost)."""
        return trust.add_tpm_host(
            _ctx(request, role),
            body.name,
            ek_public=body.ek_public,
            ek_certificate=body.ek_certificate,
        )

    @app.delete("/admin/v1/tpm-hosts/{name}", tags=["admin"])
    def delete_tpm_host(request: Request, role: Admin, name: PathName) -> dict[str, Any]:
        """Remove a TPM host and its AK bindings (Remove-HgsAttestationTpmHost)."""
        return trust.remove_tpm_host(_ctx(request, role), name)

    @app.get("/admin/v1/host-keys", tags=["admin"])
    def get_host_keys(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Registered host keys (Get-HgsAttestationHostKey)."""
        return trust.list_host_keys(_ctx(request, role))

    @app.post("/admin/v1/host-keys", tags=["admin"], status_code=201)
    def post_host_key(request: Request, role: Admin, body: HostKeyRequest) -> dict[str, Any]:
        """Register a host key for host-key mode (Add-HgsAttestationHostKey)."""
        return trust.add_host_key(_ctx(request, role), body.name, body.public_key)

    @app.post("/admin/v1/host-keys/{key_id}/revoke", tags=["admin"])
    def revoke_host_key(request: Request, role: Admin, key_id: KeyId) -> dict[str, Any]:
        """Refuse a host key from now on, keeping it on record."""
        return trust.revoke_host_key(_ctx(request, role), key_id)

    @app.delete("/admin/v1/host-keys/{key_id}", tags=["admin"])
    def delete_host_key(request: Request, role: Admin, key_id: KeyId) -> dict[str, Any]:
        """Forget a host key (Remove-HgsAttestationHostKey)."""
        return trust.remove_host_key(_ctx(request, role), key_id)

    _group_routes(app)
    _revocation_routes(app)


def _group_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/host-groups", tags=["admin"])
    def get_groups(request: Request, role: Reader) -> list[str]:
        """Registered host groups, admin-group mode (Get-HgsAttestationHostGroup)."""
        return trust.list_host_groups(_ctx(request, role))

    @app.post("/admin/v1/host-groups", tags=["admin"], status_code=201)
    def post_group(request: Request, role: Admin, body: GroupRequest) -> dict[str, Any]:
        """Trust a host group, deprecated admin-group mode (Add-HgsAttestationHostGroup)."""
        return trust.add_host_group(_ctx(request, role), body.name)

    @app.delete("/admin/v1/host-groups/{name}", tags=["admin"])
    def delete_group(request: Request, role: Admin, name: PathName) -> dict[str, Any]:
        """Stop trusting a host group (Remove-HgsAttestationHostGroup)."""
        return trust.remove_host_group(_ctx(request, role), name)


def _revocation_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/revocations", tags=["admin"])
    def get_revocations(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Revoked hosts, with when and why."""
        return adm.list_revoked(_ctx(request, role))

    @app.post("/admin/v1/revocations", tags=["admin"], status_code=201)
    def post_revocation(request: Request, role: Admin, body: RevokeRequest) -> dict[str, Any]:
        """Revoke a host: it fails attestation in every mode until unrevoked."""
        return adm.revoke_host(_ctx(request, role), body.host_id, body.reason)

    @app.delete("/admin/v1/revocations/{host_id}", tags=["admin"])
    def delete_revocation(request: Request, role: Admin, host_id: PathHost) -> dict[str, Any]:
        """Lift a host's revocation."""
        return adm.unrevoke_host(_ctx(request, role), host_id)


def _ca_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/ek-cas", tags=["admin"])
    def get_ek_cas(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Trusted TPM vendor CAs (the reference's TrustedTpm_RootCA/_IntermediateCA stores)."""
        return trust.list_cas(_ctx(request, role), trust.EK_CAS)

    @app.post("/admin/v1/ek-cas", tags=["admin"], status_code=201)
    def post_ek_ca(request: Request, role: Admin, body: EkCaRequest) -> dict[str, Any]:
        """Trust a TPM vendor root or intermediate CA for EK certificates."""
        kind = CaKind.EK_ROOT if body.kind == "root" else CaKind.EK_INTERMEDIATE
        return trust.add_ca(_ctx(request, role), kind, body.certificate)

    @app.delete("/admin/v1/ek-cas/{cert_id}", tags=["admin"])
    def delete_ek_ca(request: Request, role: Admin, cert_id: CertId) -> dict[str, Any]:
        """Stop trusting a TPM vendor CA (by the SHA-256 of its DER)."""
        return trust.remove_ca(_ctx(request, role), cert_id, trust.EK_CAS)

    @app.get("/admin/v1/group-cas", tags=["admin"])
    def get_group_cas(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Trusted host CAs of admin-group mode (deprecated)."""
        return trust.list_cas(_ctx(request, role), trust.GROUP_CAS)

    @app.post("/admin/v1/group-cas", tags=["admin"], status_code=201)
    def post_group_ca(request: Request, role: Admin, body: CaRequest) -> dict[str, Any]:
        """Trust a host CA whose certificates name a host's group (admin-group mode)."""
        return trust.add_ca(_ctx(request, role), CaKind.GROUP_ROOT, body.certificate)

    @app.delete("/admin/v1/group-cas/{cert_id}", tags=["admin"])
    def delete_group_ca(request: Request, role: Admin, cert_id: CertId) -> dict[str, Any]:
        """Stop trusting a host CA."""
        return trust.remove_ca(_ctx(request, role), cert_id, trust.GROUP_CAS)

    @app.get("/admin/v1/ci-policies", tags=["admin"])
    def get_ci_policies(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Registered code integrity policies."""
        return trust.list_ci_policies(_ctx(request, role))

    @app.post("/admin/v1/ci-policies", tags=["admin"], status_code=201)
    def post_ci_policy(request: Request, role: Admin, body: CiPolicyRequest) -> dict[str, Any]:
        """Register a CI policy by its file's SHA-256 or content (Add-HgsAttestationCIPolicy)."""
        digest = trust.ci_policy_digest(body.digest, body.content)
        return trust.add_ci_policy(_ctx(request, role), body.name, digest)

    @app.delete("/admin/v1/ci-policies/{name}", tags=["admin"])
    def delete_ci_policy(request: Request, role: Admin, name: PathName) -> dict[str, Any]:
        """Remove a CI policy (Remove-HgsAttestationCIPolicy)."""
        return trust.remove_ci_policy(_ctx(request, role), name)


def _baseline_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/baselines", tags=["admin"])
    def get_baselines(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Registered TPM baselines, summarized."""
        return base.list_baselines(_ctx(request, role))

    @app.get("/admin/v1/baselines/{name}", tags=["admin"])
    def get_baseline(request: Request, role: Reader, name: PathName) -> dict[str, Any]:
        """One TPM baseline in full: PCR values, reference events, secure boot digests."""
        return base.get_baseline(_ctx(request, role), name)

    @app.post("/admin/v1/baselines", tags=["admin"], status_code=201)
    def post_baseline(request: Request, role: Admin, body: BaselineRequest) -> dict[str, Any]:
        """Add a TPM baseline from a reference event log (Add-HgsAttestationTpmPolicy)."""
        log = b64url_decode(body.event_log, what="event log")
        return base.add_baseline(_ctx(request, role), body.name, log, body.pcrs)

    @app.delete("/admin/v1/baselines/{name}", tags=["admin"])
    def delete_baseline(request: Request, role: Admin, name: PathName) -> dict[str, Any]:
        """Remove a TPM baseline (Remove-HgsAttestationTpmPolicy)."""
        return base.remove_baseline(_ctx(request, role), name)

    @app.get("/admin/v1/candidates", tags=["admin"])
    def get_candidates(
        request: Request,
        role: Reader,
        state: Annotated[Literal["pending", "approved", "rejected"] | None, Query()] = None,
    ) -> list[dict[str, Any]]:
        """Candidate baselines filed from hosts' verified boots."""
        wanted = None if state is None else CandidateState(state)
        return base.list_candidates(_ctx(request, role), wanted)

    @app.post("/admin/v1/candidates", tags=["admin"], status_code=201)
    def post_candidate(request: Request, role: Admin, body: CandidateRequest) -> dict[str, Any]:
        """File a host's last verified boot as a candidate baseline."""
        return base.file_candidate_from_host(
            _ctx(request, role), body.host_id, body.name, body.reason
        )

    @app.post("/admin/v1/candidates/{cid}/approve", tags=["admin"])
    def approve(request: Request, role: Admin, cid: CandidateId, body: ApproveRequest) -> Any:
        """Register a candidate as a baseline, in one step."""
        return base.approve_candidate(_ctx(request, role), cid, body.name)

    @app.post("/admin/v1/candidates/{cid}/reject", tags=["admin"])
    def reject(request: Request, role: Admin, cid: CandidateId, body: RejectRequest) -> Any:
        """Reject a candidate, keeping the reason on record."""
        return base.reject_candidate(_ctx(request, role), cid, body.reason)


def _policy_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/policies", tags=["admin"])
    def get_policies(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Every attestation policy: state, evidence read, Linux gap (Get-HgsAttestationPolicy)."""
        return adm.list_policies(_ctx(request, role))

    @app.put("/admin/v1/policies/{name}", tags=["admin"])
    def put_policy(
        request: Request, role: Admin, name: PolicyName, body: PolicyStateRequest
    ) -> dict[str, Any]:
        """Enable, disable or lock a policy (Enable-/Disable-HgsAttestationPolicy).

        A locked policy cannot be disabled (409).
        """
        return adm.set_policy(_ctx(request, role), name, PolicyState(body.state))


def _report_routes(app: FastAPI) -> None:
    @app.get("/admin/v1/hosts", tags=["admin"])
    def get_hosts(request: Request, role: Reader) -> list[dict[str, Any]]:
        """Every known host with its registrations and last attestation status and time."""
        return reports.list_hosts(_ctx(request, role))

    @app.get("/admin/v1/hosts/{host_id}/explain", tags=["admin"])
    def explain(request: Request, role: Reader, host_id: PathHost) -> dict[str, Any]:
        """A host's last attestation: verdicts, failures, its boot against today's baselines."""
        return reports.explain_host(_ctx(request, role), host_id)

    @app.post("/admin/v1/what-if", tags=["admin"])
    def post_what_if(request: Request, role: Reader, body: WhatIfRequest) -> dict[str, Any]:
        """Who would pass or fail under a proposed change (nothing is changed)."""
        return reports.run_what_if(_ctx(request, role), trust_change(body.change))

    @app.get("/admin/v1/audit", tags=["admin"])
    def get_audit(
        request: Request,
        role: Reader,
        since: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=reports.MAX_AUDIT_PAGE)] = 100,
        kind: Annotated[str | None, Query(pattern=r"^[a-z][a-z0-9-]{0,31}$")] = None,
    ) -> dict[str, Any]:
        """A page of audit records after ``since``, in order."""
        return reports.audit_records(_ctx(request, role), since=since, limit=limit, kind=kind)

    @app.get("/admin/v1/audit/verify", tags=["admin"])
    def verify_audit(request: Request, role: Reader) -> dict[str, Any]:
        """Verify the audit log's hash chain; ``ok`` false names the first broken record."""
        return reports.verify_audit(_ctx(request, role))
