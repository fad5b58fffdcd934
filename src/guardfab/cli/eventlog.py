"""``guardfab eventlog``: show a TCG PC Client event log to a person.

Parsing, replay, digest checks and facts all live in :mod:`guardfab.tpm.eventlog`;
this command reads the file, asks for them and prints.
"""

from __future__ import annotations

from pathlib import Path

import click

from guardfab.cli.output import emit, handle_errors, json_option
from guardfab.files import read_bounded
from guardfab.tpm.constants import TpmAlg
from guardfab.tpm.eventlog import MAX_LOG_BYTES, PCR_COUNT, Event, EventLog, parse_event_log
from guardfab.tpm.events import alg_name
from guardfab.tpm.logfacts import LogFacts

_SUMMARY_WIDTH = 72
_CHECK_LABELS = {"verified": "ok", "mismatch": "MISMATCH", "unchecked": "-"}


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--pcr",
    "pcrs",
    multiple=True,
    type=click.IntRange(0, PCR_COUNT - 1),
    help="Show only events and values of this PCR (repeatable). Facts always use the whole log.",
)
@click.option("--verbose", "-v", is_flag=True, help="Show every digest and all decoded fields.")
@json_option
@handle_errors
def eventlog(path: Path, pcrs: tuple[int, ...], verbose: bool, as_json: bool) -> None:
    """Parse and replay the event log at PATH.

    PATH is a binary TCG PC Client log, such as
    /sys/kernel/security/tpm0/binary_bios_measurements. Prints each event (PCR,
    type, digest, decoded data and whether the data matches its digest), the
    PCR values the log replays to in every bank, and the facts an attestation
    policy reads from it.
    """
    log = parse_event_log(read_bounded(path, limit=MAX_LOG_BYTES, what="event log"))
    selected = set(pcrs) if pcrs else None
    emit(as_json, log.to_dict(selected), lambda: _render(log, selected, verbose=verbose))


def _render(log: EventLog, pcrs: set[int] | None, *, verbose: bool) -> str:
    banks = ", ".join(alg_name(bank) for bank in log.banks)
    lines = [f"{log.format.value} event log, {len(log.events)} events, banks: {banks}"]
    lines += [f"note: {note}" for note in log.notes]
    shown = log.banks[0] if TpmAlg.SHA256 not in log.banks else int(TpmAlg.SHA256)
    lines.append(f"{'#':>4} {'PCR':>3}  {'type':<34} {alg_name(shown):<8} {'check':<8} summary")
    for event in log.events:
        if pcrs is None or event.pcr in pcrs:
            lines += _event_lines(log, event, shown, verbose=verbose)
    lines += _pcr_lines(log, pcrs)
    lines += _fact_lines(log.facts())
    return "\n".join(lines)


def _event_lines(log: EventLog, event: Event, shown: int, *, verbose: bool) -> list[str]:
    digest = event.digests.get(shown)
    short = digest.hex()[:8] if digest is not None else "(none)"
    check = _CHECK_LABELS[log.digest_check(event).status.value]
    decoded = event.decode(log.uintn_size)
    summary = decoded.summary.replace("\n", " ")
    if not verbose and len(summary) > _SUMMARY_WIDTH:
        summary = summary[: _SUMMARY_WIDTH - 3] + "..."
    lines = [
        f"{event.number:>4} {event.pcr:>3}  {event.type_name:<34} {short:<8} {check:<8} {summary}"
    ]
    if verbose:
        lines += [f"{'':10}{alg_name(a)}: {d.hex()}" for a, d in event.digests.items()]
        lines += [f"{'':10}{key}: {value}" for key, value in decoded.fields.items()]
    return lines


def _pcr_lines(log: EventLog, pcrs: set[int] | None) -> list[str]:
    lines = []
    for bank, values in log.replay().items():
        lines.append(f"PCRs ({alg_name(bank)}):")
        lines += [
            f"  {index:>2}  {value.hex()}"
            for index, value in sorted(values.items())
            if pcrs is None or index in pcrs
        ]
    unreplayable = [alg_name(b) for b in log.banks if b not in log.replayable_banks]
    if unreplayable:
        lines.append(f"not replayed (no hash implementation here): {', '.join(unreplayable)}")
    return lines


def _fact_lines(facts: LogFacts) -> list[str]:
    lines = ["facts:"]
    for name, fact in facts.items():
        value = "unknown" if fact.value is None else _short_value(fact.value)
        where = f" [events {', '.join(map(str, fact.events))}]" if fact.events else ""
        lines.append(f"  {name:<22} {value:<8} {fact.note}{where}")
    return lines


def _short_value(value: object) -> str:
    if isinstance(value, dict):
        return f"{len(value)} vars"
    return str(value).lower()
