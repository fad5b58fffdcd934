"""The etcd gateway client's failover rules, against scripted members (httpx MockTransport).

The real-etcd tests (test_store_etcd*.py) kill members; what a member cut off
from the others answers ("etcdserver: no leader") needs a network partition,
so its rule is shown here with members whose answers are scripted.
"""

from __future__ import annotations

import json

import httpx
import pytest

from guardfab.store.errors import StoreError
from guardfab.store.etcd_gateway import CODE_UNAVAILABLE, EtcdGateway

CUT_OFF = "http://127.0.0.1:1"
HEALTHY = "http://127.0.0.1:2"
#: What etcd's gateway answers when the member has no leader (gRPC status UNAVAILABLE).
NO_LEADER = {
    "error": "etcdserver: no leader",
    "message": "etcdserver: no leader",
    "code": CODE_UNAVAILABLE,
}


def scripted(answers: dict[str, tuple[int, dict[str, object]]], seen: list[str]) -> httpx.Client:
    def handle(request: httpx.Request) -> httpx.Response:
        member = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        seen.append(member)
        status, body = answers[member]
        return httpx.Response(status, content=json.dumps(body).encode())

    return httpx.Client(transport=httpx.MockTransport(handle))


def gateway(answers: dict[str, tuple[int, dict[str, object]]], seen: list[str]) -> EtcdGateway:
    made = EtcdGateway([CUT_OFF, HEALTHY], timeout=2.0)
    made._client.close()
    made._client = scripted(answers, seen)  # the members' answers, scripted
    return made


@pytest.mark.parametrize("idempotent", [True, False], ids=["read", "write"])
def test_a_member_without_a_leader_sends_the_request_to_the_next(idempotent: bool) -> None:
    seen: list[str] = []
    answers = {CUT_OFF: (503, NO_LEADER), HEALTHY: (200, {"header": {"revision": "7"}})}
    client = gateway(answers, seen)
    answer = client.call("/v3/kv/range", {"key": "eA=="}, what="a read", idempotent=idempotent)
    assert answer == {"header": {"revision": "7"}}
    assert seen == [CUT_OFF, HEALTHY]  # not CUT_OFF again until the timeout


def test_no_member_with_a_leader_is_an_error_naming_it() -> None:
    seen: list[str] = []
    client = gateway({CUT_OFF: (503, NO_LEADER), HEALTHY: (503, NO_LEADER)}, seen)
    with pytest.raises(StoreError, match="no leader"):
        client.call("/v3/kv/txn", {}, what="a transaction", idempotent=False)
    assert set(seen) == {CUT_OFF, HEALTHY}
