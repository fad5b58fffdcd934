"""jose.import_known_public_jwk: a cache that never admits what import_public_jwk refuses."""

from __future__ import annotations

import pytest
from joserfc.jwk import ECKey, RSAKey

from guardfab.errors import FormatError
from guardfab.formats import jose


def test_the_same_members_give_the_same_key_and_other_members_another() -> None:
    jwk = jose.public_jwk(ECKey.generate_key("P-256"))
    first = jose.import_known_public_jwk(dict(jwk), what="host key")
    assert jose.import_known_public_jwk(dict(jwk), what="host key") is first
    assert jose.public_jwk(first) == jwk
    other = jose.public_jwk(ECKey.generate_key("P-256"))
    assert jose.public_jwk(jose.import_known_public_jwk(other, what="host key")) == other


@pytest.mark.parametrize(
    "jwk",
    [
        ECKey.generate_key("P-256").as_dict(private=True),  # private parts
        RSAKey.generate_key(1024).as_dict(private=False),  # too weak
        {"kty": "oct", "k": "c2VjcmV0"},  # symmetric
        {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},  # not on the curve
        {"kty": "EC", "crv": "P-256", "x": 1, "y": 2},  # not strings
        "not a JWK",
    ],
)
def test_what_import_refuses_is_refused_every_time(jwk: object) -> None:
    for _ in range(2):
        with pytest.raises(FormatError):
            jose.import_known_public_jwk(jwk, what="host key")


def test_one_changed_member_is_imported_afresh() -> None:
    jwk = jose.public_jwk(ECKey.generate_key("P-256"))
    jose.import_known_public_jwk(jwk, what="host key")
    broken = {**jwk, "y": jwk["x"]}
    with pytest.raises(FormatError):
        jose.import_known_public_jwk(broken, what="host key")
