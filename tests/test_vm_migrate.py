"""Live migration between guarded hosts, each half in its own agent, driven through two APIs.

Three host-key hosts, each with its own agent and management API over HTTPS on
127.0.0.1 (one process here, but no agent calls another): A and B registered
at the HGS, C never. The fabric administrator's side is
:mod:`guardfab.host.manage.orchestrate` with one client per host and that
host's own admin token; every request and answer crossing the APIs is recorded.
One real boot (OVMF secure boot, TCG) on A, then in order (each step needs the
VM where the one before left it):

1. to C: refused at C's release, nothing written at C, the VM runs on at A;
2. to B with the VM record loosened on the way (encryption-supported, a
   console): B's release opens the vault, whose sealed policy says shielded;
   refused, B's pair handed back to A, the VM runs on at A;
3. to B with a stream under the wrong PSK (the salt changed on the way): B's
   release spent A's committed KP, so B's pair is handed back to A as pending;
   the VM runs on at A (same boot);
4. A to B: the guest's page keeps answering with the same boot id; B's own
   release of the pending KP (A's committed one is refused as spent). Between
   the stream and B's finish, step 3's hand-back is replayed to A (it equals
   A's pending pair): refused, A stays paused and leaves -- resumed, the guest
   would run twice on the same disks. The OVMF variable store offered to B is
   zeroed on the way: B's copy is overwritten by the one the (authenticated)
   stream carries once the guest runs there (QEMU's pflash writes its migrated
   contents back), so B ends with A's variables;
5. B to A, left waiting until A's agent abandons it (its timeout): ``vm migrate
   --abort`` hands A's pair back to B, where the VM can still be stopped and
   started;
6. nothing that crossed the APIs holds a key: no transport key of any KP
   generation, no vault key, no PSK -- only the fields of the protocol.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import guardfab.host.manage.migrations as migrations
import vm_fabric_harness
import vm_harness
from guardfab.cli.main import cli
from guardfab.errors import GuardfabError, NotAuthorizedError, TransportError, UsageError
from guardfab.formats.encoding import b64url_decode, b64url_encode
from guardfab.formats.key_protector import load_key_protector
from guardfab.host.manage import orchestrate
from guardfab.host.manage.client import ManagementClient
from guardfab.hypervisor.argv import VmPaths
from guardfab.hypervisor.migrate import migration_psk
from guardfab.hypervisor.power import power_off, running_pid
from guardfab.hypervisor.vault import VaultContents, VaultStore, open_vault
from manage_harness import ManagedHost, managed_host
from vm_fabric_harness import TenantVm, VmFabric
from vm_harness import fetch, find_in_files, parse_page

vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow

#: Every field a request or an answer of the migration protocol may carry.
PROTOCOL_FIELDS = {
    "record", "pairs", "nvram", "disks_dir", "port", "kp", "vault", "address", "salt",
    "name", "total_time_ms", "downtime_ms", "transferred_bytes", "pid", "destination",
    "left", "forwarded", "pending_pair", "resumed",
}  # fmt: skip


@dataclass
class Recorder:
    """One host's API client that keeps every request, answer and error it saw."""

    client: ManagementClient
    log: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The API's URL."""
        return self.client.url

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The client's call, recorded."""
        self.log.append({"request": path, "body": body})
        try:
            answer = self.client.call(method, path, body)
        except GuardfabError as exc:
            self.log.append({"error": str(exc), "hint": exc.hint})
            raise
        self.log.append({"answer": answer})
        return answer


@dataclass
class Fabric:
    """The three hosts, the tenant's VM and what crossed their APIs."""

    a: ManagedHost
    b: ManagedHost
    c: ManagedHost
    tenant: TenantVm
    port: int
    log: list[Any] = field(default_factory=list)

    def agent(self, host: ManagedHost) -> Recorder:
        """A recorded admin client of ``host`` (its own token)."""
        return Recorder(host.client("admin"), self.log)

    def vm_dir(self, host: ManagedHost) -> Path:
        """The VM's directory on ``host``."""
        return host.config.vms_dir / self.tenant.name


