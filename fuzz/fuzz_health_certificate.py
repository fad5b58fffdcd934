"""Fuzz the health certificate verifier: any string is refused cleanly or verifies.

The first byte picks a mode: ``0`` feeds the rest as a token; ``1`` treats the
rest as a claims payload and signs it with the trusted signer first, so the
fuzzer reaches the claim checks behind the signature.
"""

from __future__ import annotations

import sys

import atheris
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey

with atheris.instrument_imports():
    from guardfab.formats import jose
    from guardfab.formats.health_certificate import HEALTH_CERT_TYPE, verify_health_certificate

from fuzz_common import expect_only_invalid_input

_SIGNER = ECKey.import_key(ec.derive_private_key(0x5EED, ec.SECP256R1()))
_TRUSTED = {jose.thumbprint(_SIGNER): _SIGNER}


def _load(data: bytes) -> object:
    mode, rest = data[:1], data[1:]
    if mode == b"\x01":
        token = jose.sign_compact(rest, _SIGNER, typ=HEALTH_CERT_TYPE)
    else:
        token = rest.decode("latin-1")
    return verify_health_certificate(token, _TRUSTED, now=1_800_000_000)


def test_one_input(data: bytes) -> None:
    """Entry point for atheris."""
    expect_only_invalid_input(_load, data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
