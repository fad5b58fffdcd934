"""``guardfab hgs`` administration: baselines, CI policies, policies, reports, audit, diagnose.

Attached to the ``hgs`` group when :mod:`guardfab.cli.hgs_admin` is imported.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import click

from guardfab.cli.common import IdArgumentCommand
from guardfab.cli.hgs import hgs
from guardfab.cli.hgs_admin_common import (
    ConnectionOptions,
    call,
    connection_options,
    read_input,
    table,
    with_notes,
)
from guardfab.cli.output import emit, handle_errors, json_option

_file = click.Path(exists=True, dir_okay=False, path_type=Path)
_MAX_LOG = 8 * 1024 * 1024
_MAX_CI_FILE = 64 * 1024 * 1024


def _pcr_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise click.BadParameter(
            "a comma-separated list of PCR numbers, e.g. 0,1,2,3,4,5,6,7"
        ) from None


# --------------------------------------------------------------------- baselines


@hgs.group("baseline")
def baseline() -> None:
    """TPM baselines: known-good boots hosts must match (Add-HgsAttestationTpmPolicy), and
    candidates filed from hosts' verified boots.
    """


def _baseline_table(rows: list[dict[str, Any]]) -> str:
    return table(
        (
            (
                r["name"],
                ",".join(map(str, r["pcr_set"])),
                r["events"],
                "yes" if r["records_secure_boot_variables"] else "no",
            )
            for r in rows
        ),
        ("NAME", "PCRS", "EVENTS", "SECURE BOOT VARIABLES"),
    )


@baseline.command("add")
@click.option("--name", required=True, help="Name of the new baseline.")
@click.option("--log", "log_file", type=_file, required=True, help="The reference host's TCG log.")
@click.option("--pcrs", default=None, help="PCRs the baseline covers [default: 0-7].")
@connection_options
@json_option
@handle_errors
def baseline_add(
    name: str, log_file: Path, pcrs: str | None, conn: ConnectionOptions, as_json: bool
) -> None:
    """Add a TPM baseline from a reference host's event log (Add-HgsAttestationTpmPolicy).

    On Linux the log is /sys/kernel/security/tpm0/binary_bios_measurements. Take
    it from a host you trust: a log file alone proves nothing. After a firmware
    update, 'file-candidate' from a host's verified attestation is the safer path.
    """
    log = read_input(log_file, limit=_MAX_LOG, what="event log")
    data = call(conn, lambda c: c.add_baseline(name, log, _pcr_list(pcrs)))
    emit(
        as_json,
        data,
        lambda: with_notes(f"added baseline {name}:\n" + _baseline_table([data]), data),
    )


@baseline.command("list")
@connection_options
@json_option
@handle_errors
def baseline_list(conn: ConnectionOptions, as_json: bool) -> None:
    """Registered TPM baselines (Get-HgsAttestationPolicy lists them in the reference)."""
    rows = call(conn, lambda c: c.baselines())
    emit(as_json, rows, lambda: _baseline_table(rows))


@baseline.command("show")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def baseline_show(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """One baseline in full: PCR values and the reference events."""
    data = call(conn, lambda c: c.baseline(name))

    def human() -> str:
        lines = [f"baseline {data['name']}"]
        lines += [f"  PCR {pcr}: {value}" for pcr, value in data["pcrs"]["sha256"].items()]
        lines += [
            f"  #{e['number']} PCR {e['pcr']} sha256:{e['digest'][:16]} {e['summary']}"
            for e in data["events"]
        ]
        return "\n".join(lines)

    emit(as_json, data, human)


@baseline.command("remove")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def baseline_remove(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Remove a TPM baseline (Remove-HgsAttestationTpmPolicy). Try 'hgs what-if
    --remove-baseline NAME' first to see which hosts would fail.
    """
    data = call(conn, lambda c: c.remove_baseline(name))
    emit(as_json, data, f"removed baseline {name}")


