"""HGS administration: TPM baselines and candidate baselines.

A baseline is added from a reference host's event log (the reference's
Add-HgsAttestationTpmPolicy with a TCG log). The friendlier path after a
firmware or secure boot update: file the host's last *verified* boot (kept in
``hosts/last/<host>`` and ``hosts/boot/<host>`` by every attestation whose quote
and log verified) as a
candidate, look at it, and approve it with one command. A candidate's id is
derived from its PCR values, so the same boot is never filed twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Sequence
from typing import Any

from guardfab.attestation.baseline import (
    DEFAULT_BASELINE_PCRS,
    CandidateBaseline,
    CandidateState,
    TpmBaseline,
    baseline_from_log,
    file_candidate,
)
from guardfab.attestation.summary import HostSummary, pcr_map_to_dict
from guardfab.errors import UsageError
from guardfab.formats.encoding import canonical_json
from guardfab.hgs import registry as reg
from guardfab.hgs.admin import (
    Admin,
    AlreadyExistsError,
    Change,
    InvalidRequestError,
    NotFoundError,
    check_name,
    valid,
)
from guardfab.hgs.last_record import read_last_record
from guardfab.store.base import ABSENT

#: Largest reference event log accepted (a real one is 20-200 KiB).
MAX_LOG_BYTES = 8 * 1024 * 1024


class AlreadyDecidedError(UsageError):
    """The candidate was already approved or rejected (HTTP 409)."""

    hint = "file the host's boot again under a new name if it is still wanted"


class NoVerifiedBootError(UsageError):
    """The host's last attestation left no verified boot to file (HTTP 409)."""

    hint = (
        "only a TPM attestation whose quote and event log verified leaves one; "
        "let the host attest in TPM mode first"
    )


def baseline_summary(baseline: TpmBaseline) -> dict[str, Any]:
    """A baseline in a few lines: its PCR set and values, event count, secure boot record."""
    return {
        "name": baseline.name,
        "pcr_set": list(baseline.pcr_set),
        "pcrs": {"sha256": pcr_map_to_dict(baseline.pcrs)},
        "events": len(baseline.events),
        "records_secure_boot_variables": baseline.secure_boot_variables is not None,
    }


def _pcr_set(pcrs: Sequence[int] | None) -> tuple[int, ...]:
    return tuple(pcrs) if pcrs else DEFAULT_BASELINE_PCRS


def add_baseline(
    admin: Admin, name: str, log: bytes, pcrs: Sequence[int] | None = None
) -> dict[str, Any]:
    """Register a TPM baseline from a reference host's event log (Add-HgsAttestationTpmPolicy).

    The log is replayed in the SHA-256 bank; PCRs it never extends keep their
    reset value. A log file alone proves nothing about a host: take it from a
    reference host you trust, or prefer a candidate filed from a verified attestation.
    """
    check_name(name, "baseline name")
    if len(log) > MAX_LOG_BYTES:
        raise InvalidRequestError(f"event log: larger than {MAX_LOG_BYTES} bytes")
    baseline = valid(lambda: baseline_from_log(name, log, pcrs=_pcr_set(pcrs)), "baseline")
    return _register(admin, baseline, "add-baseline", {})


def _register(
    admin: Admin,
    baseline: TpmBaseline,
    action: str,
    extra: dict[str, object],
    *,
    expect: Sequence[tuple[str, Any]] = (),
    puts: Sequence[tuple[str, Any]] = (),
) -> dict[str, Any]:
    snap = admin.snapshot()
    if baseline.name in snap.trust.baseline_set.names:
        raise AlreadyExistsError(f"a baseline named {baseline.name!r} is already registered")
    same = snap.trust.baseline_set.exact(baseline.pcrs)
    warnings = [] if same is None else [f"baseline '{same.name}' has the same PCR values"]
    key = reg.BASELINES + baseline.name
    summary = baseline_summary(baseline)
    admin.commit(
        snap,
        Change(
            action,
            f"baseline:{baseline.name}",
            {**summary, **extra},
            [(key, baseline.to_dict()), *puts],
            expect=[(key, ABSENT), *expect],
        ),
    )
    return {**summary, **extra, "warnings": warnings}


def remove_baseline(admin: Admin, name: str) -> dict[str, Any]:
    """Remove a TPM baseline (Remove-HgsAttestationTpmPolicy)."""
    check_name(name, "baseline name")
    key = reg.BASELINES + name
    snap = admin.snapshot()
    record, revision = admin.load(key, f"baseline {name!r}")
    summary = baseline_summary(TpmBaseline.from_dict(record))
    admin.commit(
        snap, Change("remove-baseline", f"baseline:{name}", summary, [], [key], [(key, revision)])
    )
    return summary


def list_baselines(admin: Admin) -> list[dict[str, Any]]:
    """Registered baselines, summarized (Get-HgsAttestationPolicy lists them in the reference)."""
    return [baseline_summary(b) for b in admin.registry.trust().baselines]


def get_baseline(admin: Admin, name: str) -> dict[str, Any]:
    """One baseline in full: PCR values, reference events, secure boot digests."""
    check_name(name, "baseline name")
    record, _revision = admin.load(reg.BASELINES + name, f"baseline {name!r}")
    return dict(record)


# --------------------------------------------------------------------- candidates


