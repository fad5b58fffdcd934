"""A KPS re-key checks what it minted without reloading it in full (see ``_mint``).

The egress of a re-key is the ingress's verified guardians and owner statement
with a fresh wrapping; what could still go wrong unseen is the signature (a
faulty signing operation). A release that handed out such an egress would spend
the ingress generation and strand the VM, so the signature over the exact bytes
is verified before the egress leaves; the rest is loaded in full by the host and
by the next release, as these tests do along a chain of re-keys.
"""

from __future__ import annotations

from typing import Any

import pytest

from guardfab.errors import VerificationError
from guardfab.formats import jose
from guardfab.formats import key_protector as kp_module
from guardfab.formats.key_protector import load_key_protector, rekey
from test_key_protector_keyring import Ctx, make_ctx


@pytest.fixture(scope="module")
def ctx() -> Ctx:
    return make_ctx()


def test_every_egress_along_a_chain_loads_in_full_and_opens(ctx: Ctx) -> None:
    kp = load_key_protector(ctx.egress, expected_owner=ctx.owner_id)
    key = ctx.egress_key
    for generation in range(2, 6):
        egress, old, new = rekey(kp, ctx.ring["kps1"])
        assert old == key
        kp = load_key_protector(egress, expected_owner=ctx.owner_id)
        assert kp.generation == generation
        assert kp.unwrap(ctx.ring["owner"]) == new
        assert kp.unwrap(ctx.ring["kps1"]) == new
        key = new


def test_a_faulty_signature_never_leaves_the_kps(ctx: Ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    real_sign = jose.sign_compact

    def faulty(payload: bytes, key: Any, *, typ: str) -> str:
        token = real_sign(payload, key, typ=typ)
        if typ != kp_module.KP_JWS_TYPE:
            return token
        header, body, signature = token.split(".")
        flipped = ("B" if signature[0] == "A" else "A") + signature[1:]
        return f"{header}.{body}.{flipped}"

    monkeypatch.setattr(jose, "sign_compact", faulty)
    with pytest.raises(VerificationError, match="does not verify"):
        rekey(load_key_protector(ctx.egress), ctx.ring["kps1"])


def test_a_signature_by_another_key_never_leaves_the_kps(
    ctx: Ctx, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_sign = jose.sign_compact
    other = ctx.ring["rogue-kps"].signing_key

    def wrong_key(payload: bytes, key: Any, *, typ: str) -> str:
        return real_sign(payload, other if typ == kp_module.KP_JWS_TYPE else key, typ=typ)

    monkeypatch.setattr(jose, "sign_compact", wrong_key)
    with pytest.raises(VerificationError):
        rekey(load_key_protector(ctx.egress), ctx.ring["kps1"])
