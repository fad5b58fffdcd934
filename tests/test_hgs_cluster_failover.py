"""The HGS cluster rides through the loss of an etcd member and of an HGS node, end to end.

Real processes throughout: a 3-member etcd cluster on 127.0.0.1, two ``guardfab
hgs serve`` nodes over HTTPS on one etcd prefix (one state directory, copied, as
the admin guide says), and a guarded host (host-key mode, and a TPM host on a
swtpm) whose agent has node A as its primary HGS and node B as its fallback. The
main test kills the etcd leader while the host keeps attesting, then kills node
A, and checks what an auditor would: no answer but 200 or 503 from a node whose
store is electing a leader, no nonce that serves twice (a replay at the other
node is refused), and an audit chain that verifies and holds each attestation
whose nonce was consumed exactly once. Another takes etcd down entirely: 503
from every node, the host keeps its certificate, and service resumes without a
restart. Two store-level tests pin what the gateway sends again in an election.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from joserfc.jwk import ECKey

from etcd_harness import EtcdCluster
from guardfab.attestation.baseline import baseline_from_log
from guardfab.attestation.trust import AttestationMode, CiPolicy, HostKey, TpmHost, ek_digest
from guardfab.cli.main import cli
from guardfab.errors import GuardfabError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.formats.health_certificate import verify_health_certificate
from guardfab.formats.key_protector import load_key_protector
from guardfab.hgs import registry as reg
from guardfab.hgs.nonce import check_nonce
from guardfab.hgs.server import open_store
from guardfab.hgs.state import EtcdStoreSettings, HgsConfig, HgsState, init_state
from guardfab.host.agent import GuardedHostAgent
from guardfab.host.attestation import (
    HgsAttestationClient,
    HgsUnavailableError,
    attest_with_host_key,
    host_key_evidence,
)
from guardfab.host.attester import make_attester
from guardfab.host.config import HostConfig, HostMode, RetrySettings
from guardfab.host.keyrequest import KpsKeyReleaser
from guardfab.host.keys import load_or_create_key
from guardfab.host.status import AgentStatus, HostStatus
from guardfab.host.tpm import HostTpm
from guardfab.softhost.boot import CI_POLICY_FILE, Boot
from guardfab.store import EtcdStore, Store
from guardfab.store.audit import AuditLog
from hgs_harness import RunningHgs, start_hgs
from host_agent_harness import host_config
from swtpm_harness import simulate_measured_boot, start_swtpm, tpm_factory  # noqa: F401 -- fixtures
from test_kps_fixtures import Tenant, kps_document

pytestmark = pytest.mark.slow

PREFIX = "fabric/"
HOST_NAME = "host-1"
GOLDEN = Boot().log_bytes()
#: The HGS's etcd timeout (hgs.json store.timeout, the default). A write that was on
#: its way to the leader when it died is answered 503 only when it runs out, and the
#: worker waits for it meanwhile (its commits run on the event loop, ADR 0016).
STORE_TIMEOUT = 5.0
#: An election among the two members left (etcd's 1 s election timeout, randomized).
ELECTION = 2.0


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three etcd members on 127.0.0.1; stopped (or already killed) at teardown."""
    started = EtcdCluster(tmp_path / "etcd", size=3).start()
    yield started
    started.stop()


def follower_first(cluster: EtcdCluster) -> list[str]:
    """The endpoints with a follower first: a store there outlives the leader's death."""
    leader = cluster.leader()
    return [m.endpoint for m in cluster.members if m is not leader] + [leader.endpoint]


# --- the store during an election -------------------------------------------------