def candidate_id(baseline: TpmBaseline) -> str:
    """The id of a candidate: from its PCR values, so one boot is filed once."""
    values = canonical_json({"sha256": pcr_map_to_dict(baseline.pcrs)})
    return hashlib.sha256(values).hexdigest()[:16]


def _candidate_view(cid: str, candidate: CandidateBaseline) -> dict[str, Any]:
    return {
        "id": cid,
        "host_id": candidate.host_id,
        "state": candidate.state.value,
        "filed_at": candidate.filed_at.isoformat(),
        "decided_at": None if candidate.decided_at is None else candidate.decided_at.isoformat(),
        "reason": candidate.reason,
        "baseline": baseline_summary(candidate.baseline),
    }


def _host_summary(admin: Admin, host_id: str) -> HostSummary:
    record = read_last_record(admin.store, host_id)
    if record is None:
        raise NotFoundError(f"an attestation of host {host_id!r} is not registered")
    summary = record.get("summary") if isinstance(record, dict) else None
    if summary is None:
        raise NoVerifiedBootError(f"host {host_id!r}'s last attestation left no verified boot")
    return HostSummary.from_dict(summary)


def file_candidate_from_host(
    admin: Admin, host_id: str, name: str, reason: str = ""
) -> dict[str, Any]:
    """File a host's last verified boot as a candidate baseline ``name``."""
    check_name(host_id, "host id")
    check_name(name, "baseline name")
    _check_reason(reason)
    summary = _host_summary(admin, host_id)
    why = reason or f"filed from host {host_id}'s attestation of {summary.verified_at.isoformat()}"
    candidate = valid(lambda: file_candidate(name, summary, now=admin.now(), reason=why), "boot")
    cid = candidate_id(candidate.baseline)
    key = reg.CANDIDATES + cid
    snap = admin.snapshot()
    existing = admin.store.get(key)
    if existing is not None:
        state = reg.decode(existing.value, what=key).get("state")
        raise AlreadyExistsError(f"this boot is already filed as candidate {cid} ({state})")
    view = _candidate_view(cid, candidate)
    admin.commit(
        snap,
        Change(
            "file-candidate",
            f"candidate:{cid}",
            view,
            [(key, candidate.to_dict())],
            expect=[(key, ABSENT)],
        ),
        trust=False,
    )
    return view


def _check_reason(reason: str) -> None:
    if len(reason) > 512 or not reason.isprintable():
        raise InvalidRequestError("reason: at most 512 printable characters")


def _load_candidate(admin: Admin, cid: str) -> tuple[CandidateBaseline, int]:
    if not re.fullmatch(r"[0-9a-f]{16}", cid):
        raise InvalidRequestError("candidate id: 16 lower-case hex digits")
    record, revision = admin.load(reg.CANDIDATES + cid, f"candidate {cid}")
    candidate = CandidateBaseline.from_dict(record)
    if candidate.state is not CandidateState.PENDING:
        raise AlreadyDecidedError(f"candidate {cid} is already {candidate.state.value}")
    return candidate, revision


def list_candidates(admin: Admin, state: CandidateState | None = None) -> list[dict[str, Any]]:
    """Filed candidates (all, or those in ``state``), newest first."""
    out = []
    for entry in admin.store.list(reg.CANDIDATES):
        candidate = CandidateBaseline.from_dict(reg.decode(entry.value, what=entry.key))
        if state is None or candidate.state is state:
            out.append(_candidate_view(entry.key.removeprefix(reg.CANDIDATES), candidate))
    return sorted(out, key=lambda view: view["filed_at"], reverse=True)


def approve_candidate(admin: Admin, cid: str, name: str | None = None) -> dict[str, Any]:
    """Register a candidate as a baseline (under ``name`` if given) in one transaction."""
    candidate, revision = _load_candidate(admin, cid)
    if name is not None:
        check_name(name, "baseline name")
        renamed = dataclasses.replace(candidate.baseline, name=name)
        candidate = dataclasses.replace(candidate, baseline=renamed)
    existing = admin.registry.trust().baseline_set.names
    if candidate.baseline.name in existing:
        raise AlreadyExistsError(
            f"a baseline named {candidate.baseline.name!r} is already registered",
            hint="approve it under another name (--name)",
        )
    approved = candidate.approve(now=admin.now(), existing=existing)
    key = reg.CANDIDATES + cid
    return _register(
        admin,
        approved.baseline,
        "approve-candidate",
        {"candidate": cid, "host_id": candidate.host_id},
        expect=[(key, revision)],
        puts=[(key, approved.to_dict())],
    )


def reject_candidate(admin: Admin, cid: str, reason: str) -> dict[str, Any]:
    """Reject a candidate; the reason stays on record and in the audit log."""
    _check_reason(reason)
    if not reason:
        raise InvalidRequestError("reason: say why the candidate is rejected")
    candidate, revision = _load_candidate(admin, cid)
    rejected = candidate.reject(now=admin.now(), reason=reason)
    key = reg.CANDIDATES + cid
    view = _candidate_view(cid, rejected)
    snap = admin.snapshot()
    admin.commit(
        snap,
        Change(
            "reject-candidate",
            f"candidate:{cid}",
            view,
            [(key, rejected.to_dict())],
            expect=[(key, revision)],
        ),
        trust=False,
    )
    return view
