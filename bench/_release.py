"""Key releases for ``hgs_throughput.py --mode release`` (issue 4).

A real release, as a guarded host makes it: the host attests (host-key mode, the
cheapest way to a genuine health certificate), a tenant makes a KP for the HGS's
KPS guardian (the published ``guardian.jws``) with the tenant's own function,
and the host posts {health_certificate, key_protector}. Each release re-keys the
VM, and rollback protection refuses the KP just sent, so every VM carries its
chain: the next request sends the egress KP of the previous answer. One VM per
connection (a connection never has two requests of one VM in flight).

Only the public KP functions are used (``create_key_protector``,
``load_key_protector``, ``unwrap_release``), so the bench keeps working when the
KP format moves to a new version.

Checking every answer would cost the generator about as much CPU as the server
spends, so it is sampled: the first answer of each VM (its key is known from
``create_key_protector``) and every ``VERIFY_EVERY``-th answer after that are
unwrapped with the host key; an unwrap whose ingress key is known must yield
exactly that key as "current", and yields the "new" key the next answer must
open with. An unwrap needs the answer before it unwrapped too, so the sample is
taken in pairs: answer k (learns the key) and k + 1 (checked against it).
"""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from joserfc.jwk import ECKey

from guardfab.attestation.trust import HostKey
from guardfab.errors import GuardfabError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.formats.key_protector import TransportKey, create_key_protector, load_key_protector
from guardfab.hgs import registry as reg
from guardfab.host.attestation import HgsAttestationClient, attest_with_host_key
from guardfab.keyprotection import unwrap_release
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys

RELEASE_PATH = "/keyprotection/v1/release"
GUARDIAN_PATH = "/keyprotection/v1/metadata/guardian.jws"
#: One answer in this many (plus the one after it) is unwrapped and checked.
VERIFY_EVERY = 16
#: Answers this process unwrapped and checked (a list: the generator reads it across calls).
CHECKED = [0]


@dataclass
class ReleaseHost:
    """A host-key host: the key it attests with, the key releases are wrapped to."""

    name: str
    signing: ECKey = field(default_factory=lambda: ECKey.generate_key("P-256"))
    encryption: ECKey = field(default_factory=lambda: ECKey.generate_key("P-256"))
    certificate: str = ""

    def registration(self) -> tuple[str, Any]:
        """The store record that trusts this host's signing key."""
        key = HostKey(jose.thumbprint(self.signing), self.name, jose.public_jwk(self.signing))
        return reg.HOST_KEYS + key.key_id, key.to_dict()


@dataclass
class Fabric:
    """What the generators share: attested hosts, the tenant, the KPS guardian document."""

    hosts: list[ReleaseHost]
    owner: GuardianKeys
    kps_document: bytes


def make_hosts(count: int) -> list[ReleaseHost]:
    """``count`` release hosts (registered with the other records before the HGS starts)."""
    return [ReleaseHost(f"release-{n}") for n in range(count)]


def prepare(url: str, ca: Path, hosts: list[ReleaseHost]) -> Fabric:
    """Attest every host for real, download the KPS guardian, make the tenant's owner guardian."""
    client = HgsAttestationClient(url, ca)
    try:
        for host in hosts:
            answer = attest_with_host_key(
                client, host.signing, host_key=jose.public_jwk(host.encryption)
            )
            host.certificate = answer.health_certificate
    finally:
        client.close()
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as http:
        response = http.get(url + GUARDIAN_PATH)
        response.raise_for_status()
    return Fabric(hosts, new_guardian_keys("bench-owner", KeyAlgorithm.EC_P256), response.content)


class Vm:
    """One VM's KP chain, driven over one connection."""

    def __init__(self, fabric: Fabric, host: ReleaseHost) -> None:
        self.host = host
        self.kp, key = create_key_protector(fabric.owner, [fabric.kps_document])
        self.known: TransportKey | None = key  # the key ``kp`` protects, when known here
        self.answers = 0

    def body(self) -> bytes:
        """The release request for the VM's current KP."""
        request = {"health_certificate": self.host.certificate,
                   "key_protector": b64url_encode(self.kp)}  # fmt: skip
        return json.dumps(request).encode()

    def accept(self, answer: bytes) -> str | None:
        """Chain the egress KP; unwrap and check a sample. Returns what went wrong, if anything."""
        response = json.loads(answer)
        ingress, self.answers = self.kp, self.answers + 1
        self.kp = b64url_decode(response["egress_key_protector"], what="egress KP")
        learn = self.answers % VERIFY_EVERY == VERIFY_EVERY - 1  # the next answer is checked
        expected, self.known = self.known, None
        if expected is None and not learn:
            return None
        try:
            keys = unwrap_release(
                response, self.host.encryption, ingress=load_key_protector(ingress)
            )
        except GuardfabError as exc:
            return f"answer does not unwrap: {type(exc).__name__}: {exc}"
        CHECKED[0] += 1
        self.known = keys.new if learn else None
        if keys.egress_kp != self.kp:
            return "unwrapped egress KP differs from the answer's"
        if expected is not None and keys.current != expected:
            return "released transport key is not the one the ingress KP protects"
        return None


async def release_once(conn: Any, vm: Vm) -> tuple[str | None, float]:
    """One release on ``conn``; (error or None, time the answer arrived: before any check)."""
    status, answer = await conn.request("POST", RELEASE_PATH, vm.body())
    arrived = time.time()
    if status != 200:
        return f"release {status}: {answer[:300]!r}", arrived
    return vm.accept(answer), arrived