@pytest.fixture(scope="module")
def fabric(vm_fabric: VmFabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fabric]:
    """A, B registered, C not; the VM provisioned on A through A's API (not started)."""
    root = tmp_path_factory.mktemp("migrate")
    tenant = vm_fabric.tenant_vm("moving-1")
    port = vm_harness.free_port()
    with (
        managed_host(root / "a", vm_fabric, "mig-a") as a,
        managed_host(root / "b", vm_fabric, "mig-b") as b,
        managed_host(root / "c", vm_fabric, "mig-c", registered=False) as c,
    ):
        running = Fabric(a, b, c, tenant, port)
        try:
            with a.client() as client:
                client.provision(_provision_body(tenant, port))
            yield running
        finally:
            for host in (a, b, c):
                for vm_dir in host.config.vms_dir.glob("*"):
                    power_off(vm_dir)


def _provision_body(tenant: TenantVm, port: int) -> dict[str, Any]:
    return {
        "name": tenant.name,
        "template": str(tenant.template),
        "template_sig": b64url_encode(tenant.template_sig),
        "pdk": b64url_encode(tenant.pdk),
        "kp": b64url_encode(tenant.kp),
        "port": port,
    }


def _generation(store: VaultStore, which: str) -> int:
    pair = store.committed() if which == "committed" else store.pending()
    assert pair is not None
    return load_key_protector(pair.kp).generation


def _refused_at_c(fabric: Fabric, boot_id: str) -> None:
    store = VaultStore(fabric.vm_dir(fabric.a) / "keys")
    before = store.numbers()
    with pytest.raises(NotAuthorizedError, match="got no keys") as caught:
        orchestrate.migrate(fabric.agent(fabric.a), fabric.agent(fabric.c), fabric.tenant.name)
    assert "not registered" in str(caught.value)
    assert list(fabric.c.config.vms_dir.glob("*")) == [], "nothing written at C"
    assert store.numbers() == before
    assert parse_page(fetch(fabric.port))["boot_id"] == boot_id


@dataclass
class Loosening(Recorder):
    """An administrator's client that loosens the VM record it carries to the destination."""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Offer the VM as encryption-supported with a console."""
        if path.endswith("/incoming") and body is not None:
            record = {**body["record"], "policy": "encryption-supported", "console": True}
            body = {**body, "record": record}
        return super().call(method, path, body)


def _loosened_record_refused(fabric: Fabric, boot_id: str) -> None:
    """The record's policy is checked against the vault's: refused at B, B's pair back at A."""
    b = Loosening(fabric.b.client("admin"), fabric.log)
    with pytest.raises(GuardfabError, match="record was changed"):
        orchestrate.migrate(fabric.agent(fabric.a), b, fabric.tenant.name)
    assert parse_page(fetch(fabric.port))["boot_id"] == boot_id, "still running at A"
    store = VaultStore(fabric.vm_dir(fabric.a) / "keys")
    assert _generation(store, "committed") == 2  # provisioning 1, start at A 2
    assert _generation(store, "pending") == 3, "B's release, handed back"
    assert fabric.b.client().show(fabric.tenant.name)["incoming"] == "abandoned"
    assert running_pid(fabric.vm_dir(fabric.b)) is None


def _wrong_psk_then_hand_back(fabric: Fabric, boot_id: str) -> dict[str, str]:
    """B released (A's committed KP is spent), the stream fails: B's pair goes back to A."""
    a, b, name = fabric.agent(fabric.a), fabric.agent(fabric.b), fabric.tenant.name
    offer = a.call("POST", f"/vms/{name}/outgoing")
    answer = b.call("POST", f"/vms/{name}/incoming", offer)
    forged = {**answer, "salt": b64url_encode(bytes(32))}
    del forged["name"]
    with pytest.raises(TransportError, match=r"migration of VM .* failed"):
        a.call("POST", f"/vms/{name}/outgoing/send", forged)
    assert parse_page(fetch(fabric.port))["boot_id"] == boot_id, "still running at A"
    pair = b.call("POST", f"/vms/{name}/incoming/abort")
    taken = a.call("POST", f"/vms/{name}/outgoing/take-back", {k: pair[k] for k in ("kp", "vault")})
    assert taken["resumed"] is False  # a failed handshake never paused it
    store = VaultStore(fabric.vm_dir(fabric.a) / "keys")
    assert _generation(store, "committed") == 2
    assert _generation(store, "pending") == 4, "B's release of the pending KP 3, handed back"
    assert running_pid(fabric.vm_dir(fabric.b)) is None
    with pytest.raises(GuardfabError, match="unfinished incoming migration"):
        fabric.b.client().action(name, "start")
    return {k: pair[k] for k in ("kp", "vault")}


