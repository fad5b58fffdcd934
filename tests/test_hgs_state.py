"""The HGS state directory: complete or absent, private files private."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from guardfab.errors import FormatError, NotAuthorizedError, UsageError
from guardfab.formats import jose
from guardfab.hgs.state import HgsConfig, HgsState, init_state


def test_init_creates_everything_with_tight_modes(tmp_path: Path) -> None:
    directory = tmp_path / "hgs"
    tokens = init_state(directory, HgsConfig(service_name="test"))
    state = HgsState(directory)
    for private in (
        "keys/attestation-signing.pem",
        "keys/nonce.key",
        "tls/server.key",
        "tokens/admin.token",
        "tokens/reviewer.token",
        "access.json",
    ):
        assert stat.S_IMODE(state.path(private).stat().st_mode) == 0o600, private
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert jose.signing_alg_for(state.attestation_signing_key()) == "ES256"
    assert len(state.nonce_key()) == 32
    assert state.access().role_of(tokens["admin"]) == "admin"
    assert state.access().role_of(tokens["reviewer"]) == "reviewer"
    with pytest.raises(NotAuthorizedError):
        state.access().role_of("guess")
    # Tokens are stored only as digests.
    assert tokens["admin"] not in state.path("access.json").read_text()


def test_server_certificate_names_and_chain(tmp_path: Path) -> None:
    init_state(
        tmp_path / "hgs", HgsConfig(service_name="t", server_names=("127.0.0.1", "hgs.test"))
    )
    chain = x509.load_pem_x509_certificates((tmp_path / "hgs/tls/server.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "hgs/tls/ca.pem").read_bytes())
    san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["hgs.test"]
    chain[0].verify_directly_issued_by(ca)


def test_init_refuses_non_empty_directory_and_leaves_it(tmp_path: Path) -> None:
    directory = tmp_path / "hgs"
    directory.mkdir()
    (directory / "keep").write_text("x")
    with pytest.raises(UsageError):
        init_state(directory, HgsConfig(service_name="t"))
    assert sorted(p.name for p in directory.iterdir()) == ["keep"]


def test_failed_init_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FormatError):
        init_state(tmp_path / "hgs", HgsConfig(service_name="t", server_names=()))
    assert list(tmp_path.iterdir()) == []


def test_state_refuses_missing_or_bad_config(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not an HGS directory"):
        HgsState(tmp_path)
    init_state(tmp_path / "hgs", HgsConfig(service_name="t"))
    config = json.loads((tmp_path / "hgs/hgs.json").read_text())
    config["nonce_ttl"] = 0
    (tmp_path / "hgs/hgs.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="nonce_ttl"):
        HgsState(tmp_path / "hgs")
