"""The guarded host's TPM evidence, against a real manufactured swtpm through tpm2-pytss.

Nothing is mocked: each test gets a fresh copy of a TPM manufactured with an EK
certificate by a CA of the test session (see ``swtpm_harness``). What is proved:

* the EK the host reports is the certified one, and its certificate chains to the CA;
* the AK is an attestation key by the HGS's own check, and persists;
* the HGS's pure-software MakeCredential (``tpm.credential``) is accepted by a real
  TPM's ActivateCredential, for the RSA and the ECC EK, and every substitution
  (other AK Name, other TPM, tampered blob or seed) is refused;
* a quote over a simulated measured boot verifies with the HGS's ``verify_quote``
  against PCR values computed from the event log alone;
* leaked transient objects from a crashed client do not block a new client, and
  two TPMs side by side stay apart.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from tpm2_pytss import (  # type: ignore[import-untyped]
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_SE,
    TPMT_SYM_DEF,
    TSS2_Exception,
)

import swtpm_harness
from guardfab.attestation.binding import quote_qualifying_data
from guardfab.host.tpm import (
    DEFAULT_AK_HANDLE,
    AkType,
    CredentialRejectedError,
    HostTpm,
    TpmDeviceError,
    _trim_der,
)
from guardfab.tpm.constants import TpmAlg, TpmaObject
from guardfab.tpm.credential import make_credential
from guardfab.tpm.quote import (
    PcrDigestMismatchError,
    QuoteSignatureError,
    check_attestation_key,
    verify_quote,
)
from guardfab.tpm.structures import object_name, public_key, unmarshal_attest, unmarshal_public2b
from swtpm_harness import (
    Swtpm,
    TpmFactory,
    expected_pcrs,
    simulate_measured_boot,
)

pytestmark = pytest.mark.slow

# The harness's fixtures, taken explicitly (conftest.py is shared by the whole suite).
tpm_factory = swtpm_harness.tpm_factory
start_swtpm = swtpm_harness.start_swtpm
swtpm = swtpm_harness.swtpm

SHA1, SHA256 = TpmAlg.SHA1, TpmAlg.SHA256
EK_PROFILES = ("EK-RSA2048", "EK-HIGH-ECC384")  # what swtpm 0.7 manufactures
HOST_KEY_JWK = {
    "kty": "EC",
    "crv": "P-256",
    "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
    "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0",
}
AK_ATTRIBUTES = (
    TpmaObject.FIXED_TPM
    | TpmaObject.FIXED_PARENT
    | TpmaObject.SENSITIVE_DATA_ORIGIN
    | TpmaObject.USER_WITH_AUTH
    | TpmaObject.RESTRICTED
    | TpmaObject.SIGN_ENCRYPT
)


@pytest.fixture(scope="module")
def vectors() -> Path:
    """shared/vectors beside the repository; missing vectors fail, never skip."""
    path = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "eventlogs"
    if not (path / "event-sd-boot-fedora37.bin").is_file():
        pytest.fail(f"event log vectors not found under {path}: clone shared/ beside the repo")
    return path


@pytest.fixture(autouse=True, scope="module")
def _swtpm_installed() -> None:
    for tool in ("swtpm", "swtpm_setup", "swtpm_localca"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: apt-get install swtpm swtpm-tools")


@pytest.fixture
def host(swtpm: Swtpm) -> Iterator[HostTpm]:
    with HostTpm(swtpm.tcti) as tpm:
        yield tpm


def _transients(tcti: str) -> list[int]:
    """Loaded transient objects and sessions, seen by a fresh raw client.

    Call it only with no HostTpm open on ``tcti``: swtpm serves one connection at a time.
    """
    with ESAPI(tcti) as ectx:
        handles = []
        for first in (0x80000000, 0x02000000):
            _, data = ectx.get_capability(TPM2_CAP.HANDLES, first, 64)
            handles += [int(h) for h in data.data.handles]
        return handles


# --------------------------------------------------------------------------- EK


@pytest.mark.parametrize("profile", EK_PROFILES)
def test_ek_public_area_is_the_certified_key(host: HostTpm, profile: str) -> None:
    ek = host.read_ek(profile)
    parsed = unmarshal_public2b(ek.public)
    assert ek.certificate is not None
    cert = x509.load_der_x509_certificate(ek.certificate)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert public_key(parsed).public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    assert object_name(parsed) == ek.name
    assert parsed.object_attributes & TpmaObject.RESTRICTED
    assert parsed.object_attributes & TpmaObject.DECRYPT


def test_available_eks_are_the_manufactured_ones(host: HostTpm) -> None:
    assert set(host.available_eks()) == set(EK_PROFILES)
    with pytest.raises(TpmDeviceError, match="has no EK-HIGH-RSA2048"):
        host.read_ek("EK-HIGH-RSA2048")
    # A low-range profile needs no certificate: the key comes from the default template.
    assert host.read_ek("EK-ECC256").certificate is None


@pytest.mark.parametrize("profile", EK_PROFILES)
def test_ek_certificate_chains_to_the_test_ca(
    host: HostTpm, tpm_factory: TpmFactory, profile: str
) -> None:
    ek = host.read_ek(profile)
    assert ek.certificate is not None
    leaf = x509.load_der_x509_certificate(ek.certificate)
    intermediate = x509.load_pem_x509_certificate(tpm_factory.ca.intermediate_pem)
    root = x509.load_pem_x509_certificate(tpm_factory.ca.root_pem)
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    now = datetime.now(UTC)
    for cert in (leaf, intermediate, root):
        assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    # The EK certificate's TCG key usage: the EK certificate extended key usage OID.
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.ObjectIdentifier("2.23.133.8.1") in eku
    with pytest.raises(InvalidSignature):  # an impostor CA with the same name
        leaf.verify_directly_issued_by(_impostor(intermediate))


@functools.cache
def _impostor_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


def _impostor(ca: x509.Certificate) -> x509.Certificate:
    """A certificate with ``ca``'s subject and a key of the attacker's own."""
    key = _impostor_key(ca.public_key().key_size)  # type: ignore[union-attr]
    return (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )


# --------------------------------------------------------------------------- AK


@pytest.mark.parametrize("ak_type", list(AkType))
def test_ak_is_an_attestation_key(swtpm: Swtpm, ak_type: AkType) -> None:
    with HostTpm(swtpm.tcti, ak_type=ak_type) as tpm:
        ak = tpm.ensure_ak()
    parsed = unmarshal_public2b(ak.public)
    check_attestation_key(parsed)
    assert parsed.object_attributes == AK_ATTRIBUTES
    assert parsed.key_type == (TpmAlg.RSA if ak_type is AkType.RSA else TpmAlg.ECC)
    assert object_name(parsed) == ak.name
    assert ak.handle == DEFAULT_AK_HANDLE


def test_ak_persists_across_reopen_and_tpm_restart(swtpm: Swtpm) -> None:
    with HostTpm(swtpm.tcti) as tpm:
        first = tpm.ensure_ak()
        assert tpm.ensure_ak() == first
    with HostTpm(swtpm.tcti) as tpm:
        assert tpm.ensure_ak() == first
    swtpm.stop()
    swtpm.start()
    with HostTpm(swtpm.tcti) as tpm:
        assert tpm.ensure_ak() == first
    with HostTpm(swtpm.tcti, ak_handle=DEFAULT_AK_HANDLE + 1) as tpm:
        assert tpm.ensure_ak().name != first.name  # another handle, another key


def test_a_non_ak_at_the_ak_handle_is_not_used(swtpm: Swtpm) -> None:
    """A storage key someone persisted at the configured handle is not taken for the AK."""
    with ESAPI(swtpm.tcti) as ectx:
        handle, *_ = ectx.create_primary(None, "ecc256:aes128cfb", ESYS_TR.OWNER)
        ectx.evict_control(ESYS_TR.OWNER, handle, DEFAULT_AK_HANDLE)
        ectx.flush_context(handle)
    with HostTpm(swtpm.tcti) as tpm, pytest.raises(TpmDeviceError, match="not an AK"):
        tpm.ensure_ak()


# --------------------------------------------------------------------------- credential


@pytest.mark.parametrize("profile", EK_PROFILES)
def test_software_make_credential_activates_on_the_real_tpm(swtpm: Swtpm, profile: str) -> None:
    """The HGS side (pure cryptography) against the TPM side (TPM2_ActivateCredential)."""
    with HostTpm(swtpm.tcti, ek_profile=profile) as tpm:
        ek, ak = tpm.read_ek(), tpm.ensure_ak()
        for size in (1, 16, 32):
            secret = secrets.token_bytes(size)
            made = make_credential(ek.public, secret, ak.name)
            assert tpm.activate_credential(*made) == secret
    assert _transients(swtpm.tcti) == []


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 1]) + data[index + 1 :]


CREDENTIAL_ATTACKS: dict[str, Callable[[bytes, bytes, bytes], tuple[bytes, bytes]]] = {
    # (ek public, ak name, ek name) -> (credential blob, encrypted secret)
    "another AK Name": lambda ek, ak, _: make_credential(ek, b"s" * 16, _flip(ak, 20)),
    "the EK's own Name": lambda ek, _, ek_name: make_credential(ek, b"s" * 16, ek_name),
    "a flipped HMAC byte": lambda ek, ak, _: (
        _flip(make_credential(ek, b"s" * 16, ak).credential_blob, 6),
        make_credential(ek, b"s" * 16, ak).encrypted_secret,
    ),
    "a flipped encIdentity byte": lambda ek, ak, _: (
        (made := make_credential(ek, b"s" * 16, ak)).credential_blob[:-1]
        + bytes([made.credential_blob[-1] ^ 1]),
        made.encrypted_secret,
    ),
    "a flipped seed byte": lambda ek, ak, _: (
        (made := make_credential(ek, b"s" * 16, ak)).credential_blob,
        _flip(made.encrypted_secret, 40),
    ),
    "a seed from another credential": lambda ek, ak, _: (
        make_credential(ek, b"s" * 16, ak).credential_blob,
        make_credential(ek, b"s" * 16, ak).encrypted_secret,
    ),
}


@pytest.mark.parametrize("profile", EK_PROFILES)
@pytest.mark.parametrize("attack", list(CREDENTIAL_ATTACKS))
def test_substituted_or_tampered_credential_is_refused(
    swtpm: Swtpm, profile: str, attack: str
) -> None:
    with HostTpm(swtpm.tcti, ek_profile=profile) as tpm:
        ek, ak = tpm.read_ek(), tpm.ensure_ak()
        blob, seed = CREDENTIAL_ATTACKS[attack](ek.public, ak.name, ek.name)
        with pytest.raises(CredentialRejectedError) as caught:
            tpm.activate_credential(blob, seed)
        assert "refused the credential" in caught.value.diagnostics()
        # The TPM is still usable, and nothing was left loaded.
        secret = secrets.token_bytes(32)
        assert tpm.activate_credential(*make_credential(ek.public, secret, ak.name)) == secret
    assert _transients(swtpm.tcti) == []


def test_malformed_credential_is_a_value_error(host: HostTpm) -> None:
    ek, ak = host.read_ek(), host.ensure_ak()
    blob, seed = make_credential(ek.public, b"s" * 16, ak.name)
    with pytest.raises(ValueError, match="trailing"):
        host.activate_credential(blob + b"\0", seed)
    with pytest.raises(ValueError, match="not a marshalled"):
        host.activate_credential(blob[:1], seed)


def test_activation_without_an_ak_says_so(host: HostTpm) -> None:
    ek = host.read_ek()
    blob, seed = make_credential(ek.public, b"s" * 16, b"\x00\x0b" + bytes(32))
    with pytest.raises(TpmDeviceError, match="no AK"):
        host.activate_credential(blob, seed)


# --------------------------------------------------------------------------- quote

LOGS = {
    "sd-boot-fedora37 (sha256)": ("event-sd-boot-fedora37.bin", SHA256),
    "arch-linux (sha1 bank)": ("event-arch-linux.bin", SHA1),
    "arch-linux (sha256 bank)": ("event-arch-linux.bin", SHA256),
}


@pytest.mark.parametrize("ak_type", list(AkType))
@pytest.mark.parametrize("log_name", list(LOGS))
def test_quote_after_measured_boot_verifies_against_the_log(
    swtpm: Swtpm, vectors: Path, log_name: str, ak_type: AkType
) -> None:
    file_name, bank = LOGS[log_name]
    log = (vectors / file_name).read_bytes()
    with HostTpm(swtpm.tcti, ak_type=ak_type) as tpm:
        replay = simulate_measured_boot(tpm, log)
        ak = tpm.ensure_ak()
        nonce = secrets.token_bytes(32)
        qualifying = quote_qualifying_data(nonce, HOST_KEY_JWK)
        quote = tpm.quote(qualifying, bank=bank)
    expected = expected_pcrs(log, bank)
    verified = verify_quote(
        quote.attest,
        quote.signature,
        ak.public,
        expected_nonce=qualifying,
        pcr_values={bank: expected},
    )
    assert verified.pcrs == quote.pcrs == {bank: expected}
    for index, value in replay[bank].items():
        assert quote.pcrs[bank][index] == value
    assert set(quote.pcrs[bank]) == set(range(24))


def test_quotes_show_the_real_reset_count(swtpm: Swtpm) -> None:
    """An AK in the endorsement hierarchy gets unobfuscated counters: a reboot shows as +1."""
    with HostTpm(swtpm.tcti) as tpm:
        before = unmarshal_attest(tpm.quote(b"n").attest).clock_info
    swtpm.stop()
    swtpm.start()  # TPM2_Startup(CLEAR) again: a host reboot
    with HostTpm(swtpm.tcti) as tpm:
        after = unmarshal_attest(tpm.quote(b"n").attest).clock_info
    assert after.reset_count == before.reset_count + 1
    assert after.restart_count == before.restart_count == 0


def test_pcr_extended_after_the_quote_changes_the_quoted_digest(
    host: HostTpm, vectors: Path
) -> None:
    log = (vectors / "event-sd-boot-fedora37.bin").read_bytes()
    simulate_measured_boot(host, log)
    ak = host.ensure_ak()
    expected: dict[int, dict[int, bytes]] = {SHA256: expected_pcrs(log, SHA256)}
    before = host.quote(b"n1")
    verify_quote(
        before.attest, before.signature, ak.public, expected_nonce=b"n1", pcr_values=expected
    )
    measurement = hashlib.sha256(b"a kernel module loaded later").digest()
    host.extend(8, {SHA256: measurement})
    after = host.quote(b"n2")
    with pytest.raises(PcrDigestMismatchError):
        verify_quote(
            after.attest, after.signature, ak.public, expected_nonce=b"n2", pcr_values=expected
        )
    assert (
        unmarshal_attest(after.attest).quote.pcr_digest
        != unmarshal_attest(before.attest).quote.pcr_digest
    )
    new_value = hashlib.sha256(expected[SHA256][8] + measurement).digest()
    assert after.pcrs[SHA256][8] == new_value
    changed = {i for i in range(24) if after.pcrs[SHA256][i] != before.pcrs[SHA256][i]}
    assert changed == {8}
    # The host's reported values are what the quote signed.
    verify_quote(
        after.attest, after.signature, ak.public, expected_nonce=b"n2", pcr_values=after.pcrs
    )


def test_quote_is_retaken_when_pcrs_change_between_quote_and_read(
    host: HostTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An extend between TPM2_Quote and the PCR reads must not yield mismatched values."""
    ak = host.ensure_ak()
    real_read = host.read_pcrs
    calls: list[int] = []

    def racing_read(pcrs: object, bank: int = SHA256) -> dict[int, bytes]:
        calls.append(1)
        if len(calls) == 1:
            host.extend(10, {SHA256: bytes(32)})  # e.g. IMA measuring a file
        return real_read(pcrs, bank)  # type: ignore[arg-type]

    monkeypatch.setattr(host, "read_pcrs", racing_read)
    quote = host.quote(b"nonce")
    assert len(calls) == 2
    verify_quote(
        quote.attest, quote.signature, ak.public, expected_nonce=b"nonce", pcr_values=quote.pcrs
    )


