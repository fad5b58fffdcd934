"""Fuzz the volume ID qualifier loader and the disk version parser it relies on."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from guardfab.formats.template import DiskVersion, VersionRule, VolumeIdQualifier

from fuzz_common import expect_only_invalid_input


def test_one_input(data: bytes) -> None:
    expect_only_invalid_input(VolumeIdQualifier.from_bytes, data)
    text = data.decode("utf-8", "replace")
    expect_only_invalid_input(lambda _: DiskVersion.parse(text), data)
    expect_only_invalid_input(lambda _: VersionRule.parse(text), data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