@baseline.command("candidates")
@click.option("--state", type=click.Choice(["pending", "approved", "rejected"]), default=None)
@connection_options
@json_option
@handle_errors
def baseline_candidates(state: str | None, conn: ConnectionOptions, as_json: bool) -> None:
    """Candidate baselines filed from hosts' verified boots (no reference counterpart)."""
    rows = call(conn, lambda c: c.candidates(state))
    emit(
        as_json,
        rows,
        lambda: table(
            (
                (
                    r["id"],
                    r["baseline"]["name"],
                    r["host_id"],
                    r["state"],
                    r["filed_at"],
                    r["reason"],
                )
                for r in rows
            ),
            ("ID", "NAME", "HOST", "STATE", "FILED AT", "REASON"),
        ),
    )


@baseline.command("file-candidate")
@click.option("--host", "host_id", required=True, help="Host whose last verified boot to file.")
@click.option("--name", required=True, help="Name of the baseline it becomes when approved.")
@click.option("--reason", default="", help="Why (e.g. the firmware update it follows).")
@connection_options
@json_option
@handle_errors
def baseline_file_candidate(
    host_id: str, name: str, reason: str, conn: ConnectionOptions, as_json: bool
) -> None:
    """File HOST's last verified boot as a candidate baseline, to approve with one command
    (no reference counterpart: there a new baseline is a new Add-HgsAttestationTpmPolicy).

    Only a TPM attestation whose quote and event log verified leaves a boot to
    file, so the candidate is bound by the host's TPM, unlike a log file.
    """
    data = call(conn, lambda c: c.file_candidate(host_id, name, reason))
    emit(
        as_json,
        data,
        f"filed candidate {data['id']} ({name}) from host {host_id}; approve "
        f"with: guardfab hgs baseline approve {data['id']}",
    )


@baseline.command("approve", cls=IdArgumentCommand)
@click.argument("candidate_id")
@click.option("--name", default=None, help="Register it under this name instead.")
@connection_options
@json_option
@handle_errors
def baseline_approve(
    candidate_id: str, name: str | None, conn: ConnectionOptions, as_json: bool
) -> None:
    """Register a candidate as a TPM baseline, in one step (no reference counterpart: it
    does what Add-HgsAttestationTpmPolicy does, from a verified boot instead of a log file).
    """
    data = call(conn, lambda c: c.approve_candidate(candidate_id, name))
    emit(as_json, data, lambda: with_notes(f"approved: baseline {data['name']} added", data))


