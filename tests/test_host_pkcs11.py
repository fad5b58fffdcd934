"""Host-key mode with the signing key on a PKCS#11 token (a real SoftHSM2 token).

The token lives in a temporary directory of this module (``SOFTHSM2_CONF``
points at a configuration of its own). ``softhsm2-util`` initializes it with a
throwaway setup PIN; the real user PIN is set in-process and lives only in a
0600 file, so it is never on any command line: every argument vector this
module builds is checked, and so is every process on the machine at the end
of the end-to-end test.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from guardfab.attestation.evidence import canonical_claims
from guardfab.attestation.signing import HOST_KEY_TYP, binding_payload, verify_binding
from guardfab.cli.main import cli
from guardfab.errors import FormatError, UsageError
from guardfab.formats import jose
from guardfab.host.attestation import host_key_evidence
from guardfab.host.config import HostConfig, check_pin_source, load_config
from guardfab.host.signer import (
    Pkcs11Signer,
    Pkcs11Uri,
    TokenKeyNotFoundError,
    TokenLoginError,
    detached_jws,
    generate_token_key,
    read_pin,
)
from hgs_harness import RunningHgs
from test_cli_host import configure_host, hgs_admin, run

MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SOFTHSM_UTIL = shutil.which("softhsm2-util")
pytestmark = pytest.mark.skipif(
    not MODULE.exists() or SOFTHSM_UTIL is None, reason="softhsm2 is not installed"
)
HOST_KEY = {"kty": "EC", "crv": "P-384", "x": "A" * 64, "y": "B" * 64}
SETUP_PIN = "0000"


@dataclass
class Token:
    """The module's SoftHSM token: where its PIN file is, and the PIN (for assertions only)."""

    directory: Path
    pin: str
    pin_file: Path
    argv: list[list[str]]

    def uri(self, obj: str, *, pin_file: Path | None = None, token: str = "guardfab") -> str:
        pin_source = pin_file or self.pin_file
        return (
            f"pkcs11:token={token};object={obj};type=private"
            f"?module-path={MODULE}&pin-source=file:{pin_source}"
        )

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """Run a tool; its arguments must never hold the user PIN."""
        assert self.pin not in " ".join(argv)
        self.argv.append(list(argv))
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    """A SoftHSM2 token 'guardfab' with an EC P-256 and an RSA-2048 key, PIN in a 0600 file."""
    import pkcs11  # noqa: PLC0415

    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n")
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    pin = secrets.token_hex(12)
    state = Token(directory, pin, directory / "hsm.pin", [])
    assert SOFTHSM_UTIL is not None
    state.run(SOFTHSM_UTIL, "--init-token", "--free", "--label", "guardfab",
              "--so-pin", "12345678", "--pin", SETUP_PIN)  # fmt: skip
    token = pkcs11.lib(str(MODULE)).get_token(token_label="guardfab")
    with token.open(rw=True, user_pin=SETUP_PIN) as session:
        session.set_pin(SETUP_PIN, pin)  # the real PIN: in memory and in the 0600 file only
    fd = os.open(state.pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pin + "\n")
    generate_token_key(Pkcs11Uri.parse(state.uri("host-ec")), "ec-p256")
    _admin_generated_rsa_key(token, pin)
    try:
        yield state
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


def _admin_generated_rsa_key(token: object, pin: str) -> None:
    """An RSA-2048 key made as an administrator would, with python-pkcs11 directly."""
    from pkcs11 import Attribute, KeyType  # noqa: PLC0415

    with token.open(rw=True, user_pin=pin) as session:  # type: ignore[attr-defined]
        session.generate_keypair(
            KeyType.RSA, 2048, store=True, label="host-rsa", id=b"\x02",
            private_template={Attribute.SIGN: True, Attribute.SENSITIVE: True},
        )  # fmt: skip


# --------------------------------------------------------------------------- the signer


@pytest.mark.parametrize(("obj", "alg"), [("host-ec", "ES256"), ("host-rsa", "PS256")])
def test_token_signatures_verify_as_host_key_bindings(token: Token, obj: str, alg: str) -> None:
    signer = Pkcs11Signer(Pkcs11Uri.parse(token.uri(obj)))
    assert signer.alg == alg
    assert signer.key_id == jose.thumbprint(signer.public_key)
    nonce = secrets.token_bytes(32)
    evidence = host_key_evidence(signer, nonce=nonce, host_key=HOST_KEY)
    payload = binding_payload(nonce, HOST_KEY, canonical_claims({}))
    verify_binding(
        evidence.signature, signer.public_key, payload, typ=HOST_KEY_TYP, kid=signer.key_id
    )
    # A different nonce, or another key, does not verify: the signature binds both.
    other = binding_payload(secrets.token_bytes(32), HOST_KEY, canonical_claims({}))
    with pytest.raises(Exception, match="does not verify"):
        verify_binding(evidence.signature, signer.public_key, other, typ=HOST_KEY_TYP)
    _, empty, _ = evidence.signature.split(".")
    assert empty == ""  # detached payload, RFC 7515 appendix F


