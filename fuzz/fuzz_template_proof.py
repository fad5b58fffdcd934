"""Fuzz the region proof loader and the root recomputation it feeds.

A parsed proof is also run against a fixed 11-chunk disk, so malformed shapes
(ranges past the end, too many or too few hashes) must fail as invalid input.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from guardfab.formats import merkle

from fuzz_common import expect_only_invalid_input

CHUNK = 8
DISK = bytes(range(11 * CHUNK - 3))
LEAVES = merkle.leaves_of(DISK, CHUNK)
ROOT = merkle.digest_of_bytes(DISK, CHUNK)


def _load_and_check(data: bytes) -> None:
    proof = merkle.RegionProof.from_bytes(data)
    region = LEAVES[proof.first_chunk : proof.end_chunk]
    merkle.check_region(proof, region, root=ROOT, size=len(DISK), chunk_size=CHUNK)


def test_one_input(data: bytes) -> None:
    expect_only_invalid_input(_load_and_check, data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
