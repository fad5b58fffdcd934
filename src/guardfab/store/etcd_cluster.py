"""What an administrator asks an etcd cluster, member by member: for ``hgs diagnose``.

The store itself talks to whichever member answers (:mod:`etcd_gateway`); a
diagnosis needs the opposite: each configured member asked on its own, so the
one that does not answer can be named, and the cluster's own view (its leader,
its members) compared with what the HGS was configured with. Every request here
is a read: nothing is written and no revision moves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guardfab.store.errors import StoreError
from guardfab.store.etcd_codec import as_int, b64
from guardfab.store.etcd_gateway import EtcdGateway, EtcdRequestError, check_endpoint

#: Builds a gateway that talks to the given endpoints only (TLS and auth as configured).
GatewayFactory = Callable[[list[str]], EtcdGateway]


@dataclass(frozen=True)
class MemberStatus:
    """One member's answer to ``/v3/maintenance/status``, or why it gave none."""

    endpoint: str
    member_id: int = 0
    cluster_id: int = 0
    leader: int = 0
    version: str = ""
    error: str | None = None

    @property
    def answered(self) -> bool:
        """Whether the member answered."""
        return self.error is None

    @property
    def tls_failure(self) -> bool:
        """Whether it failed at the TLS handshake (a CA or client certificate problem)."""
        return self.error is not None and "TLS" in self.error


@dataclass(frozen=True)
class ClusterMember:
    """A member as the cluster lists it."""

    member_id: int
    name: str
    client_urls: tuple[str, ...]


def member_status(connect: GatewayFactory, endpoint: str) -> MemberStatus:
    """Ask ``endpoint`` alone for its status; a failure is returned, not raised."""
    gateway = connect([endpoint])
    try:
        answer = gateway.call("/v3/maintenance/status", {}, what="a status", idempotent=True)
    except StoreError as exc:
        return MemberStatus(endpoint, error=str(exc))
    finally:
        gateway.close()
    header = answer.get("header") or {}
    return MemberStatus(
        endpoint,
        member_id=as_int(header.get("member_id")),
        cluster_id=as_int(header.get("cluster_id")),
        leader=as_int(answer.get("leader")),
        version=str(answer.get("version") or ""),
    )


def member_list(gateway: EtcdGateway) -> list[ClusterMember]:
    """The cluster's members, as a member that answers lists them."""
    answer = gateway.call("/v3/cluster/member/list", {}, what="a member list", idempotent=True)
    members = []
    for member in answer.get("members") or []:
        urls = tuple(_normalized(u) for u in member.get("clientURLs") or [])
        members.append(ClusterMember(as_int(member.get("ID")), str(member.get("name", "")), urls))
    return members


def _normalized(url: Any) -> str:
    try:
        return check_endpoint(str(url))
    except StoreError:
        return str(url)


def txn_ops_refusal(gateway: EtcdGateway, key: bytes, ops: int) -> str | None:
    """Return etcd's refusal of a read-only transaction of ``ops`` reads, or None if accepted.

    etcd refuses a transaction with more operations than its ``--max-txn-ops``
    before looking at them; a transaction of reads moves no revision, so this
    finds out, harmlessly, whether the cluster takes what the HGS was told it takes.
    """
    body = {
        "compare": [],
        "success": [{"request_range": {"key": b64(key), "count_only": True}}] * ops,
        "failure": [],
    }
    try:
        gateway.call("/v3/kv/txn", body, what="a read-only transaction", idempotent=True)
    except EtcdRequestError as exc:
        if "too many operations" in exc.etcd_message:
            return exc.etcd_message
        raise
    return None