@dataclass
class Replaying(Recorder):
    """An administrator's client of the source that replays an old hand-back after the stream."""

    name: str = ""
    old_pair: dict[str, str] = field(default_factory=dict)
    vm_dir: Path = Path()
    refused: str = ""
    nvram_sent: bytes = b""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """After the stream went, hand the old pair back: it must not resume the source."""
        answer = super().call(method, path, body)
        if path.endswith("/outgoing/send"):
            self.nvram_sent = _nvram_file(self.vm_dir).read_bytes()
            with pytest.raises(UsageError, match="not the hand-back of that stream") as caught:
                super().call("POST", f"/vms/{self.name}/outgoing/take-back", self.old_pair)
            self.refused = str(caught.value)
        return answer


@dataclass
class ZeroingNvram(Recorder):
    """An administrator's client of the destination that zeroes the offered variable store."""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Offer an all-zero OVMF variable store of the same size."""
        if path.endswith("/incoming") and body is not None and body.get("nvram"):
            size = len(b64url_decode(body["nvram"], what="NVRAM"))
            body = {**body, "nvram": b64url_encode(bytes(size))}
        return super().call(method, path, body)


def _nvram_file(vm_dir: Path) -> Path:
    return VmPaths(work_dir=vm_dir / "state", run_dir=vm_dir).ovmf_vars


def _a_to_b(fabric: Fabric, boot_id: str, old_pair: dict[str, str]) -> None:
    name = fabric.tenant.name
    a_dir, b_dir = fabric.vm_dir(fabric.a), fabric.vm_dir(fabric.b)
    source = Replaying(fabric.a.client("admin"), fabric.log, name, old_pair, a_dir)
    mark = time.monotonic()
    report = orchestrate.migrate(source, ZeroingNvram(fabric.b.client("admin"), fabric.log), name)
    assert source.refused, "the old hand-back was replayed between the stream and the finish"
    assert source.nvram_sent.strip(b"\0"), "A had variables"
    assert _nvram_file(b_dir).read_bytes() == source.nvram_sent, "the stream's copy won"
    print(f"\nmigrated A->B through two agents in {time.monotonic() - mark:.2f} s: {report}")
    assert report.warnings == []
    page = parse_page(fetch(fabric.port))
    assert page["boot_id"] == boot_id
    assert page["marker"] == fabric.tenant.marker
    assert page["tpm"].startswith("present"), page
    assert sorted(p.name for p in a_dir.iterdir()) == ["disks"], "A keeps only the disks"
    assert (b_dir / "disks").is_symlink()
    assert (b_dir / "disks").resolve() == a_dir / "disks"
    assert running_pid(b_dir) == report.pid
    store = VaultStore(b_dir / "keys")
    assert store.pending() is None
    assert _generation(store, "committed") == 5  # B released the pending KP 4
    assert not (b_dir / "incoming.json").exists()


def _abandoned_then_aborted(fabric: Fabric, monkeypatch: pytest.MonkeyPatch) -> None:
    """B->A, nobody finishes: A's agent abandons it; ``vm migrate --abort`` hands back."""
    monkeypatch.setattr(migrations, "INCOMING_TIMEOUT", 2.0)
    a, b, name = fabric.agent(fabric.a), fabric.agent(fabric.b), fabric.tenant.name
    offer = b.call("POST", f"/vms/{name}/outgoing")
    a.call("POST", f"/vms/{name}/incoming", offer)
    a_dir = fabric.vm_dir(fabric.a)
    deadline = time.monotonic() + 30
    while "abandoned" not in (a_dir / "incoming.json").read_text():
        assert time.monotonic() < deadline, "A's agent never abandoned the migration"
        time.sleep(0.2)
    assert fabric.a.client().show(name)["incoming"] == "abandoned"
    out = CliRunner().invoke(cli, [
        "vm", "migrate", name, "--abort", "--config", str(fabric.b.config_file),
        "--to-config", str(fabric.a.config_file),
    ], catch_exceptions=False)  # fmt: skip
    assert out.exit_code == 0, out.output
    store = VaultStore(fabric.vm_dir(fabric.b) / "keys")
    assert _generation(store, "pending") == 6, "A's release, handed back to B"
    with fabric.b.client() as client:
        client.action(name, "stop")
        started = client.action(name, "start")  # the committed KP 5 is spent: pending 6
    assert running_pid(fabric.vm_dir(fabric.b)) == started["pid"]
    assert _generation(store, "committed") == 7


