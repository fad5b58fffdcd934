"""HGS administration: read-only reports -- hosts, explain, what-if, the audit log.

Nothing here writes. ``explain`` and ``what-if`` read the verified host
summaries every TPM attestation leaves in ``hosts/last/<host>`` (its boot's
events from ``hosts/boot/<host>``, :func:`~guardfab.hgs.last_record.resolve_record`) and run the
engine's own code over them (baseline matching, :func:`assess_summary`,
:func:`~guardfab.attestation.whatif.what_if`), so an administrator sees what
a real attestation would decide, not an approximation of it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from guardfab.attestation.evaluation import assess_summary
from guardfab.attestation.policies import policy_named
from guardfab.attestation.summary import HostSummary
from guardfab.attestation.trust import TrustState
from guardfab.attestation.whatif import (
    AddBaseline,
    AddCiPolicy,
    RemoveBaseline,
    RemoveCiPolicy,
    RevokeHost,
    SetPolicyState,
    TrustChange,
    what_if,
)
from guardfab.errors import FormatError, UsageError
from guardfab.hgs import registry as reg
from guardfab.hgs.admin import Admin, AlreadyExistsError, NotFoundError, check_name
from guardfab.hgs.last_record import UnresolvedBootError, read_last_record, resolve_record
from guardfab.store.audit import walk
from guardfab.store.base import Entry
from guardfab.store.errors import AuditChainError

#: Most audit records one page returns.
MAX_AUDIT_PAGE = 1000


def _last_entries(admin: Admin) -> Iterator[tuple[str, Entry]]:
    for entry in walk(admin.store, reg.LAST):
        yield entry.key.removeprefix(reg.LAST), entry


def _last_records(admin: Admin) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every host's last record as stored: the result and a summary without its boot."""
    for host_id, entry in _last_entries(admin):
        record = reg.decode(entry.value, what=entry.key)
        if isinstance(record, dict):
            yield host_id, record


def last_record(admin: Admin, host_id: str) -> dict[str, Any]:
    """``host_id``'s last record, its summary whole (the boot read from ``hosts/boot/``).

    Raises:
        NotFoundError: the host never attested.
        UnresolvedBootError: the record names a boot the store does not hold.
    """
    record = read_last_record(admin.store, host_id)
    if record is None:
        raise NotFoundError(f"an attestation of host {host_id!r} is not registered")
    return record


def _last_view(result: Any) -> dict[str, Any] | None:
    if not isinstance(result, dict):
        return None
    keys = ("status", "mode", "verified_at", "failed_policies")
    return {key: result.get(key) for key in keys}


def list_hosts(admin: Admin) -> list[dict[str, Any]]:
    """Every known host: registrations, revocation, and its last attestation's status and time."""
    trust = admin.registry.trust()
    rows: dict[str, dict[str, Any]] = {}

    def row(host_id: str) -> dict[str, Any]:
        empty = {"host_id": host_id, "registrations": [], "revoked": False, "last": None}
        found = rows.setdefault(host_id, empty)
        found["revoked"] = host_id in trust.revoked_hosts
        return found

    for host in trust.tpm_hosts:
        row(host.host_id)["registrations"].append(
            {"kind": "tpm", "ek_digest": host.ek_digest.hex()}
        )
    for key in trust.host_keys:
        registration = {"kind": "host-key", "key_id": key.key_id, "revoked": key.revoked}
        row(key.host_id)["registrations"].append(registration)
    for host_id in trust.revoked_hosts:
        row(host_id)
    for host_id, record in _last_records(admin):
        row(host_id)["last"] = _last_view(record.get("result"))
    return [rows[host_id] for host_id in sorted(rows)]


# --------------------------------------------------------------------- explain


def result_lines(result: dict[str, Any]) -> list[str]:
    """A stored attestation result for a person: status, failed checks, every verdict."""
    lines = [
        f"host: {result.get('host_id')}  mode: {result.get('mode')}  "
        f"attested: {result.get('verified_at')}"
    ]
    status = f"status: {result.get('status')}"
    if result.get("failed_policies"):
        status += f" (failed policies: {', '.join(result['failed_policies'])})"
    lines.append(status)
    lines += [f"warning: {warning}" for warning in result.get("warnings", [])]
    for failure in result.get("failures", []):
        lines.append(
            f"FAILED check {failure.get('check')} [{failure.get('error')}]: {failure.get('reason')}"
        )
        if failure.get("hint"):
            lines.append(f"  hint: {failure['hint']}")
    verdicts = result.get("verdicts", [])
    lines.append("policies (as evaluated then):")
    width = max((len(str(v.get("policy"))) for v in verdicts), default=0)
    for verdict in verdicts:
        mark = "!" if verdict.get("blocking") else " "
        lines.append(
            f" {mark} {verdict.get('policy')!s:<{width}}  {verdict.get('verdict')!s:<13} "
            f"({verdict.get('policy_state')}) {verdict.get('reason')}"
        )
    return lines


