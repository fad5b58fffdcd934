"""Fuzz the TCG PC Client event log parser and everything that reads a parsed log.

Whatever parses is also replayed in every bank, digest-checked, decoded event
by event, turned into facts and serialized to JSON, so a crash anywhere a
verifier or ``guardfab eventlog`` touches untrusted log bytes is found. Seeds
in ``fuzz/corpus/eventlog`` are small logs from ``shared/vectors/eventlogs``
(tpm2-tools test fixtures): a four-bank log, a Spec ID header with vendor data
and a systemd-boot log.
"""

from __future__ import annotations

import json
import sys

import atheris

with atheris.instrument_imports():
    from guardfab.tpm.eventlog import parse_event_log

from fuzz_common import expect_only_invalid_input


def _load_and_use(data: bytes) -> None:
    log = parse_event_log(data)
    json.dumps(log.to_dict())
    for bank in log.replayable_banks:
        log.facts(bank)


def test_one_input(data: bytes) -> None:
    expect_only_invalid_input(_load_and_use, data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
