"""The owner's guardian-set statement is verified once per (token, owner key), never less.

A KPS release loads the same statement twice (ingress KP, then the egress it
minted), and every later generation carries it unchanged, so its signature
check is cached. These tests attack the cache: a cached statement presented
under another owner, a tampered statement after the honest one was cached, and
a statement whose set no longer matches the KP.
"""

from __future__ import annotations

from typing import Any

import pytest

from guardfab.errors import VerificationError
from guardfab.formats import jose, kp_wrapping
from guardfab.formats.key_protector import load_key_protector
from guardfab.formats.kp_wrapping import verify_guardian_set
from test_key_protector_keyring import Ctx, flip_b64, make_ctx


@pytest.fixture
def ctx() -> Ctx:
    kp_wrapping._STATEMENTS.clear()
    return make_ctx()


def _count_verifies(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the ``typ`` of every JWS verified from now on."""
    seen: list[str] = []
    original = jose.verify_compact

    def counting(token: str, key: Any, *, typ: str, what: str) -> jose.VerifiedJWS:
        seen.append(typ)
        return original(token, key, typ=typ, what=what)

    monkeypatch.setattr(jose, "verify_compact", counting)
    return seen


def test_a_second_load_does_not_verify_the_statement_again(
    ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_key_protector(ctx.egress)
    seen = _count_verifies(monkeypatch)
    load_key_protector(ctx.egress)
    assert kp_wrapping.GUARDIAN_SET_JWS_TYPE not in seen
    assert seen  # the KP's own signature is still verified on every load


def test_a_cached_statement_does_not_verify_for_another_owner(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.base)  # caches the statement under the owner's key
    stranger = ctx.ring["cotenant"].guardian
    with pytest.raises(VerificationError):
        verify_guardian_set(kp.guardian_set, kp.kp_id, stranger, kp.guardians, kp.version)


def test_a_tampered_statement_is_refused_after_the_honest_one_was_cached(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.base)
    owner = kp.guardian(kp.owner)
    header, payload, signature = kp.guardian_set.split(".")
    for tampered in (f"{header}.{payload}.{flip_b64(signature)}", f"{header}.{payload}."):
        for _ in range(2):  # failures are never cached
            with pytest.raises((VerificationError, ValueError)):
                verify_guardian_set(tampered, kp.kp_id, owner, kp.guardians, kp.version)


def test_a_cached_statement_still_must_match_the_kp(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.base)
    owner = kp.guardian(kp.owner)
    with pytest.raises(VerificationError):
        verify_guardian_set(kp.guardian_set, "another-kp", owner, kp.guardians, kp.version)
    with pytest.raises(VerificationError):
        verify_guardian_set(kp.guardian_set, kp.kp_id, owner, kp.guardians[:-1], kp.version)


def test_the_cache_is_bounded(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kp_wrapping, "_STATEMENTS", kp_wrapping.VerifiedCache(2))
    for _ in range(3):
        load_key_protector(make_ctx().base)
    assert len(kp_wrapping._STATEMENTS._items) <= 2