def test_a_read_during_an_election_waits_for_the_new_leader(cluster: EtcdCluster) -> None:
    """A read that etcd gave up because the leader changed is sent again, not failed.

    Before the fix, every read in flight when the leader died came back, about a
    second later, as "etcdserver: leader changed" (and every HGS request waiting on
    one as a 503), although a read changes nothing and the new leader answers it.
    """
    store = EtcdStore(follower_first(cluster), prefix=PREFIX, timeout=5, max_txn_ops=512)
    try:
        store.put("k", b"v")
        cluster.leader().kill()
        started = time.monotonic()
        entry = store.get("k")  # linearizable: it needs the next leader
        waited = time.monotonic() - started
        revision = store.put("k", b"w")
    finally:
        store.close()
    assert entry is not None
    assert entry.value == b"v"
    assert 0.2 < waited < 5, "the read spanned the election"
    assert revision > entry.revision


def test_a_lease_grant_lost_with_the_leader_is_sent_again(cluster: EtcdCluster) -> None:
    """A lease grant proposed in the second before the followers noticed the leader's death.

    The proposal is lost with the leader and etcd answers only when the request's
    deadline passes. A grant is harmless to repeat (a spare lease expires unused),
    so the gateway gives it a share of the timeout and sends it again, instead of
    holding the HGS request (and its worker) for the whole timeout and failing it.
    """
    store = EtcdStore(follower_first(cluster), prefix=PREFIX, timeout=5, max_txn_ops=512)
    try:
        store.put("warm", b"up")
        cluster.leader().kill()
        started = time.monotonic()
        store.put("nonce", b"", ttl=60)  # a lease grant, then the put
        took = time.monotonic() - started
        entry = store.get("nonce")
    finally:
        store.close()
    assert entry is not None
    assert took < 4, f"the put waited {took:.2f} s"


# --- the fabric: recording what each host asked and was answered -----------------


@dataclass
class Call:
    """One attest request a host sent: where, with which nonce and evidence, and the answer."""

    url: str
    nonce: bytes
    evidence: dict[str, Any]
    started: float
    ended: float = 0.0
    #: The HTTP status, or None when no answer came (the node was down).
    status: int | None = None


