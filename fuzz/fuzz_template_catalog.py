"""Fuzz the volume signature catalog loader (self-signed JSON + JWS)."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from guardfab.formats.template import VolumeSignatureCatalog

from fuzz_common import expect_only_invalid_input


def test_one_input(data: bytes) -> None:
    expect_only_invalid_input(VolumeSignatureCatalog.from_bytes, data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
