"""Shared rule for every fuzz target: a loader may reject input, never crash.

A loader given arbitrary bytes must either return an object or raise
:class:`guardfab.errors.InvalidInputError`. Anything else (an IndexError, a
UnicodeDecodeError, a RecursionError...) is a bug the fuzzer reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from guardfab.errors import InvalidInputError


def expect_only_invalid_input(loader: Callable[[bytes], Any], data: bytes) -> None:
    """Call ``loader(data)``; let only InvalidInputError through silently."""
    try:
        loader(data)
    except InvalidInputError:
        return
