"""Attestation challenges: forged, expired and malformed nonces are refused."""

from __future__ import annotations

import pytest

from guardfab.errors import FormatError
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.hgs.nonce import NonceError, check_nonce, issue_nonce

KEY = b"k" * 32
NOW = 1_800_000_000


def test_fresh_nonce_checks() -> None:
    nonce = issue_nonce(KEY, now=NOW, ttl=60)
    checked = check_nonce(KEY, nonce.token, now=NOW + 59)
    assert checked == nonce
    assert len(checked.value) == 57


def test_nonces_are_unique() -> None:
    assert len({issue_nonce(KEY, now=NOW).nonce_id for _ in range(100)}) == 100


def test_expired_nonce_is_refused_at_the_boundary() -> None:
    nonce = issue_nonce(KEY, now=NOW, ttl=60)
    with pytest.raises(NonceError, match="expired"):
        check_nonce(KEY, nonce.token, now=NOW + 60)


def test_nonce_from_another_key_is_refused() -> None:
    nonce = issue_nonce(b"x" * 32, now=NOW)
    with pytest.raises(NonceError, match="not issued"):
        check_nonce(KEY, nonce.token, now=NOW)


@pytest.mark.parametrize("position", [0, 1, 17, 20, 30, 56])
def test_any_flipped_byte_is_refused(position: int) -> None:
    raw = bytearray(b64url_decode(issue_nonce(KEY, now=NOW).token, what="t"))
    raw[position] ^= 0x01
    with pytest.raises((NonceError, FormatError)):
        check_nonce(KEY, b64url_encode(bytes(raw)), now=NOW)


def test_extended_expiry_is_refused() -> None:
    raw = bytearray(b64url_decode(issue_nonce(KEY, now=NOW, ttl=1).token, what="t"))
    raw[24] ^= 0x10  # a byte of the expiry field
    with pytest.raises(NonceError):
        check_nonce(KEY, b64url_encode(bytes(raw)), now=NOW)


@pytest.mark.parametrize("token", ["", "!!!", b64url_encode(b"short"), b64url_encode(b"\x02" * 57)])
def test_malformed_nonce_is_a_format_error(token: str) -> None:
    with pytest.raises(FormatError):
        check_nonce(KEY, token, now=NOW)
