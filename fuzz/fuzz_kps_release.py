"""Fuzz both ends of a key release: the KPS's decision and the host's unwrap of the answer.

The first byte picks a mode, the rest is the input:

* ``0``: the rest is ``certificate \\x00 KP file``, given to
  :func:`guardfab.keyprotection.release` with a fixed KPS, trusted signer and time;
* ``1``: the rest is a release answer (JSON), given to
  :func:`guardfab.keyprotection.unwrap_release` with a fixed host key;
* ``2``: the rest is a release *payload*, signed here by the fixed KPS guardian
  and paired with a fixed egress KP, so the fuzzer reaches the checks behind
  the signature.

Either side may refuse (an InvalidInputError), never crash. Keys derive from
constants so the seeds in ``fuzz/corpus/kps_release`` stay meaningful; regenerate
them with::

    .venv/bin/python fuzz/fuzz_kps_release.py --make-seeds fuzz/corpus/kps_release
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from guardfab.formats import jose
    from guardfab.formats.encoding import b64url_encode
    from guardfab.formats.guardian import GuardianKind, sign_guardian_document
    from guardfab.formats.key_protector import create_key_protector, load_key_protector, rekey
    from guardfab.keyprotection import release, unwrap_release
    from guardfab.keyprotection.release import RELEASE_JWS_TYPE

from fuzz_common import (
    fixed_guardian,
    fixed_key,
    fuzz_certificate,
    kps_exchange_seeds,
    modal_target,
    run,
    write_seeds,
)

NOW = 1_800_000_000


OWNER = fixed_guardian("owner", GuardianKind.TENANT, 0x5EED_0101)
KPS = fixed_guardian("kps", GuardianKind.KPS, 0x5EED_0103)
SIGNER = fixed_key(0x5EED_0105)
HOST = fixed_key(0x5EED_0106)
TRUSTED = {jose.thumbprint(SIGNER): SIGNER}
#: The ingress KP of the fixed egress (made once; KPs are randomized, so not from constants).
_INGRESS, _ = create_key_protector(OWNER, [sign_guardian_document(KPS.guardian, KPS.signing_key)])
_EGRESS, _, _ = rekey(load_key_protector(_INGRESS), KPS)


def _release(rest: bytes) -> object:
    cert, _, kp = rest.partition(b"\x00")
    return release(
        cert.decode("latin-1"), kp, kps_keys=[KPS], trusted_signers=TRUSTED, now=NOW
    ).to_response()


def _unwrap(rest: bytes) -> object:
    try:
        answer = json.loads(rest)
    except (ValueError, RecursionError):
        return None
    return unwrap_release(answer, HOST)


def _unwrap_signed(rest: bytes) -> object:
    """Sign the payload; point it at this process's fixed egress KP when it is an object."""
    try:
        payload = json.loads(rest)
    except (ValueError, RecursionError):
        payload = None
    if isinstance(payload, dict):
        egress = load_key_protector(_EGRESS)
        payload["egress_kp_sha256"] = hashlib.sha256(_EGRESS).hexdigest()
        payload["kp_id"] = egress.kp_id
        rest = json.dumps(payload).encode()
    token = jose.sign_compact(rest, KPS.signing_key, typ=RELEASE_JWS_TYPE)
    return unwrap_release({"release": token, "egress_key_protector": b64url_encode(_EGRESS)}, HOST)


MODES = (_release, _unwrap, _unwrap_signed)


test_one_input = modal_target(MODES)


def _certificate() -> str:
    return fuzz_certificate(SIGNER, HOST, NOW)


def make_seeds(directory: Path) -> None:
    """Write a granted request, its answer, and the answer's payload."""
    request = _certificate().encode() + b"\x00" + _INGRESS
    answer = json.dumps(_release(request)).encode()
    write_seeds(directory, kps_exchange_seeds(request, answer, json.loads(answer)["release"]))


def main() -> None:
    run(test_one_input, make_seeds)


if __name__ == "__main__":
    main()