class RecordingClient(HgsAttestationClient):
    """The real HTTPS attestation client, noting every attest request and its answer.

    The notes serve the replays (the same evidence at the other node) and the audit
    count (which nonces the store holds as consumed).
    """

    def __init__(self, url: str, ca_file: Path, *, timeout: float, calls: list[Call]) -> None:
        super().__init__(url, ca_file, timeout=timeout)
        self.calls = calls

    def attest(self, nonce: bytes, evidence: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """Post the evidence as the real client does; note the answer."""
        call = Call(self.url, nonce, evidence, time.monotonic())
        self.calls.append(call)
        try:
            call.status, body = super().attest(nonce, evidence)
        except HgsUnavailableError as exc:  # ">= 500" or no answer: which, from the message
            answered = re.search(r"answered (\d{3})$", str(exc))
            call.status = int(answered.group(1)) if answered else None
            raise
        finally:
            call.ended = time.monotonic()
        return call.status, body


@dataclass
class Recorder:
    """What the hosts asked: every attest request, and which node the agent tried, in order."""

    calls: list[Call] = field(default_factory=list)
    tried: list[str] = field(default_factory=list)

    def client(self, url: str, ca_file: Path, timeout: float) -> HgsAttestationClient:
        """The agent's client factory."""
        self.tried.append(url)
        return RecordingClient(url, ca_file, timeout=timeout, calls=self.calls)


@dataclass
class Fabric:
    """Two HGS nodes on one etcd cluster, a guarded host's agent (A primary, B fallback)."""

    cluster: EtcdCluster
    node_a: RunningHgs
    node_b: RunningHgs
    agent: GuardedHostAgent
    #: A second registered host that attests at both nodes in turn while the leader dies.
    other_host: jose.AsymmetricKey
    recorder: Recorder
    #: How the guarded host attests: "host-key", or "tpm" (a swtpm; activated on first contact).
    mode: str


def host_key_puts(name: str, key: jose.AsymmetricKey) -> list[tuple[str, object]]:
    """The registry records of a host key."""
    host_key = HostKey(jose.thumbprint(key), name, jose.public_jwk(key))
    return [(reg.HOST_KEYS + host_key.key_id, host_key.to_dict())]


def tpm_host_puts(name: str, ek_public: bytes) -> list[tuple[str, object]]:
    """The registry records of a TPM host: its EK, the golden boot as baseline, the CI policy."""
    host = TpmHost(name, ek_digest(ek_public))
    baseline = baseline_from_log("golden", GOLDEN)
    ci = CiPolicy("ima-appraise", hashlib.sha256(CI_POLICY_FILE).digest())
    return [
        (reg.TPM_HOSTS + host.host_id, host.to_dict()),
        (reg.BASELINES + baseline.name, baseline.to_dict()),
        (reg.CI_POLICIES + ci.digest.hex(), ci.to_dict()),
    ]


def register(directory: Path, puts: list[tuple[str, object]]) -> None:
    """Write trusted state straight into the shared store, as the admin API would."""
    modes = [AttestationMode.TPM.value, AttestationMode.HOST_KEY.value]
    store = open_store(HgsState(directory))
    try:
        reg.Registry.trust_txn([(reg.MODES_KEY, modes), *puts]).commit(store)
    finally:
        store.close()


def guarded_host(
    request: pytest.FixtureRequest, mode: str, root: Path, nodes: list[RunningHgs]
) -> tuple[HostConfig, list[tuple[str, object]]]:
    """The host of the test's mode: its configuration and its registry records.

    Every attempt tries A first (no failback interval), so the failover after A
    dies is visible; the 10 s HTTP timeout outlasts the HGS's 5 s store timeout.
    """
    retry = RetrySettings(
        initial_delay=0.2, max_delay=2, jitter=0.25, failback_after=0, http_timeout=10
    )
    if mode == "host-key":
        config = host_config(root, nodes[0], fallback=nodes[1], mode=HostMode.HOST_KEY, retry=retry)
        assert isinstance(config.signing_key, Path)  # a key file, as host_config makes
        return config, host_key_puts(HOST_NAME, load_or_create_key(config.signing_key))
    device = request.getfixturevalue("start_swtpm")(HOST_NAME)
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, GOLDEN)
        ek_public = tpm.read_ek().public
    config = host_config(
        root, nodes[0], fallback=nodes[1], tcti=device.tcti, event_log=GOLDEN, retry=retry
    )
    return config, tpm_host_puts(HOST_NAME, ek_public)


@contextlib.contextmanager
def running_fabric(
    request: pytest.FixtureRequest, cluster: EtcdCluster, mode: str, store_timeout: float
) -> Iterator[Fabric]:
    """Two HGS nodes on ``cluster`` and a guarded host of ``mode``; the nodes stop after."""
    root = request.getfixturevalue("tmp_path")
    settings = EtcdStoreSettings(
        tuple(cluster.endpoints), PREFIX, timeout=store_timeout, max_txn_ops=512
    )
    init_state(root / "node-a", HgsConfig(service_name="hgs", store=settings.to_dict()))
    shutil.copytree(root / "node-a", root / "node-b")  # as the admin guide says
    nodes: list[RunningHgs] = []
    try:
        nodes += [start_hgs(root / name, init=False) for name in ("node-a", "node-b")]
        config, puts = guarded_host(request, mode, root / "host", nodes)
        other = ECKey.generate_key("P-256")
        register(nodes[0].directory, puts + host_key_puts("host-other", other))
        key = load_or_create_key(config.encryption_key)
        recorder = Recorder()
        agent = GuardedHostAgent(
            config,
            make_attester(config, key),
            KpsKeyReleaser(),
            key,
            client_factory=recorder.client,
        )
        agent.recover()
        yield Fabric(cluster, nodes[0], nodes[1], agent, other, recorder, mode)
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture(params=["host-key", "tpm"])
def fabric(request: pytest.FixtureRequest, cluster: EtcdCluster) -> Iterator[Fabric]:
    with running_fabric(request, cluster, request.param, STORE_TIMEOUT) as running:
        yield running