def test_quote_gives_up_when_pcrs_never_settle(
    host: HostTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_read = host.read_pcrs

    def always_racing(pcrs: object, bank: int = SHA256) -> dict[int, bytes]:
        host.extend(10, {SHA256: bytes(32)})
        return real_read(pcrs, bank)  # type: ignore[arg-type]

    monkeypatch.setattr(host, "read_pcrs", always_racing)
    with pytest.raises(TpmDeviceError, match="changed during each of 3 quotes"):
        host.quote(b"nonce")


def test_pcr_read_is_chunked_because_the_tpm_cuts_selections(swtpm: Swtpm) -> None:
    """A raw PCR_Read of 24 PCRs returns 8; read_pcrs returns all 24 (and the same values)."""
    with ESAPI(swtpm.tcti) as ectx:
        _, selection, digests = ectx.pcr_read("sha256:0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16")
        assert int(digests.count) == 8
        assert bytes(selection.pcrSelections[0].pcrSelect)[:3] == b"\xff\x00\x00"
    with HostTpm(swtpm.tcti) as tpm:
        tpm.extend(16, {SHA256: bytes(range(32))})
        values = tpm.read_pcrs(range(24))
    assert sorted(values) == list(range(24))
    assert values[16] == hashlib.sha256(bytes(32) + bytes(range(32))).digest()
    assert values[17] == b"\xff" * 32  # D-RTM PCRs reset to all ones


def test_an_unallocated_bank_is_a_device_error_not_an_empty_answer(host: HostTpm) -> None:
    assert set(host.pcr_banks()) == {SHA1, SHA256}
    with pytest.raises(TpmDeviceError, match="no PCR of bank sha384"):
        host.read_pcrs([0], TpmAlg.SHA384)


def test_padding_after_an_ek_certificate_is_cut(host: HostTpm) -> None:
    """Some TPMs (ST33) pad the certificate's NV index with 0xff up to 1600 bytes."""
    der = host.read_ek().certificate
    assert der is not None
    assert _trim_der(der + b"\xff" * (1600 - len(der))) == der
    assert _trim_der(b"\x30\x03abc\xff\xff") == b"\x30\x03abc"
    assert _trim_der(b"not DER") == b"not DER"


def test_extend_refuses_what_the_tpm_would_misread(host: HostTpm) -> None:
    with pytest.raises(ValueError, match="cannot extend"):
        host.extend(0, {SHA256: bytes(20)})
    with pytest.raises(ValueError, match="cannot extend"):
        host.extend(0, {TpmAlg.SHA3_256: bytes(32)})
    with pytest.raises(ValueError, match="PCR indices"):
        host.extend(24, {SHA256: bytes(32)})
    with pytest.raises(TpmDeviceError, match="PCR_Extend"):
        host.extend(17, {SHA256: bytes(32)})  # D-RTM PCR: not at locality 0


# --------------------------------------------------------------------------- robustness


def _leak(tcti: str, objects: int, sessions: int) -> None:
    """Be a client that crashes: load objects and sessions, never flush them."""
    ectx = ESAPI(tcti)
    for _ in range(objects):
        ectx.create_primary(None, "ecc256", ESYS_TR.OWNER)
    for _ in range(sessions):
        ectx.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.HMAC,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
    ectx.close()  # the socket closes; swtpm keeps the objects loaded


def test_transients_leaked_by_a_crashed_client_are_flushed_at_open(
    swtpm: Swtpm, vectors: Path
) -> None:
    _leak(swtpm.tcti, objects=3, sessions=3)
    assert len(_transients(swtpm.tcti)) == 6
    with ESAPI(swtpm.tcti) as ectx, pytest.raises(TSS2_Exception, match="out of memory"):
        ectx.create_primary(None, "ecc256", ESYS_TR.OWNER)  # the trap is real
    with HostTpm(swtpm.tcti) as tpm:
        assert tpm.flush_all_transients() == 0  # the constructor already did it
        ek, ak = tpm.read_ek(), tpm.ensure_ak()
        assert tpm.activate_credential(*make_credential(ek.public, b"ok", ak.name)) == b"ok"
        tpm.quote(b"nonce")
    assert _transients(swtpm.tcti) == []


def test_two_tpms_side_by_side_stay_apart(start_swtpm: Callable[[str], Swtpm]) -> None:
    a, b = start_swtpm("host-a"), start_swtpm("host-b")
    with HostTpm(a.tcti) as tpm_a, HostTpm(b.tcti) as tpm_b:
        ek_a, ek_b = tpm_a.read_ek(), tpm_b.read_ek()
        ak_a, ak_b = tpm_a.ensure_ak(), tpm_b.ensure_ak()
        assert ek_a.public != ek_b.public
        assert ek_a.certificate != ek_b.certificate
        assert ak_a.name != ak_b.name
        made = make_credential(ek_a.public, b"for a", ak_a.name)
        assert tpm_a.activate_credential(*made) == b"for a"
        with pytest.raises(CredentialRejectedError):
            tpm_b.activate_credential(*made)
        with pytest.raises(CredentialRejectedError):  # B's AK Name, but A's EK
            tpm_b.activate_credential(*make_credential(ek_a.public, b"x", ak_b.name))
        quote = tpm_a.quote(b"nonce")
    verify_quote(
        quote.attest, quote.signature, ak_a.public, expected_nonce=b"nonce", pcr_values=quote.pcrs
    )
    with pytest.raises(QuoteSignatureError):
        verify_quote(
            quote.attest,
            quote.signature,
            ak_b.public,
            expected_nonce=b"nonce",
            pcr_values=quote.pcrs,
        )


def test_unreachable_or_stopped_tpm_is_a_device_error(swtpm: Swtpm) -> None:
    with HostTpm(swtpm.tcti) as tpm:
        tpm.ensure_ak()
        swtpm.stop()
        with pytest.raises(TpmDeviceError, match="Quote") as caught:
            tpm.quote(b"nonce")
        assert "hint:" in caught.value.diagnostics()
    with pytest.raises(TpmDeviceError, match="connection"):
        HostTpm(swtpm.tcti)


def test_timing_per_quote_and_per_activation(host: HostTpm) -> None:
    """Coarse bounds that keep the agent's attestation cheap (the figures are reported)."""
    ek, ak = host.read_ek(), host.ensure_ak()
    made = [make_credential(ek.public, b"%02d" % i, ak.name) for i in range(10)]
    start = time.perf_counter()
    for i, credential in enumerate(made):
        assert host.activate_credential(*credential) == b"%02d" % i
    activation = (time.perf_counter() - start) / len(made)
    start = time.perf_counter()
    for _ in range(10):
        host.quote(b"nonce")
    quote = (time.perf_counter() - start) / 10
    print(f"\nactivation {activation * 1000:.1f} ms, quote of 24 PCRs {quote * 1000:.1f} ms")
    assert activation < 0.5
    assert quote < 0.5
