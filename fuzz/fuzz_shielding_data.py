"""Fuzz the shielding data (PDK) loader, the reveal of whatever it accepts, and the
secrets plaintext parser.

The first byte picks a mode, the rest is the input:

* ``0``: the rest is a PDK file, loaded as is (most mutations stop at the signature);
* ``1``: the rest is a PDK *payload*, signed here by the fixed owner before loading,
  so the fuzzer reaches every check behind the signature (header, normal form,
  envelope, recipients) and the decryption;
* ``2``: the rest is a decrypted secrets plaintext, parsed as a guardian would
  after decryption (a malicious owner controls these bytes).

Whatever loads is revealed with every fixed guardian it names, and whatever parses
must survive a round trip. Keys are derived from constants so the seeds in
``fuzz/corpus/shielding_data`` stay meaningful; regenerate them with::

    .venv/bin/python fuzz/fuzz_shielding_data.py --make-seeds fuzz/corpus/shielding_data
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from guardfab.formats import jose
    from guardfab.formats.encoding import b64url_decode
    from guardfab.formats.guardian import GuardianKind, sign_guardian_document
    from guardfab.formats.shielding_data import (
        PDK_JWS_TYPE,
        SecurityPolicy,
        ShieldingDataHeader,
        create_shielding_data,
        load_shielding_data,
    )
    from guardfab.formats.shielding_secrets import (
        AdminCredentials,
        AnswerFile,
        AnswerFileKind,
        HostCertificate,
        HostCertificateKind,
        ShieldingSecrets,
    )
    from guardfab.formats.template import DiskVersion, PublisherKey, VersionRule, VolumeIdQualifier

from fuzz_common import expect_only_invalid_input, fixed_guardian, fixed_key

OWNER = fixed_guardian("owner", GuardianKind.TENANT, 0x9D0_0001)
FABRIC = fixed_guardian("fabric", GuardianKind.KPS, 0x9D0_0003)
FABRIC2 = fixed_guardian("fabric2", GuardianKind.KPS, 0x9D0_0005)
GUARDIANS = (OWNER, FABRIC, FABRIC2)


def _load_and_reveal(data: bytes) -> None:
    pdk = load_shielding_data(data)
    header = pdk.header
    assert ShieldingDataHeader.from_dict(header.to_dict()) == header
    json.dumps(header.summary())
    for keys in GUARDIANS:
        if header.guardian(keys.guardian.id) is not None:
            secrets = pdk.reveal(keys)
            assert ShieldingSecrets.from_bytes(secrets.to_bytes()) == secrets


def _parse_secrets(data: bytes) -> None:
    secrets = ShieldingSecrets.from_bytes(data)
    assert ShieldingSecrets.from_bytes(secrets.to_bytes()) == secrets
    repr(secrets)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 2:
        expect_only_invalid_input(_parse_secrets, rest)
        return
    if mode == 1:
        rest = jose.sign_compact(rest, OWNER.signing_key, typ=PDK_JWS_TYPE).encode()
    expect_only_invalid_input(_load_and_reveal, rest)


def _seed_files() -> dict[str, bytes]:
    qualifier = VolumeIdQualifier(
        PublisherKey.from_key(fixed_key(0x9D0_0007)),
        "ws2022",
        DiskVersion(10, 0, 20348, 1),
        VersionRule.GREATER_THAN_OR_EQUAL,
    )
    full = ShieldingSecrets(
        admin=AdminCredentials("Administrator", "pass word"),
        answer_file=AnswerFile(AnswerFileKind.UNATTEND, b"<unattend/>"),
        files={"setup.ps1": b"Write-Host hi", "b.txt": b""},
        host_certificate=HostCertificate(HostCertificateKind.RDP, b"cert", b"key"),
    )
    minimal = ShieldingSecrets(admin=AdminCredentials("root", "pw"))
    documents = [sign_guardian_document(k.guardian, k.signing_key) for k in (FABRIC, FABRIC2)]
    made = create_shielding_data(
        OWNER,
        documents,
        policy=SecurityPolicy.SHIELDED,
        secrets=full,
        qualifiers=[qualifier],
        name="web01",
        created_at=1_700_000_000,
    )
    small = create_shielding_data(
        OWNER,
        documents[:1],
        policy=SecurityPolicy.ENCRYPTION_SUPPORTED,
        secrets=minimal,
        name="db",
        created_at=0,
    )
    return {
        "full.pdk": b"\x00" + made,
        "full.payload": b"\x01" + _payload(made),
        "small.payload": b"\x01" + _payload(small),
        "full.secrets": b"\x02" + full.to_bytes(),
        "minimal.secrets": b"\x02" + minimal.to_bytes(),
    }


def make_seeds(directory: Path) -> None:
    """Write the seed corpus: a whole file, payloads to be signed, and plaintexts."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, seed in _seed_files().items():
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
