"""Canonical encodings shared by every format."""

from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardfab.errors import FormatError
from guardfab.formats.encoding import b64url_decode, b64url_encode, load_json_document


@given(st.binary(max_size=200))
def test_b64url_round_trip(data: bytes) -> None:
    assert b64url_decode(b64url_encode(data), what="x") == data


@pytest.mark.parametrize(
    "text",
    ["AR", "A", "AQ==", "+/8", "AQ=", "a b", "Zm9v\n", 1, "Zm9v" * 50 + "Zm+v", "Zm9v/w", "Zm9vé"],
    ids=[
        "trailing-bits",
        "lone-char",
        "padding",
        "std-alphabet",
        "pad1",
        "space",
        "newline",
        "int",
        "plus-deep-inside",
        "slash",
        "non-ascii",
    ],
)
def test_b64url_rejects_non_canonical(text: object) -> None:
    with pytest.raises(FormatError):
        b64url_decode(text, what="field")  # type: ignore[arg-type]


_URL_ALPHABET = string.ascii_letters + string.digits + "-_"


def _reference_b64url_decode(text: str) -> bytes | None:
    """The standard library's reading of canonical unpadded base64url, or None."""
    if len(text) % 4 == 1 or any(char not in _URL_ALPHABET for char in text):
        return None
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    canonical = base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    return data if canonical == text else None


# Text near the alphabet (and just outside it) so both verdicts are common.
_NEAR_BASE64URL = st.text(alphabet=_URL_ALPHABET + "+/= \n\x00é", max_size=40)


@given(st.one_of(_NEAR_BASE64URL, st.binary(max_size=40).map(b64url_encode)))
def test_b64url_decode_agrees_with_the_standard_library(text: str) -> None:
    expected = _reference_b64url_decode(text)
    if expected is None:
        with pytest.raises(FormatError):
            b64url_decode(text, what="field")
    else:
        assert b64url_decode(text, what="field") == expected


@given(st.binary(max_size=300))
def test_b64url_encode_matches_the_standard_library(data: bytes) -> None:
    assert b64url_encode(data) == base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_b64url_maps_the_url_alphabet() -> None:
    assert b64url_decode("-_8", what="x") == b"\xfb\xff"
    assert b64url_encode(b"\xfb\xff") == "-_8"


class _LyingStr(str):
    """A str that hides its ``+`` from ``in`` and from replace: must not slip through."""

    def __contains__(self, _item: object) -> bool:  # type: ignore[override]
        return False

    def replace(self, *_args: object, **_kwargs: object) -> str:  # type: ignore[override]
        return "Zm9v"


def test_b64url_str_subclass_cannot_hide_standard_alphabet() -> None:
    with pytest.raises(FormatError):
        b64url_decode(_LyingStr("+/8"), what="field")


@pytest.mark.parametrize(
    "data",
    [b"\xff", b"{", b"1" * 5000, b"[" * 100000],
    ids=["not-utf8", "truncated", "huge-int", "deep-nesting"],
)
def test_load_json_document_rejects_with_format_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        load_json_document(data, what="doc")


def test_load_json_document_enforces_size() -> None:
    with pytest.raises(FormatError, match="larger than"):
        load_json_document(b"{}" + b" " * 100, what="doc", max_bytes=50)


def test_load_json_document_refuses_text_instead_of_bytes() -> None:
    with pytest.raises(FormatError, match="expected bytes"):
        load_json_document("{}", what="doc")  # type: ignore[arg-type]