@baseline.command("reject", cls=IdArgumentCommand)
@click.argument("candidate_id")
@click.option("--reason", required=True, help="Why (kept on record and in the audit log).")
@connection_options
@json_option
@handle_errors
def baseline_reject(candidate_id: str, reason: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Reject a candidate baseline, keeping the reason (no reference counterpart)."""
    data = call(conn, lambda c: c.reject_candidate(candidate_id, reason))
    emit(as_json, data, f"rejected candidate {candidate_id}")


# --------------------------------------------------------------------- CI policies


def _ci_digest(policy_file: Path | None, digest: str | None) -> str:
    if (policy_file is None) == (digest is None):
        raise click.UsageError("give --file FILE or --digest SHA256, not both")
    if policy_file is not None:
        return hashlib.sha256(
            read_input(policy_file, limit=_MAX_CI_FILE, what="CI policy")
        ).hexdigest()
    assert digest is not None
    return digest.lower()


@hgs.group("ci-policy")
def ci_policy() -> None:
    """Code integrity policies: files (e.g. an IMA policy) the boot loader measures."""


@ci_policy.command("add")
@click.option("--name", required=True, help="Name of the CI policy.")
@click.option("--file", "policy_file", type=_file, help="The policy file (its SHA-256 is sent).")
@click.option("--digest", default=None, help="The policy file's SHA-256 (hex) instead of --file.")
@connection_options
@json_option
@handle_errors
def ci_policy_add(
    name: str, policy_file: Path | None, digest: str | None, conn: ConnectionOptions, as_json: bool
) -> None:
    """Register a CI policy (Add-HgsAttestationCIPolicy): hosts pass Hgs_CiPolicy when the
    boot loader measured this file (GRUB: PCR 9).
    """
    hex_digest = _ci_digest(policy_file, digest)
    data = call(conn, lambda c: c.add_ci_policy(name, digest=hex_digest))
    emit(as_json, data, f"registered CI policy {name} (sha256:{data['digest']})")


@ci_policy.command("list")
@connection_options
@json_option
@handle_errors
def ci_policy_list(conn: ConnectionOptions, as_json: bool) -> None:
    """Registered CI policies (Get-HgsAttestationPolicy lists them in the reference)."""
    rows = call(conn, lambda c: c.ci_policies())
    emit(
        as_json, rows, lambda: table(((r["name"], r["digest"]) for r in rows), ("NAME", "SHA-256"))
    )


@ci_policy.command("remove")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def ci_policy_remove(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Remove a CI policy (Remove-HgsAttestationCIPolicy)."""
    call(conn, lambda c: c.remove_ci_policy(name))
    emit(as_json, {"name": name, "removed": True}, f"removed CI policy {name}")


# --------------------------------------------------------------------- attestation policies


@hgs.group("policy")
def policy() -> None:
    """Attestation policies (Hgs_*): list, enable, disable, lock. See
    docs/attestation-policies.md for what each reads and what Linux cannot show.
    """


@policy.command("list")
@connection_options
@json_option
@handle_errors
def policy_list(conn: ConnectionOptions, as_json: bool) -> None:
    """Every attestation policy and its state (Get-HgsAttestationPolicy)."""
    rows = call(conn, lambda c: c.policies())
    emit(
        as_json,
        rows,
        lambda: table(
            (
                (r["name"], r["state"], r["default_state"], "yes" if r["linux_gap"] else "")
                for r in rows
            ),
            ("POLICY", "STATE", "DEFAULT", "LINUX GAP"),
        ),
    )


def _set_policy(conn: ConnectionOptions, name: str, state: str, as_json: bool) -> None:
    data = call(conn, lambda c: c.set_policy(name, state))
    emit(as_json, data, f"policy {name}: {data['before']} -> {data['state']}")


@policy.command("enable")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def policy_enable(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Enforce a policy (Enable-HgsAttestationPolicy)."""
    _set_policy(conn, name, "enabled", as_json)


@policy.command("disable")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def policy_disable(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Stop enforcing a policy (Disable-HgsAttestationPolicy); a locked one cannot be."""
    _set_policy(conn, name, "disabled", as_json)


@policy.command("lock")
@click.argument("name")
@connection_options
@json_option
@handle_errors
def policy_lock(name: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Enforce a policy for good: a locked policy can never be disabled (one-way; the
    reference ships some policies locked).
    """
    _set_policy(conn, name, "locked", as_json)


# --------------------------------------------------------------------- explain and what-if


@hgs.command("explain")
@click.argument("host_id")
@connection_options
@json_option
@handle_errors
def explain(host_id: str, conn: ConnectionOptions, as_json: bool) -> None:
    """Why HOST passed or failed its last attestation: every policy verdict, every failed
    check, and the event-log entries that differ from the closest baseline registered now.
    (No reference counterpart.)
    """
    data = call(conn, lambda c: c.explain(host_id))
    emit(as_json, data, lambda: "\n".join(data["explanation"]))


_WHAT_IF_OPTIONS = (
    "enable_policy",
    "disable_policy",
    "lock_policy",
    "add_baseline",
    "remove_baseline",
    "add_ci_policy",
    "remove_ci_policy",
    "revoke_host",
)


_POLICY_STATES = {"enable_policy": "enabled", "disable_policy": "disabled", "lock_policy": "locked"}


def _change(options: dict[str, Any]) -> dict[str, Any]:
    from guardfab.hgs import client as api  # noqa: PLC0415 - keep 'guardfab --help' quick

    chosen = [key for key in _WHAT_IF_OPTIONS if options.get(key)]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one change (see --help)")
    key = chosen[0]
    value: str = options[key]
    if key in _POLICY_STATES:
        return api.policy_change(value, _POLICY_STATES[key])
    if key == "add_baseline":
        if options.get("log") is None:
            raise click.UsageError("--add-baseline needs --log FILE")
        log = read_input(options["log"], limit=_MAX_LOG, what="event log")
        return api.add_baseline_change(value, log)
    if key == "add_ci_policy":
        digest = _ci_digest(options.get("file"), options.get("digest"))
        return api.add_ci_policy_change(value, digest)
    simple = {
        "remove_baseline": api.remove_baseline_change,
        "remove_ci_policy": api.remove_ci_policy_change,
        "revoke_host": api.revoke_host_change,
    }
    return simple[key](value)


@hgs.command("what-if")
@click.option("--enable-policy", metavar="NAME", help="What if this policy were enabled.")
@click.option("--disable-policy", metavar="NAME", help="What if this policy were disabled.")
@click.option("--lock-policy", metavar="NAME", help="What if this policy were locked.")
@click.option("--add-baseline", metavar="NAME", help="What if a baseline from --log were added.")
@click.option("--log", type=_file, help="Reference event log for --add-baseline.")
@click.option("--remove-baseline", metavar="NAME", help="What if this baseline were removed.")
@click.option(
    "--add-ci-policy", metavar="NAME", help="What if a CI policy (--file/--digest) were added."
)
@click.option("--file", type=_file, help="CI policy file for --add-ci-policy.")
@click.option("--digest", help="CI policy SHA-256 (hex) for --add-ci-policy.")
@click.option("--remove-ci-policy", metavar="NAME", help="What if this CI policy were removed.")
@click.option("--revoke-host", metavar="HOST", help="What if this host were revoked.")
@connection_options
@json_option
@handle_errors
def what_if(conn: ConnectionOptions, as_json: bool, **options: Any) -> None:
    """Who would pass or fail if a change were made, before it is made (no reference
    counterpart). Evaluates every host's last verified boot with the same code as a real
    attestation; nothing is changed. Give exactly one change.
    """
    change = _change(options)
    data = call(conn, lambda c: c.what_if(change))
    emit(as_json, data, lambda: "\n".join(data["explanation"]))


# --------------------------------------------------------------------- audit


@hgs.group("audit")
def audit() -> None:
    """The append-only, hash-chained audit log of every attestation and admin change
    (the reference writes the Windows event log).
    """


@audit.command("list")
@click.option("--since", type=click.IntRange(0), default=0, help="Records after this number.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--kind", default=None, help="Only records of this kind (attestation, admin, ...).")
@connection_options
@json_option
@handle_errors
def audit_list(
    since: int, limit: int, kind: str | None, conn: ConnectionOptions, as_json: bool
) -> None:
    """A page of audit records, oldest first; the last line says where the next page starts
    (the reference's counterpart is the HGS event log in the Windows Event Viewer).
    """
    data = call(conn, lambda c: c.audit(since=since, limit=limit, kind=kind))

    def human() -> str:
        rows = (
            (
                r["seq"],
                r["time"],
                r["kind"],
                r["actor"],
                r["subject"],
                r["outcome"],
                r["details"].get("action") or r["details"].get("status") or "",
            )
            for r in data["records"]
        )
        text = table(rows, ("SEQ", "TIME", "KIND", "ACTOR", "SUBJECT", "OUTCOME", "WHAT"))
        if data["next_since"] is not None:
            text += f"\nmore: --since {data['next_since']}"
        return text

    emit(as_json, data, human)


@audit.command("verify")
@connection_options
@json_option
@handle_errors
def audit_verify(conn: ConnectionOptions, as_json: bool) -> None:
    """Verify the audit log's hash chain end to end; exit 1 naming the first broken record
    (no reference counterpart: the Windows event log is not hash-chained).
    """
    data = call(conn, lambda c: c.verify_audit())
    if data["ok"]:
        text = (
            f"audit log OK: {data['records']} records, head {data['head']['hash'][:16]}, "
            f"{data['first_time']} .. {data['last_time']}"
        )
    else:
        text = f"audit log BROKEN: {data['message']} ({data['reason']})\nhint: {data['hint']}"
    emit(as_json, data, text)
    if not data["ok"]:
        sys.exit(1)


# --------------------------------------------------------------------- diagnose


@hgs.command("diagnose")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="HGS state directory to check (run on the HGS machine, as the service's user).",
)
@click.option("--url", default=None, help="Check the service at this URL [default: hgs.json].")
@json_option
@handle_errors
def diagnose(directory: Path, url: str | None, as_json: bool) -> None:
    """Check the HGS's health and configuration and say how to fix each problem (Get-HgsTrace).

    One line per check (OK, WARN, FAIL, or SKIP when an earlier failure prevents
    it), with the fix for each that is not OK. Exits 1 if any check FAILs.
    """
    from guardfab.hgs.diagnose import run_checks  # noqa: PLC0415 - loads the store and TLS

    report = run_checks(directory, url=url)
    emit(as_json, report.to_dict(), report.explain)
    if not report.ok:
        sys.exit(1)
