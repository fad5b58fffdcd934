"""Live migration of a shielded VM between two guarded hosts, keys through the KPS.

One real boot (TCG, OVMF secure boot, the tiny guest) on host A. Host B is a
second registered, attested host with its own key and certificate; host C's
only certificate has expired. Both "hosts" run here: two VM directories, two
QEMUs, ports on 127.0.0.1. One ordered scenario on that boot (so it holds under
xdist too): C is refused (the VM stays on A), a stream to E fails after E's
release (the VM stays on A, the released pair pending there), A moves to B (the
pending pair is used: A's committed KP is spent), then B to D with a failure
after the hand-over (the VM stays at D). The `vm` CLI (through the agents' management
API) is tested in test_vm_cli.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import vm_fabric_harness
import vm_harness
from guardfab.formats.key_protector import load_key_protector
from guardfab.hypervisor.accel import Accelerator
from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.migrate import DestinationFactory, MigrationRefusedError, migrate_vm
from guardfab.hypervisor.migration import MigrationError
from guardfab.hypervisor.power import RuntimeFactory, power_on, running_pid
from guardfab.hypervisor.provision import VmRecord, provision
from guardfab.hypervisor.spec import VmSpec
from guardfab.hypervisor.vault import VaultStore
from guardfab.hypervisor.vm import QemuVm, VmKeys, VmRuntime
from vm_fabric_harness import TenantVm, VmFabric
from vm_harness import Guest, fetch, find_in_files, parse_page

guest = vm_harness.guest
accelerator = vm_harness.accelerator
vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow


@dataclass
class OnHostA:
    tenant: TenantVm
    hosts: Path
    port: int
    boot_id: str
    made: list[QemuVm] = field(default_factory=list)

    def factory(self, accelerator: Accelerator) -> RuntimeFactory:
        def make(spec: VmSpec, state_dir: Path) -> VmRuntime:
            self.made.append(QemuVm(spec, state_dir, accel=accelerator, die_with_parent=True))
            return self.made[-1]

        return make

    def dir(self, host: str) -> Path:
        return self.hosts / host / self.tenant.name


@pytest.fixture(scope="module")
def on_a(
    vm_fabric: VmFabric,
    guest: Guest,
    accelerator: Accelerator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[OnHostA]:
    tenant = vm_fabric.tenant_vm("migrating-1")
    hosts = tmp_path_factory.mktemp("hosts")
    port = vm_harness.free_port()
    provision(
        tenant.request(boot=guest.boot(), host_port=port),
        hosts / "a",
        reveal_secrets=vm_fabric.reveal_secrets,
        key_source=vm_fabric.key_source(),
    )
    state = OnHostA(tenant, hosts, port, "")
    try:
        power_on(
            state.dir("a"),
            vm_fabric.key_source(),
            runtime_factory=state.factory(accelerator),
        )
        state.boot_id = parse_page(fetch(port))["boot_id"]
        yield state
    finally:
        for vm in state.made:
            vm.stop()


def _destination(accelerator: Accelerator, made: list[QemuVm]) -> DestinationFactory:
    def make(record: VmRecord, vm_dir: Path) -> QemuVm:
        made.append(
            QemuVm(record.spec(vm_dir), vm_dir / "state", accel=accelerator, die_with_parent=True)
        )
        return made[-1]

    return make


def _unattested_destination_is_refused_and_the_vm_stays(
    vm_fabric: VmFabric, on_a: OnHostA, accelerator: Accelerator
) -> None:
    store = VaultStore(on_a.dir("a") / "keys")
    before = store.numbers()
    with pytest.raises(MigrationRefusedError, match="got no keys") as caught:
        migrate_vm(
            on_a.made[0],
            on_a.dir("a"),
            on_a.dir("c"),
            vm_fabric.unattested_host("host-c"),
            port=vm_harness.free_port(),
            factory=_destination(accelerator, on_a.made),
        )
    print(f"\nrefused: {caught.value}")
    assert not (on_a.hosts / "c").exists()
    assert len(on_a.made) == 1  # no destination QEMU was started
    assert on_a.made[0].status() == "running"
    assert store.numbers() == before
    assert parse_page(fetch(on_a.port))["boot_id"] == on_a.boot_id


class _FailsAtStart(QemuVm):
    def start(self, keys: VmKeys, *, incoming: bool = False) -> None:
        raise HypervisorError("the destination's QEMU did not start (simulated)")


def _a_failed_stream_hands_the_released_pair_back_to_the_source(
    vm_fabric: VmFabric, on_a: OnHostA, accelerator: Accelerator
) -> None:
    """A->E fails after E's release: A runs on, the released pair pending in A's store."""
    store = VaultStore(on_a.dir("a") / "keys")
    committed = store.committed()

    def make(record: VmRecord, vm_dir: Path) -> QemuVm:
        return _FailsAtStart(record.spec(vm_dir), vm_dir / "state", accel=accelerator)

    with pytest.raises(HypervisorError, match="simulated"):
        migrate_vm(on_a.made[0], on_a.dir("a"), on_a.dir("e"), vm_fabric.other_host("host-e"),
                   port=vm_harness.free_port(), factory=make)  # fmt: skip
    assert not on_a.dir("e").exists()
    assert on_a.made[0].status() == "running"
    assert store.committed() == committed, "A still runs with the pair it started with"
    pending = store.pending()
    assert pending is not None
    assert load_key_protector(pending.kp).generation == 3, "E's release spent generation 2"


def _migrate_a_to_b_keeps_the_page_and_the_boot(
    vm_fabric: VmFabric, on_a: OnHostA, accelerator: Accelerator
) -> None:
    source = on_a.made[0]
    mark = time.monotonic()
    result = migrate_vm(
        source,
        on_a.dir("a"),
        on_a.dir("b"),
        vm_fabric.other_host("host-b"),
        port=vm_harness.free_port(),
        factory=_destination(accelerator, on_a.made),
    )
    took = time.monotonic() - mark
    page = parse_page(fetch(on_a.port))
    print(f"\nmigrated A->B in {took:.2f} s: {result.stats}")
    assert page["boot_id"] == on_a.boot_id
    assert page["marker"] == on_a.tenant.marker
    assert page["tpm"].startswith("present"), page
    assert not source.running
    assert not on_a.dir("a").exists()
    assert running_pid(on_a.dir("b")) == result.vm.pid
    store = VaultStore(on_a.dir("b") / "keys")
    assert store.pending() is None
    # provisioning (1), power-on at A (2), E's release (3, pending at A), then B's
    # release of that pending KP -- A's committed one was refused as spent (4)
    assert load_key_protector(store.committed().kp).generation == 4
    assert find_in_files([on_a.hosts], on_a.tenant.needles()) == []


class _NoForward(QemuVm):
    def forward_host_port(self) -> None:
        raise HypervisorError("port 1 is taken (simulated)")


def _a_failure_after_the_hand_over_leaves_the_vm_at_the_destination(
    vm_fabric: VmFabric, on_a: OnHostA, accelerator: Accelerator
) -> None:
    """B->D whose port forward fails once the guest runs at D."""
    source = on_a.made[-1]

    def make(record: VmRecord, vm_dir: Path) -> QemuVm:
        on_a.made.append(_NoForward(record.spec(vm_dir), vm_dir / "state", accel=accelerator,
                                    die_with_parent=True))  # fmt: skip
        return on_a.made[-1]

    with pytest.raises(MigrationError, match=r"moved to .* and runs there, but: port 1"):
        migrate_vm(source, on_a.dir("b"), on_a.dir("d"), vm_fabric.other_host("host-d"),
                   port=vm_harness.free_port(), factory=make)  # fmt: skip
    assert not source.running
    assert on_a.made[-1].status() == "running"
    assert not on_a.dir("b").exists()
    store = VaultStore(on_a.dir("d") / "keys")
    assert store.pending() is None
    assert load_key_protector(store.committed().kp).generation == 5
    assert running_pid(on_a.dir("d")) == on_a.made[-1].pid


def test_c_refused_a_failed_stream_then_a_to_b_then_a_failure_after_the_hand_over(
    vm_fabric: VmFabric, on_a: OnHostA, accelerator: Accelerator
) -> None:
    """One scenario, in order (each step needs the VM where the one before left it)."""
    _unattested_destination_is_refused_and_the_vm_stays(vm_fabric, on_a, accelerator)
    _a_failed_stream_hands_the_released_pair_back_to_the_source(vm_fabric, on_a, accelerator)
    _migrate_a_to_b_keeps_the_page_and_the_boot(vm_fabric, on_a, accelerator)
    _a_failure_after_the_hand_over_leaves_the_vm_at_the_destination(vm_fabric, on_a, accelerator)