# --- the phases ---------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One on-demand attestation by the agent, and the status it left."""

    started: float
    ended: float
    status: AgentStatus


def keep_attesting(agent: GuardedHostAgent, stop: threading.Event, out: list[Attempt]) -> None:
    """On-demand attestations back to back, as ``guardfab host attest`` asks for one."""
    while not stop.is_set():
        started = time.monotonic()
        status = agent.attest_now()
        out.append(Attempt(started, time.monotonic(), status))
        stop.wait(0.05)


def other_host_attests(fabric: Fabric, stop: threading.Event) -> None:
    """A second host attesting at A and B in turn: writes in flight when the leader dies."""
    host_key = jose.public_jwk(ECKey.generate_key("P-384"))
    calls = fabric.recorder.calls
    nodes = (fabric.node_a, fabric.node_b)
    clients = [RecordingClient(n.url, Path(n.ca), timeout=10, calls=calls) for n in nodes]
    try:
        for turn in itertools.count():
            if stop.is_set():
                return
            with contextlib.suppress(GuardfabError):  # its answer is in the call's record
                attest_with_host_key(clients[turn % 2], fabric.other_host, host_key=host_key)
            stop.wait(0.02)
    finally:
        for client in clients:
            client.close()


def recovered(attempts: list[Attempt], since: float) -> Attempt | None:
    """The first attempt begun after ``since`` that passed."""
    return next(
        (
            a
            for a in list(attempts)
            if a.started > since and a.status.attestation_status == HostStatus.PASSED
        ),
        None,
    )


