"""Fuzz the loader behind 'template verify --publisher': key, catalog or qualifier."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from guardfab.tenant.template import load_trust_anchor

from fuzz_common import expect_only_invalid_input


def test_one_input(data: bytes) -> None:
    expect_only_invalid_input(lambda d: load_trust_anchor(d, what="publisher"), data)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
