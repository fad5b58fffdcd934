"""Fuzz the TPMS_ATTEST and TPMT_SIGNATURE unmarshallers (what a host sends with a quote).

Both parsers run on every input: they may reject it with a FormatError, never
crash. Whatever parses must marshal back to the very same bytes, so no quote has
two encodings. Seeds: fuzz/corpus/tpm_attest (the swtpm quotes and signatures).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from guardfab.tpm import structures

from fuzz_common import expect_only_invalid_input


def _attest_round_trip(data: bytes) -> None:
    attest = structures.unmarshal_attest(data)
    if structures.marshal_attest(attest) != data:
        raise AssertionError("TPMS_ATTEST parsed but did not re-marshal to the same bytes")


def _signature_round_trip(data: bytes) -> None:
    signature = structures.unmarshal_signature(data)
    if structures.marshal_signature(signature) != data:
        raise AssertionError("TPMT_SIGNATURE parsed but did not re-marshal to the same bytes")


def test_one_input(data: bytes) -> None:
    """One fuzz iteration: both parsers, each either rejecting or round-tripping."""
    expect_only_invalid_input(_attest_round_trip, data)
    expect_only_invalid_input(_signature_round_trip, data)


def main() -> None:
    """Run the fuzzer with libFuzzer's command-line arguments."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