def kill_the_leader_while_attesting(fabric: Fabric) -> tuple[float, list[Attempt]]:
    """Both hosts attest; the etcd leader is killed; go on until the agent passed again (+0.5 s)."""
    stop, attempts = threading.Event(), list[Attempt]()
    threads = [
        threading.Thread(target=keep_attesting, args=(fabric.agent, stop, attempts)),
        threading.Thread(target=other_host_attests, args=(fabric, stop)),
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        leader = fabric.cluster.leader()
        killed_at = time.monotonic()
        leader.kill()
        deadline = killed_at + 10
        while time.monotonic() < deadline and recovered(attempts, killed_at) is None:
            time.sleep(0.02)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    return killed_at, attempts


def check_the_agent_rode_through(
    attempts: list[Attempt], killed_at: float, retry: RetrySettings
) -> float:
    """Every attempt passed or was a transient error that kept the certificate; return recovery."""
    expiry = None
    for attempt in attempts:
        status = attempt.status
        if status.attestation_status == HostStatus.PASSED:
            expiry = status.certificate_expires_at
            continue
        assert status.attestation_status == HostStatus.TRANSIENT_ERROR, status
        assert status.certificate_expires_at == expiry, "a transient error keeps the certificate"
        assert status.next_attempt is not None
        assert status.last_attempt is not None
        # Backed off; a certificate still good keeps its renewal point (later still).
        assert status.next_attempt - status.last_attempt >= retry.initial_delay * (1 - retry.jitter)
    back = recovered(attempts, killed_at)
    assert back is not None, "the agent never attested again after the leader died"
    assert attempts[-1].status.attestation_status == HostStatus.PASSED
    return back.ended - killed_at


def consumed(store: Store, nonce_key: bytes, nonce: bytes) -> bool:
    """Whether the shared store holds ``nonce`` as used."""
    checked = check_nonce(nonce_key, b64url_encode(nonce), now=time.time())
    return store.get(reg.NONCES + checked.nonce_id) is not None


def replay(node: RunningHgs, call: Call) -> tuple[int, str]:
    """Send a recorded attest request again, unchanged, to ``node``."""
    body = {"nonce": b64url_encode(call.nonce), "evidence": call.evidence}
    with node.client() as client:
        answer = client.post("/attestation/v1/attest", json=body)
    return answer.status_code, answer.text


def check_replays_are_refused(fabric: Fabric, store: Store) -> int:
    """Each recorded request replayed at the other node: a used nonce never serves again.

    A request answered 503 may or may not have consumed its nonce. If the store
    holds it, the replay is refused; if not, the replay is the nonce's first use
    and may pass, once: sent again, it is refused. Returns how many passed.
    """
    nonce_key = HgsState(fabric.node_a.directory).nonce_key()
    other = {fabric.node_a.url: fabric.node_b, fabric.node_b.url: fabric.node_a}
    first_uses = 0
    for call in list(fabric.recorder.calls):
        used = consumed(store, nonce_key, call.nonce)
        assert used or call.status == 503, f"{call.status} without a consumed nonce"
        status, text = replay(other[call.url], call)
        if status == 200:
            assert not used, "a used nonce served twice"
            first_uses += 1
            status, text = replay(other[call.url], call)
        assert status == 422, text  # a NonceError: refused input, not an outage
        assert "already used" in text, text
    return first_uses


def attest_through_a(fabric: Fabric) -> None:
    """The host attests at its primary; the certificate verifies against the shared key."""
    status = fabric.agent.attest_now()
    assert (status.attestation_status, status.served_by) == (HostStatus.PASSED, fabric.node_a.url)
    signer = HgsState(fabric.node_b.directory).attestation_signing_key()  # the copy's key
    token = fabric.agent.usable_certificate().token
    cert = verify_health_certificate(token, {jose.thumbprint(signer): signer}, now=time.time())
    assert cert.host_id == HOST_NAME


def fail_over_to_b(fabric: Fabric, caplog: pytest.LogCaptureFixture) -> float:
    """Node A crashes: the agent attests through B, and B's KPS releases a VM's keys.

    Returns how long the attestation took (A refused the connection, then B).
    """
    fabric.node_a.process.kill()
    fabric.node_a.process.wait()
    tried = len(fabric.recorder.tried)
    started = time.monotonic()
    status = fabric.agent.attest_now()
    took = time.monotonic() - started
    assert status.attestation_status == HostStatus.PASSED, status
    assert (status.served_by, status.using_fallback) == (fabric.node_b.url, True)
    assert fabric.recorder.tried[tried:] == [fabric.node_a.url, fabric.node_b.url]
    tenant = Tenant()
    kp = tenant.kp(kps_document(fabric.node_b))
    with caplog.at_level(logging.INFO, logger="guardfab.host.agent"):
        keys = fabric.agent.release(kp)
    assert keys.old_transport_key == load_key_protector(kp).unwrap(tenant.owner)
    assert f"keys released by {fabric.node_b.url}" in caplog.text
    return took


def check_the_audit_chain(fabric: Fabric, store: Store) -> None:
    """The chain verifies (asked of node B), and holds each consumed nonce's attestation once."""
    node = fabric.node_b
    result = CliRunner().invoke(
        cli, ["hgs", "audit", "verify", "--dir", str(node.directory), "--url", node.url, "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    records = list(AuditLog(store).iter_records())
    assert (report["ok"], report["records"]) == (True, len(records))
    nonce_key = HgsState(node.directory).nonce_key()
    nonces = {call.nonce for call in fabric.recorder.calls}
    used = [n for n in nonces if consumed(store, nonce_key, n)]
    attestations = [r for r in records if r.kind == "attestation"]
    # An attestation is recorded in the transaction that consumes its nonce: one each,
    # whether its answer arrived (200) or was lost with the leader (503).
    assert len(attestations) == len(used)
    # A TPM host's first attestation asks it to activate its AK ("failure"), once.
    activations = ["activation"] if fabric.mode == "tpm" else []
    assert [r.outcome for r in attestations].count("failure") == len(activations)
    assert [r.kind for r in records if r.kind != "attestation"] == [*activations, "key-release"]


# --- the test -------------------------------------------------------------------


def test_the_fabric_rides_through_losing_the_etcd_leader_and_an_hgs_node(
    fabric: Fabric, caplog: pytest.LogCaptureFixture
) -> None:
    attest_through_a(fabric)

    killed_at, attempts = kill_the_leader_while_attesting(fabric)
    recovery = check_the_agent_rode_through(attempts, killed_at, fabric.agent.config.retry)
    # Usually the election (about 1.2 s here); at worst the agent's request was the
    # write lost with the leader, answered 503 at the store timeout, then B.
    bound = STORE_TIMEOUT + ELECTION
    assert recovery < bound, f"attestations came back {recovery:.2f} s after the leader died"
    calls = fabric.recorder.calls
    assert {c.status for c in calls} <= {200, 503}, "a store outage is a 503, never a 500"

    store = open_store(HgsState(fabric.node_b.directory))
    try:
        first_uses = check_replays_are_refused(fabric, store)
        failover = fail_over_to_b(fabric, caplog)
        check_the_audit_chain(fabric, store)
    finally:
        store.close()
    failed = sum(c.status == 503 for c in calls)
    print(  # the numbers the admin guide quotes (pytest -s)
        f"\nrecovery {recovery:.2f} s; agent attempts {len(attempts)} "
        f"({sum(a.status.attestation_status != HostStatus.PASSED for a in attempts)} failed); "
        f"attest requests {len(calls)}, 503 {failed}, slowest "
        f"{max(c.ended - c.started for c in calls):.2f} s; replays first use {first_uses}; "
        f"attestation through B with A down {failover:.3f} s"
    )


def test_while_the_store_is_down_nodes_answer_503_and_the_host_keeps_its_certificate(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """etcd entirely down: every node says 503 (never 500), the agent fails over, then waits.

    The agent tries A, takes A's 503 for "did not answer", tries B in the same
    attempt, and keeps the certificate it holds and its renewal point (an
    on-demand attempt that failed does not pull the schedule forward). Once the member
    is back (its data kept), the same HGS processes serve again without a restart.
    """
    cluster = EtcdCluster(tmp_path / "etcd-1", size=1).start()
    try:
        with running_fabric(request, cluster, "host-key", store_timeout=1.0) as fabric:
            passed = fabric.agent.attest_now()
            assert passed.attestation_status == HostStatus.PASSED
            cluster.members[0].kill()
            tried = len(fabric.recorder.tried)
            status = fabric.agent.attest_now()
            tried_then = fabric.recorder.tried[tried:]
            answer = attest_directly(fabric.node_b, fabric.other_host)
            cluster.start()  # the member comes back with its data
            again = fabric.agent.attest_now()
    finally:
        cluster.stop()
    nodes = [fabric.node_a.url, fabric.node_b.url]
    assert tried_then == nodes, "A's 503 made the agent try B in the same attempt"
    assert status.attestation_status == HostStatus.TRANSIENT_ERROR
    assert [f["reason"] for f in status.failures] == [f"HGS at {u} answered 503" for u in nodes]
    assert status.certificate_expires_at == passed.certificate_expires_at, "certificate kept"
    assert status.next_attempt == passed.next_attempt, "and its renewal point"
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert (error["type"], "no etcd member answered" in error["message"]) == ("StoreError", True)
    assert again.attestation_status == HostStatus.PASSED


def attest_directly(node: RunningHgs, signer: jose.AsymmetricKey) -> httpx.Response:
    """One attestation by another host, over plain HTTPS, to see the node's own answer."""
    host_key = jose.public_jwk(ECKey.generate_key("P-384"))
    with node.client() as client:
        challenge = client.post("/attestation/v1/challenge")
        assert challenge.status_code == 200, "a challenge needs no store"
        nonce = challenge.json()["nonce"]
        evidence = host_key_evidence(
            signer, nonce=b64url_decode(nonce, what="nonce"), host_key=host_key
        )
        body = {"nonce": nonce, "evidence": evidence.to_dict()}
        return client.post("/attestation/v1/attest", json=body)
