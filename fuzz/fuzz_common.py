"""Shared rule for every fuzz target: a loader may reject input, never crash.

A loader given arbitrary bytes must either return an object or raise
:class:`guardfab.errors.InvalidInputError`. Anything else (an IndexError, a
UnicodeDecodeError, a RecursionError...) is a bug the fuzzer reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guardfab.errors import InvalidInputError


def expect_only_invalid_input(loader: Callable[[bytes], Any], data: bytes) -> None:
    """Call ``loader(data)``; let only InvalidInputError through silently."""
    try:
        loader(data)
    except InvalidInputError:
        return


def fixed_key(seed: int) -> Any:
    """A deterministic P-256 key, so seed corpora stay valid from run to run."""
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from joserfc.jwk import ECKey  # noqa: PLC0415

    return ECKey.import_key(ec.derive_private_key(seed, ec.SECP256R1()))


def fixed_guardian(name: str, kind: Any, seed: int) -> Any:
    """Deterministic guardian keys (signing key from ``seed``, encryption key from ``seed + 1``)."""
    from guardfab.formats import jose  # noqa: PLC0415
    from guardfab.formats.guardian import Guardian  # noqa: PLC0415
    from guardfab.tenant.guardians import GuardianKeys  # noqa: PLC0415

    signing, encryption = fixed_key(seed), fixed_key(seed + 1)
    guardian = Guardian(
        name=name,
        kind=kind,
        signing_key=jose.import_public_jwk(jose.public_jwk(signing), what="fuzz"),
        encryption_key=jose.import_public_jwk(jose.public_jwk(encryption), what="fuzz"),
    )
    return GuardianKeys(guardian, signing, encryption)
