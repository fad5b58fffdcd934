"""Shared rule for every fuzz target: a loader may reject input, never crash.

A loader given arbitrary bytes must either return an object or raise
:class:`guardfab.errors.InvalidInputError`. Anything else (an IndexError, a
UnicodeDecodeError, a RecursionError...) is a bug the fuzzer reports.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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


def modal_target(modes: Sequence[Callable[[bytes], Any]]) -> Callable[[bytes], None]:
    """A ``test_one_input`` whose first byte picks one of ``modes`` for the rest of the input."""

    def test_one_input(data: bytes) -> None:
        if data:
            expect_only_invalid_input(modes[data[0] % len(modes)], data[1:])

    return test_one_input


def fuzz_certificate(signer: Any, host: Any, now: int) -> str:
    """A health certificate for ``host`` by ``signer``, valid an hour around ``now``."""
    from guardfab.formats import jose  # noqa: PLC0415
    from guardfab.formats.health_certificate import (  # noqa: PLC0415
        HealthCertificate,
        issue_health_certificate,
    )

    cert = HealthCertificate(
        issuer="fuzz-hgs",
        host_id="host-a",
        mode="host-key",
        host_key=jose.public_jwk(host),
        issued_at=now - 60,
        expires_at=now + 3600,
    )
    return issue_health_certificate(cert, signer)


def kps_exchange_seeds(request: bytes, answer: bytes, token: str) -> dict[str, bytes]:
    """Seeds of a KPS exchange target: request (mode 0), answer (1), signed payload (2)."""
    from guardfab.formats.encoding import b64url_decode  # noqa: PLC0415

    return {
        "request": b"\x00" + request,
        "answer": b"\x01" + answer,
        "payload": b"\x02" + b64url_decode(token.split(".")[1], what="seed"),
    }


def run(test_one_input: Callable[[bytes], None], make_seeds: Callable[[Path], None]) -> None:
    """A target's entry point: ``--make-seeds DIR`` writes its seed corpus, else fuzz."""
    import atheris  # noqa: PLC0415

    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


def write_seeds(directory: Path, seeds: Mapping[str, bytes]) -> None:
    """Write each seed as a file of ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, seed in seeds.items():
        (directory / name).write_bytes(seed)
