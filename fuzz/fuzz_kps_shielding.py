"""Fuzz both ends of a shielding data opening: the KPS's decision, the host's check of the answer.

The first byte picks a mode, the rest is the input:

* ``0``: the rest is ``certificate \\x00 PDK file``, given to
  :func:`guardfab.keyprotection.open_shielding_data` with a fixed KPS, trusted
  signer and time;
* ``1``: the rest is an answer (JSON), given to
  :func:`guardfab.keyprotection.open_shielding_answer` with a fixed host key and
  this process's PDK;
* ``2``: the rest is an answer *payload*, signed here by the fixed KPS guardian
  and pointed at this process's PDK, so the fuzzer reaches the checks behind the
  signature.

Either side may refuse (an InvalidInputError), never crash. Keys derive from
constants, so a seed request (a PDK of the fixed owner for the fixed KPS) opens
in every run; regenerate the seeds with::

    .venv/bin/python fuzz/fuzz_kps_shielding.py --make-seeds fuzz/corpus/kps_shielding
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from guardfab.formats import jose
    from guardfab.formats.guardian import GuardianKind, sign_guardian_document
    from guardfab.formats.shielding_data import (
        SecurityPolicy,
        create_shielding_data,
        load_shielding_data,
    )
    from guardfab.formats.shielding_secrets import AdminCredentials, ShieldingSecrets
    from guardfab.keyprotection import open_shielding_answer, open_shielding_data
    from guardfab.keyprotection.shielding import OPENING_JWS_TYPE

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

OWNER = fixed_guardian("owner", GuardianKind.TENANT, 0x5EED_0201)
KPS = fixed_guardian("kps", GuardianKind.KPS, 0x5EED_0203)
SIGNER = fixed_key(0x5EED_0205)
HOST = fixed_key(0x5EED_0206)
TRUSTED = {jose.thumbprint(SIGNER): SIGNER}
#: This process's PDK (a PDK's id and sealing are random, so it is made once per run).
_PDK = create_shielding_data(
    OWNER,
    [sign_guardian_document(KPS.guardian, KPS.signing_key)],
    policy=SecurityPolicy.SHIELDED,
    secrets=ShieldingSecrets(admin=AdminCredentials("root", "fuzz-password")),
    name="fuzz",
    created_at=NOW,
)
_PDK_ID = load_shielding_data(_PDK).header.pdk_id


def _open(rest: bytes) -> object:
    cert, _, pdk = rest.partition(b"\x00")
    return open_shielding_data(
        cert.decode("latin-1"), pdk, kps_keys=[KPS], trusted_signers=TRUSTED, now=NOW
    ).to_response()


def _answer(rest: bytes) -> object:
    try:
        answer = json.loads(rest)
    except (ValueError, RecursionError):
        return None
    return open_shielding_answer(answer, HOST, pdk=_PDK)


def _answer_signed(rest: bytes) -> object:
    """Sign the payload; point it at this process's PDK when it is an object."""
    try:
        payload = json.loads(rest)
    except (ValueError, RecursionError):
        payload = None
    if isinstance(payload, dict):
        payload["pdk_id"] = _PDK_ID
        payload["pdk_sha256"] = hashlib.sha256(_PDK).hexdigest()
        rest = json.dumps(payload).encode()
    token = jose.sign_compact(rest, KPS.signing_key, typ=OPENING_JWS_TYPE)
    return open_shielding_answer(
        {"opening": token, "kps_guardian": KPS.guardian.id}, HOST, pdk=_PDK
    )


MODES = (_open, _answer, _answer_signed)


test_one_input = modal_target(MODES)


def _certificate() -> str:
    return fuzz_certificate(SIGNER, HOST, NOW)


def make_seeds(directory: Path) -> None:
    """Write a granted request, its answer, and the answer's payload."""
    request = _certificate().encode() + b"\x00" + _PDK
    answer = json.dumps(_open(request)).encode()
    write_seeds(directory, kps_exchange_seeds(request, answer, json.loads(answer)["opening"]))


def main() -> None:
    run(test_one_input, make_seeds)


if __name__ == "__main__":
    main()
