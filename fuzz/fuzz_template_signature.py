"""Fuzz the disk signature loaders: the JWS envelope check and the statement payload parser.

Verify-then-parse means random bytes never reach the payload parser through the
envelope, so the parser is also fed directly. The key below is a throwaway test
key (never a real publisher's) fixed so seed files stay valid signatures.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from joserfc.jwk import ECKey

    from guardfab.formats.template import (
        DiskSignatureStatement,
        PublisherKey,
        verify_disk_signature,
    )

from fuzz_common import expect_only_invalid_input

TEST_KEY = {
    "kty": "EC",
    "crv": "P-256",
    "x": "Is0SB5665l7dC6FuPtKHzG_B_U_H7vqVtYBJwwiVbrY",
    "y": "dKupRK7NTwo9oPH1KRRt1YJQKeaCZDEPysoe3p9kdr0",
    "d": "u-UXU9WuJo2iPpLRyRamgcbS75fkb62ySTLN-m9MG3k",
}
PUBLISHER = PublisherKey.from_key(ECKey.import_key(TEST_KEY))


def test_one_input(data: bytes) -> None:
    expect_only_invalid_input(lambda d: verify_disk_signature(d, PUBLISHER), data)
    expect_only_invalid_input(DiskSignatureStatement.from_bytes, data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
