"""canonical_json's fast path writes exactly the bytes rfc8785 writes, or refuses alike.

The fast path (the C JSON encoder, taken only when cheap checks prove it agrees)
must be invisible: same bytes for every value, same exception type for every
value rfc8785 refuses. Generated values mix what the fast path takes with
everything that must send it back to rfc8785 (floats, non-ASCII keys, integers
outside 2**53, lone surrogates, subclasses).
"""

from __future__ import annotations

import enum
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from guardfab.formats.encoding import canonical_json

_BOUND = 2**53
_ints = st.one_of(
    st.integers(min_value=-_BOUND + 1, max_value=_BOUND - 1),
    st.sampled_from([_BOUND - 1, _BOUND, -_BOUND + 1, -_BOUND, 2**64, -(2**70)]),
)
_text = st.one_of(
    st.text(max_size=12),  # any code point, lone surrogates included
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=12),
    st.sampled_from(['"', "\\", "\x00", "\x1f", "\x7f", "\u2028", "\ud800", "é", "😀"]),
)
_keys = st.one_of(
    st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=6),
    st.text(max_size=6),  # non-ASCII keys: UTF-16 order differs from code-point order
)
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    _ints,
    _text,
    st.floats(allow_nan=True, allow_infinity=True),
)
_values = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(_keys, children, max_size=5),
    ),
    max_leaves=30,
)


def _outcome(encode: Any, value: Any) -> tuple[str, Any]:
    try:
        return "bytes", encode(value)
    except (ValueError, TypeError, RecursionError) as exc:
        return "error", type(exc)


@settings(max_examples=600, deadline=None)
@given(_values)
def test_the_fast_path_equals_rfc8785(value: Any) -> None:
    assert _outcome(canonical_json, value) == _outcome(rfc8785.dumps, value)


class _Colour(enum.StrEnum):
    RED = "red"


class _Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize(
    "value",
    [
        {"\ue000": 1, "\U0001f600": 2},  # UTF-16 puts the astral key first
        {"big": 2**53},
        {"small": -(2**53)},
        {"edge": [2**53 - 1, -(2**53) + 1]},
        {"lone": "\udc00"},
        {"f": 1.0, "g": 1e21, "h": -0.0},
        {"nan": float("nan")},
        {_Colour.RED: "key", "v": _Colour.RED},
        {"level": _Level.HIGH, "flag": True},
        {1: "not a string key"},
        ("a", ("b", None)),
        {"nested": [{"b": 1, "a": [True, False, None]}], "": ""},
    ],
    ids=[
        "astral-keys",
        "2**53",
        "-2**53",
        "domain-edges",
        "lone-surrogate",
        "floats",
        "nan",
        "str-enum",
        "int-enum",
        "int-key",
        "tuples",
        "nested",
    ],
)
def test_edge_values_agree_with_rfc8785(value: Any) -> None:
    assert _outcome(canonical_json, value) == _outcome(rfc8785.dumps, value)


def test_refusals_keep_the_value_error_callers_catch() -> None:
    for value in ({"big": 2**53}, {"lone": "\ud800"}, {"nan": float("nan")}):
        with pytest.raises(ValueError):
            canonical_json(value)


def test_deep_nesting_is_refused_as_rfc8785_refuses_it() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        canonical_json(deep)