def test_ec_signature_is_raw_r_s_of_the_curve_size(token: Token) -> None:
    signer = Pkcs11Signer(Pkcs11Uri.parse(token.uri("host-ec")))
    assert len(signer.sign(b"input")) == 64
    jws = detached_jws(signer, b"x", typ="t")
    verify_binding(jws, signer.public_key, b"x", typ="t", kid=signer.key_id)


def test_wrong_pin_names_the_token_and_never_the_pin(token: Token, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pin"
    wrong.write_text("not-" + token.pin + "\n")
    wrong.chmod(0o600)
    with pytest.raises(TokenLoginError) as caught:
        Pkcs11Signer(Pkcs11Uri.parse(token.uri("host-ec", pin_file=wrong)))
    text = caught.value.diagnostics()
    assert "'guardfab'" in text
    assert "refused the PIN" in text
    assert token.pin not in text
    assert caught.value.__cause__ is None  # the token's own error is not chained (from None)
    assert caught.value.__suppress_context__


@pytest.mark.parametrize(
    ("uri_kwargs", "error", "pattern"),
    [
        ({"obj": "no-such-key"}, TokenKeyNotFoundError, "no private key matches .*'no-such-key'"),
        ({"obj": "host-ec", "token": "other"}, TokenKeyNotFoundError, "no PKCS#11 token .*'other'"),
    ],
)
def test_missing_key_or_token_is_a_clear_error(
    token: Token, uri_kwargs: dict[str, str], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern) as caught:
        Pkcs11Signer(Pkcs11Uri.parse(token.uri(**uri_kwargs)))
    assert "pkcs11-tool" in caught.value.hint or "softhsm2-util" in caught.value.hint  # type: ignore[attr-defined]


def test_world_readable_pin_file_is_refused(token: Token, tmp_path: Path) -> None:
    loose = tmp_path / "loose.pin"
    loose.write_text(token.pin)
    loose.chmod(0o644)
    uri = Pkcs11Uri.parse(token.uri("host-ec", pin_file=loose))
    with pytest.raises(UsageError, match="readable by others"):
        check_pin_source(uri)
    with pytest.raises(UsageError, match="not a private regular file") as caught:
        read_pin(loose)
    assert token.pin not in caught.value.diagnostics()


# --------------------------------------------------------------------------- URIs


GOOD = "pkcs11:token=guardfab;object=host%20key;type=private?module-path=/m.so&pin-source=file:/p"


@pytest.mark.parametrize(
    ("uri", "pattern"),
    [
        (GOOD.replace("pin-source=file:/p", "pin-value=1234"), "a PIN in the URI is refused"),
        (GOOD + "&pin-value=1234", "a PIN in the URI is refused"),
        (GOOD.replace("type=private", "type=public"), "type must be 'private'"),
        (GOOD.replace("token=guardfab;", ""), "'token' is needed"),
        (GOOD.replace("object=host%20key;", ""), "object= .* or id="),
        (GOOD.replace("module-path=/m.so&", ""), "'module-path' is needed"),
        (GOOD.replace("module-path=/m.so", "module-name=softhsm2"), "absolute path"),
        (GOOD.replace("/m.so", "m.so"), "module-path must be an absolute path"),
        (GOOD.replace("file:/p", "file:p"), "pin-source must be an absolute path"),
        (GOOD.replace("file:/p", "file://host/p"), "a local file"),
        (GOOD.replace("object=", "slot-id=1;object="), "unsupported attribute 'slot-id'"),
        (GOOD.replace("object=host%20key", "object=a/b"), "characters RFC 7512 does not allow"),
        (GOOD.replace("object=host%20key", "object=a%0Ab"), "control characters"),
        (GOOD.replace("token=guardfab", "token=a;token=b"), "given twice"),
        (GOOD + "#frag", "no fragment"),
        ("pkcs11", "expected a pkcs11: URI"),
    ],
)
def test_bad_uris_are_refused_with_the_reason(uri: str, pattern: str) -> None:
    with pytest.raises(FormatError, match=pattern) as caught:
        Pkcs11Uri.parse(uri)
    assert "1234" not in str(caught.value)


def test_uri_round_trips_through_its_canonical_text() -> None:
    uri = Pkcs11Uri.parse(GOOD.replace("type=private", "id=%01%ff;type=private"))
    assert (uri.token, uri.object, uri.id) == ("guardfab", "host key", b"\x01\xff")
    assert uri.pin_source == Path("/p")
    assert Pkcs11Uri.parse(str(uri)) == uri


def test_host_config_keeps_a_pkcs11_signing_key(token: Token, tmp_path: Path) -> None:
    document = {
        "version": 1,
        "mode": "host-key",
        "attestation_url": "https://hgs.example",
        "key_protection_url": "https://hgs.example",
        "ca_file": "/etc/guardfab/ca.pem",
        "signing_key": token.uri("host-ec"),
    }
    config = HostConfig.from_dict(document)
    assert isinstance(config.signing_key, Pkcs11Uri)
    assert config.to_dict()["signing_key"] == str(config.signing_key)
    assert HostConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "host.json"
    path.write_text(json.dumps(document))
    assert load_config(path).signing_key == config.signing_key
    loose = tmp_path / "loose.pin"
    loose.write_text("x")
    loose.chmod(0o604)
    path.write_text(json.dumps({**document, "signing_key": token.uri("host-ec", pin_file=loose)}))
    with pytest.raises(UsageError, match="readable by others"):
        load_config(path)


# --------------------------------------------------------------------------- end to end


def test_host_key_host_on_a_token_attests_through_the_cli(
    token: Token, tmp_path: Path, running_hgs: RunningHgs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hgs = running_hgs
    uri = token.uri("host-ec")
    root = tmp_path / "host-t"
    args = ["--signing-key", uri]
    assert token.pin not in " ".join(args)
    config = configure_host(root, hgs, None, *args)
    assert isinstance(load_config(config).signing_key, Pkcs11Uri)
    assert token.pin not in config.read_text()

    identity = root / "host-t.pem"
    run("host", "identity", "--config", str(config), "--out", str(identity))
    assert b"PRIVATE" not in identity.read_bytes()
    hgs_admin(hgs, "mode", "set", "tpm", "host-key")
    hgs_admin(hgs, "host", "add-key", "--name", "host-t", "--public-key", str(identity))

    attested = run("host", "attest", "--config", str(config), "--json").output
    status = json.loads(attested)
    assert (status["attestation_status"], status["is_host_guarded"]) == ("Passed", True)
    assert status["certificate_expires_at"] is not None
    assert (root / "state" / "health-certificate.json").exists()

    diagnosed = invoke("host", "diagnose", "--config", str(config)).output
    assert "OK   host-signing-key: PKCS#11 token 'guardfab' object 'host-ec'" in diagnosed

    written = [p.read_bytes() for p in root.rglob("*") if p.is_file()]
    assert all(token.pin.encode() not in data for data in written)
    assert token.pin not in attested + diagnosed + caplog.text
    assert all(token.pin not in " ".join(argv) for argv in token.argv)
    assert _processes_showing(token.pin) == []


def test_configure_with_a_missing_token_key_fails_with_the_fix(
    token: Token, tmp_path: Path, running_hgs: RunningHgs
) -> None:
    config = tmp_path / "etc" / "host.json"
    result = invoke(
        "host", "configure", "--config", str(config), "--mode", "host-key",
        "--attestation-url", running_hgs.url, "--key-protection-url", running_hgs.url,
        "--ca", running_hgs.ca, "--state-dir", str(tmp_path / "state"),
        "--signing-key", token.uri("absent"),
    )  # fmt: skip
    assert result.exit_code != 0
    assert "no private key matches PKCS#11 token 'guardfab' object 'absent'" in result.output
    assert "guardfab host keygen --pkcs11" in result.output
    assert not config.exists()


def test_keygen_makes_a_key_the_host_can_use(token: Token) -> None:
    uri = token.uri("keygen-rsa")
    made = json.loads(run("host", "keygen", "--pkcs11", uri, "--type", "rsa-2048", "--json").output)
    assert made["alg"] == "PS256"
    assert Pkcs11Signer(Pkcs11Uri.parse(uri)).key_id == made["key_id"]
    again = invoke("host", "keygen", "--pkcs11", uri)
    assert again.exit_code != 0
    assert "exists already" in again.output


def invoke(*args: str) -> Result:
    """Run a CLI command in-process, whatever its exit status."""
    return CliRunner().invoke(cli, list(args))


def _processes_showing(secret: str) -> list[int]:
    """Processes whose command line holds ``secret`` (there must be none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if secret.encode() in cmdline:
            found.append(int(entry.name))
    return found