def _boot_today(
    admin: Admin, summary: HostSummary
) -> tuple[dict[str, Any] | None, dict[str, Any], list[str]]:
    """The boot against today's trust: closest baseline, the status it would get, lines."""
    trust = admin.registry.trust()
    comparison = trust.baseline_set.match(summary)
    today = assess_summary(summary, trust, host_key=None, now=admin.now())
    status = {"status": today.status.value, "failed_policies": list(today.failed_policies)}
    lines = ["baseline (against the baselines registered now):"]
    if comparison is None:
        lines.append("  no TPM baseline is registered (hgs baseline add)")
    else:
        lines += ["  " + line for line in comparison.lines()]
    failed = today.failed_policies
    lines.append(
        f"with the same boot, attesting now would give: {today.status.value}"
        + (f" (failed policies: {', '.join(failed)})" if failed else "")
    )
    return (None if comparison is None else comparison.to_dict()), status, lines


def explain_host(admin: Admin, host_id: str) -> dict[str, Any]:
    """A host's last attestation: every verdict, failure, and its boot against today's baselines.

    The baseline comparison is recomputed from the stored verified summary, so
    it names the event-log entries that differ from the closest baseline
    registered *now* (after a baseline was added or removed, not as it was then).
    """
    check_name(host_id, "host id")
    record = last_record(admin, host_id)
    result = record.get("result") or {}
    lines = result_lines(result)
    baseline_now = status_now = None
    if record.get("summary") is not None:
        baseline_now, status_now, more = _boot_today(
            admin, HostSummary.from_dict(record["summary"])
        )
        lines += more
    else:
        lines.append("baseline: no verified boot was recorded (not TPM mode, or it failed earlier)")
    return {
        "host_id": host_id,
        "recorded": result,
        "baseline_now": baseline_now,
        "status_now": status_now,
        "explanation": lines,
    }


# --------------------------------------------------------------------- what-if


def _check_change(trust: TrustState, change: TrustChange) -> None:
    """Refuse a change that could not be made, with the error the real change would give."""
    if isinstance(change, SetPolicyState):
        try:
            policy_named(change.name)
        except UsageError as exc:
            raise NotFoundError(str(exc), hint=f"known policies: {exc.hint}") from exc
    elif isinstance(change, RemoveBaseline) and change.name not in trust.baseline_set.names:
        raise NotFoundError(f"no baseline is named {change.name!r}")
    elif isinstance(change, AddBaseline) and change.baseline.name in trust.baseline_set.names:
        raise AlreadyExistsError(f"a baseline named {change.baseline.name!r} is already registered")
    elif isinstance(change, RemoveCiPolicy) and all(
        p.name != change.name for p in trust.ci_policies
    ):
        raise NotFoundError(f"no CI policy is named {change.name!r}")
    elif isinstance(change, AddCiPolicy) and any(
        p.name == change.policy.name or p.digest == change.policy.digest for p in trust.ci_policies
    ):
        raise AlreadyExistsError("a CI policy with this name or digest is already registered")
    elif isinstance(change, RevokeHost):
        check_name(change.host_id, "host id")


def run_what_if(admin: Admin, change: TrustChange) -> dict[str, Any]:
    """Who would pass or fail if ``change`` were made, from every host's last verified boot.

    Hosts without a verified TPM boot on record (host-key and admin-group hosts,
    or hosts that never got that far) cannot be re-evaluated and are listed as skipped.
    """
    trust = admin.registry.trust()
    _check_change(trust, change)
    summaries: list[HostSummary] = []
    skipped: list[dict[str, str]] = []
    for host_id, entry in _last_entries(admin):
        try:
            record = resolve_record(admin.store, host_id, entry)
        except (FormatError, UnresolvedBootError) as exc:
            skipped.append({"host_id": host_id, "reason": f"stored record unreadable: {exc}"})
            continue
        if not isinstance(record, dict) or record.get("summary") is None:
            skipped.append({"host_id": host_id, "reason": "no verified TPM boot on record"})
            continue
        try:
            summaries.append(HostSummary.from_dict(record["summary"]))
        except FormatError as exc:
            skipped.append({"host_id": host_id, "reason": f"stored summary unreadable: {exc}"})
    report = what_if(change, trust, summaries, now=admin.now())
    lines = report.explain().splitlines()
    lines += [f"  skipped {s['host_id']}: {s['reason']}" for s in skipped]
    return {**report.to_dict(), "skipped": skipped, "explanation": lines}


# --------------------------------------------------------------------- audit


def audit_records(
    admin: Admin, *, since: int = 0, limit: int = 100, kind: str | None = None
) -> dict[str, Any]:
    """A page of audit records after ``since`` (optionally of one ``kind``), in order.

    ``next_since`` is where the next page starts, or None at the end of the log.
    """
    limit = max(1, min(limit, MAX_AUDIT_PAGE))
    records: list[dict[str, Any]] = []
    for record in admin.audit.iter_records(max(0, since)):
        if kind is None or record.kind == kind:
            records.append(dataclasses.asdict(record))
        if len(records) >= limit:
            return {"records": records, "next_since": record.seq}
    return {"records": records, "next_since": None}


def verify_audit(admin: Admin) -> dict[str, Any]:
    """Walk the whole hash chain; report its extent or the first broken record."""
    try:
        report = admin.audit.verify()
    except AuditChainError as exc:
        return {
            "ok": False,
            "seq": exc.seq,
            "reason": exc.reason,
            "message": str(exc),
            "hint": exc.hint,
        }
    return {
        "ok": True,
        "records": report.records,
        "head": {"seq": report.head.seq, "hash": report.head.hash},
        "first_time": report.first_time,
        "last_time": report.last_time,
        "kinds": report.kinds,
        "outcomes": report.outcomes,
    }
