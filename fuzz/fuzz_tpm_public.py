"""Fuzz the TPM2B_PUBLIC / TPMT_PUBLIC unmarshallers and what is derived from a public area.

An AK or EK public area arrives from a host that may be hostile. Parsing may reject
it with a FormatError, never crash; what parses must re-marshal to the same bytes
(the Name hashes them), and turning it into a ``cryptography`` key or checking it
as an attestation key may only fail with guardfab's own errors.
Seeds: fuzz/corpus/tpm_public (the swtpm AKs).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from guardfab.tpm import quote, structures

from fuzz_common import expect_only_invalid_input


def _public2b(data: bytes) -> None:
    public = structures.unmarshal_public2b(data)
    if structures.marshal_public2b(public) != data:
        raise AssertionError("TPM2B_PUBLIC parsed but did not re-marshal to the same bytes")
    structures.object_name(public)
    structures.public_key(public)  # may raise FormatError: the key is not usable
    quote.check_attestation_key(public)  # may raise AttestationKeyError


def _public(data: bytes) -> None:
    public = structures.unmarshal_public(data)
    if structures.marshal_public(public) != data:
        raise AssertionError("TPMT_PUBLIC parsed but did not re-marshal to the same bytes")


def test_one_input(data: bytes) -> None:
    """One fuzz iteration: the TPM2B and TPMT forms of the same bytes."""
    expect_only_invalid_input(_public2b, data)
    expect_only_invalid_input(_public, data)
    expect_only_invalid_input(_public, data[2:])


def main() -> None:
    """Run the fuzzer with libFuzzer's command-line arguments."""
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