def _nothing_secret_crossed(fabric: Fabric, vm_fabric: VmFabric) -> None:
    """Only protocol fields crossed the APIs; no key of any generation, no PSK."""
    traffic = json.dumps(fabric.log)
    kps = {bytes(b64url_decode(p["kp"], what="kp")) for p in _pairs(fabric.log)}
    assert len(kps) >= 4, "the test saw the pairs it meant to (generations 2 to 5)"
    transport = [load_key_protector(kp).unwrap(vm_fabric.kps).reveal() for kp in kps]
    store = VaultStore(fabric.vm_dir(fabric.b) / "keys")
    committed = load_key_protector(store.committed().kp).unwrap(vm_fabric.kps)
    contents = open_vault(store.committed().vault, committed, vm_name=fabric.tenant.name)
    secrets = [*transport, committed.reveal(), *_vault_keys(contents)]
    for entry in fabric.log:
        if isinstance(entry.get("answer"), dict) and "salt" in entry["answer"]:
            salt = b64url_decode(entry["answer"]["salt"], what="salt")
            secrets.append(migration_psk(contents.vtpm_migration, salt, fabric.tenant.name))
    for secret in secrets:
        for form in (secret.hex(), b64url_encode(secret), base64.b64encode(secret).decode()):
            assert form not in traffic
    for entry in fabric.log:
        for part in ("body", "answer"):
            if isinstance(entry.get(part), dict):
                assert set(entry[part]) <= PROTOCOL_FIELDS, entry[part].keys()


def _pairs(log: list[Any]) -> Iterator[dict[str, str]]:
    for entry in log:
        for part in ("body", "answer"):
            value = entry.get(part)
            if isinstance(value, dict):
                yield from value.get("pairs", [])
                if "kp" in value:
                    yield value


def _vault_keys(contents: VaultContents) -> list[bytes]:
    disks = [key.material for key in contents.disks.values()]
    return [contents.vtpm_state, contents.vtpm_migration, *disks]


def test_migration_through_two_agents_refused_failed_done_and_abandoned(
    fabric: Fabric, vm_fabric: VmFabric, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One scenario, in order (see the module docstring)."""
    with fabric.a.client() as client:
        client.action(fabric.tenant.name, "start")
    boot_id = parse_page(fetch(fabric.port))["boot_id"]
    _refused_at_c(fabric, boot_id)
    _loosened_record_refused(fabric, boot_id)
    old_pair = _wrong_psk_then_hand_back(fabric, boot_id)
    _a_to_b(fabric, boot_id, old_pair)
    _abandoned_then_aborted(fabric, monkeypatch)
    _nothing_secret_crossed(fabric, vm_fabric)
    roots = [h.config_file.parent for h in (fabric.a, fabric.b, fabric.c)]
    assert find_in_files(roots, fabric.tenant.needles()) == []


def test_a_hosts_token_does_not_work_on_another_host(fabric: Fabric) -> None:
    """Each API knows only its own tokens: A's admin token is refused by B, and B's by A."""
    for mine, other in ((fabric.a, fabric.b), (fabric.b, fabric.a)):
        with other.client(token_file=mine.files.token_file("admin")) as client:
            with pytest.raises(NotAuthorizedError, match="token"):
                client.action(fabric.tenant.name, "incoming/abort")
            with pytest.raises(NotAuthorizedError, match="token"):
                client.list()
