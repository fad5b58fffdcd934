"""Fuzz the key protector loader, and the unwrap of whatever it accepts.

The first byte picks a mode, the rest is the input:

* ``0``: the rest is a KP file, loaded as is (most mutations stop at the signature);
* ``1`` / ``2``: the rest is a KP *payload*, signed here by the fixed owner (1) or
  the fixed KPS guardian (2) before loading, so the fuzzer can explore every
  check that runs after the signature.

Whatever loads is unwrapped with every fixed guardian of its set (the KPS with
both of its key generations), and the KPS re-keys it. The guardians' keys are
derived from constants, so the seeds in ``fuzz/corpus/key_protector`` stay
meaningful; regenerate them with::

    .venv/bin/python fuzz/fuzz_key_protector.py --make-seeds fuzz/corpus/key_protector

``owner-made-v1.kp`` and ``egress-v1.kp`` were made by the version-1 code and are
kept as they are (the tests load them too): this code mints only version 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from guardfab.formats import jose
    from guardfab.formats.encoding import b64url_decode
    from guardfab.formats.guardian import Guardian, GuardianKind, sign_guardian_document
    from guardfab.formats.key_protector import (
        KP_JWS_TYPE,
        KpsKeys,
        create_key_protector,
        load_key_protector,
        rekey,
    )
    from guardfab.tenant.guardians import GuardianKeys

from fuzz_common import expect_only_invalid_input, fixed_guardian, fixed_key

OWNER = fixed_guardian("owner", GuardianKind.TENANT, 0x5EED_0001)
KPS = fixed_guardian("kps", GuardianKind.KPS, 0x5EED_0003)
COTENANT = fixed_guardian("cotenant", GuardianKind.TENANT, 0x5EED_0005)


def _rotated(keys: GuardianKeys, seed: int) -> KpsKeys:
    """The fixed KPS at key generation 1 (a fixed new encryption key), holding both."""
    encryption = fixed_key(seed)
    guardian = Guardian(
        name=keys.guardian.name,
        kind=GuardianKind.KPS,
        signing_key=keys.guardian.signing_key,
        encryption_key=jose.import_public_jwk(jose.public_jwk(encryption), what="fuzz"),
        key_generation=1,
    )
    held = {keys.guardian.encryption_kid: keys.encryption_key, guardian.encryption_kid: encryption}
    document = sign_guardian_document(guardian, keys.signing_key)
    return KpsKeys(guardian, document, keys.signing_key, held)


KPS_ROTATED = _rotated(KPS, 0x5EED_0007)
GUARDIANS = (OWNER, COTENANT)
SIGNERS = {1: OWNER, 2: KPS}


def _load_and_unwrap(data: bytes) -> None:
    kp = load_key_protector(data)
    for keys in GUARDIANS:
        if keys.guardian.id in kp.guardian_ids:
            kp.unwrap(keys)
    if KPS.guardian.id in kp.guardian_ids:
        kp.unwrap(KPS_ROTATED)
        load_key_protector(rekey(kp, KPS_ROTATED)[0])


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode in SIGNERS:
        rest = jose.sign_compact(rest, SIGNERS[mode].signing_key, typ=KP_JWS_TYPE).encode()
    expect_only_invalid_input(_load_and_unwrap, rest)


def make_seeds(directory: Path) -> None:
    """Write seeds: owner-made and egress KPs as files, and their payloads to be signed."""
    documents = [sign_guardian_document(k.guardian, k.signing_key) for k in (KPS, COTENANT)]
    made, _ = create_key_protector(OWNER, documents)
    egress, _, _ = rekey(load_key_protector(made), KPS)
    rotated, _, _ = rekey(load_key_protector(egress), KPS_ROTATED)
    directory.mkdir(parents=True, exist_ok=True)
    seeds = {
        "owner-made.kp": b"\x00" + made,
        "egress.kp": b"\x00" + egress,
        "egress-rotated.kp": b"\x00" + rotated,
        "owner-made.payload": b"\x01" + _payload(made),
        "egress.payload": b"\x02" + _payload(egress),
        "egress-rotated.payload": b"\x02" + _payload(rotated),
    }
    for name, seed in seeds.items():
        (directory / name).write_bytes(seed)


def _payload(data: bytes) -> bytes:
    return b64url_decode(data.decode("ascii").split(".")[1], what="seed")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--make-seeds":
        make_seeds(Path(sys.argv[2]))
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
