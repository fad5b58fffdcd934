"""The migration routes of the management API refuse bad input, changing nothing (no boot).

Two real agents (A and B, registered at the session's HGS) over HTTPS on
127.0.0.1; a VM provisioned on A through A's API and never started. Every
refusal here comes before any key release: B's directory stays empty and A's
key store unchanged. Also the pure parts: the offer's parser and the PSK.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import vm_fabric_harness
from guardfab.cli.main import cli
from guardfab.errors import GuardfabError, InvalidInputError, UsageError
from guardfab.formats.encoding import b64url_encode
from guardfab.hypervisor.migrate import (
    SALT_SIZE,
    MigrationOffer,
    SealedPair,
    StreamEndpoint,
    migration_psk,
)
from guardfab.hypervisor.provision import load_record
from guardfab.hypervisor.vault import VaultStore
from manage_harness import ManagedHost, managed_host
from vm_fabric_harness import TenantVm, VmFabric

vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow


@dataclass
class Pair:
    """Two hosts and the VM on A."""

    a: ManagedHost
    b: ManagedHost
    tenant: TenantVm

    @property
    def vm_dir(self) -> Path:
        """The VM's directory on A."""
        return self.a.config.vms_dir / self.tenant.name

    def offer(self, **changes: Any) -> dict[str, Any]:
        """An offer as A's agent would make it for a running VM (built from A's files)."""
        store = VaultStore(self.vm_dir / "keys")
        offer = MigrationOffer(
            load_record(self.vm_dir),
            tuple(SealedPair.of(p) for p in store.candidates()),
            None,
            (self.vm_dir / "disks").resolve(),
        ).to_dict()
        return {**offer, **changes}


@pytest.fixture(scope="module")
def hosts(vm_fabric: VmFabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    """A and B with their agents; the VM provisioned on A (not started)."""
    root = tmp_path_factory.mktemp("migapi")
    tenant = vm_fabric.tenant_vm("api-mig")
    with (
        managed_host(root / "a", vm_fabric, "migapi-a") as a,
        managed_host(root / "b", vm_fabric, "migapi-b") as b,
    ):
        with a.client() as client:
            client.provision({
                "name": tenant.name, "template": str(tenant.template),
                "template_sig": b64url_encode(tenant.template_sig),
                "pdk": b64url_encode(tenant.pdk), "kp": b64url_encode(tenant.kp),
            })  # fmt: skip
        yield Pair(a, b, tenant)


def _nothing_changed(hosts: Pair, numbers: list[int]) -> None:
    b_vms = hosts.b.config.vms_dir
    assert not b_vms.exists() or list(b_vms.iterdir()) == [], "nothing written at B"
    assert VaultStore(hosts.vm_dir / "keys").numbers() == numbers


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"disks_dir": "disks"}, "disks_dir"),
        ({"pairs": []}, "pairs"),
        ({"record": {"name": "api-mig"}}, "VM record"),
        ({"nvram": "!!"}, "NVRAM"),
        ({"port": 0}, "port"),
        ({"salt": "x"}, "salt"),
    ],
)
def test_a_malformed_offer_is_refused_before_any_release(
    hosts: Pair, change: dict[str, Any], error: str
) -> None:
    numbers = VaultStore(hosts.vm_dir / "keys").numbers()
    with hosts.b.client() as b, pytest.raises(InvalidInputError, match=error):
        b.call("POST", "/vms/api-mig/incoming", hosts.offer(**change))
    _nothing_changed(hosts, numbers)
    assert hosts.b.service.management is not None
    record = hosts.b.service.management.context.audit.records()[-1]
    assert (record.details["operation"], record.outcome) == ("migrate-receive", "refused")


def test_another_vms_vault_in_the_offer_is_refused(hosts: Pair, vm_fabric: VmFabric) -> None:
    numbers = VaultStore(hosts.vm_dir / "keys").numbers()
    offer = hosts.offer()
    offer["record"] = {**offer["record"], "name": "api-other"}
    with hosts.b.client() as b, pytest.raises(InvalidInputError, match="another VM"):
        b.call("POST", "/vms/api-other/incoming", offer)
    _nothing_changed(hosts, numbers)


def test_an_offer_under_another_name_is_refused(hosts: Pair) -> None:
    with hosts.b.client() as b, pytest.raises(UsageError, match="not 'api-other'"):
        b.call("POST", "/vms/api-other/incoming", hosts.offer())


def test_disks_out_of_reach_are_refused_before_the_release(hosts: Pair, tmp_path: Path) -> None:
    numbers = VaultStore(hosts.vm_dir / "keys").numbers()
    with hosts.b.client() as b, pytest.raises(UsageError, match="cannot reach disk os"):
        b.call("POST", "/vms/api-mig/incoming", hosts.offer(disks_dir=str(tmp_path)))
    _nothing_changed(hosts, numbers)


def test_a_vm_not_running_is_not_offered_nor_sent(hosts: Pair) -> None:
    numbers = VaultStore(hosts.vm_dir / "keys").numbers()
    endpoint = {"address": "127.0.0.1", "port": 9, "salt": b64url_encode(bytes(SALT_SIZE))}
    with hosts.a.client() as a:
        with pytest.raises(UsageError, match="not running"):
            a.call("POST", "/vms/api-mig/outgoing")
        with pytest.raises(UsageError, match="offer it first"):
            a.call("POST", "/vms/api-mig/outgoing/send", endpoint)
        with pytest.raises(UsageError, match="not running"):
            a.call("POST", "/vms/api-mig/outgoing/leave")
    assert VaultStore(hosts.vm_dir / "keys").numbers() == numbers


def test_a_pair_handed_back_must_be_this_vms_and_newer(hosts: Pair, vm_fabric: VmFabric) -> None:
    store = VaultStore(hosts.vm_dir / "keys")
    numbers = store.numbers()
    vault = b64url_encode(store.committed().vault)
    other = vm_fabric.tenant_vm("api-stranger")
    with hosts.a.client() as a:
        with pytest.raises(GuardfabError, match="not VM 'api-mig'"):
            a.call("POST", "/vms/api-mig/outgoing/take-back",
                   {"kp": b64url_encode(other.kp), "vault": vault})  # fmt: skip
        with pytest.raises(UsageError, match="not newer"):  # the tenant's first KP: a rollback
            a.call("POST", "/vms/api-mig/outgoing/take-back",
                   {"kp": b64url_encode(hosts.tenant.kp), "vault": vault})  # fmt: skip
        with pytest.raises(GuardfabError, match="not a compact JWE"):
            a.call("POST", "/vms/api-mig/outgoing/take-back",
                   {"kp": b64url_encode(hosts.tenant.kp), "vault": "eHl6"})  # fmt: skip
    assert store.numbers() == numbers
    assert store.pending() is None


def test_nothing_to_abort_or_finish(hosts: Pair) -> None:
    with hosts.b.client() as b:
        with pytest.raises(UsageError, match="no unfinished incoming migration"):
            b.call("POST", "/vms/api-mig/incoming/abort")
        with pytest.raises(UsageError, match="no incoming migration waiting"):
            b.call("POST", "/vms/api-mig/incoming/finish")


def test_the_psk_depends_on_the_vault_key_the_salt_and_the_vm() -> None:
    key, salt = secrets.token_bytes(32), secrets.token_bytes(SALT_SIZE)
    psk = migration_psk(key, salt, "vm-a")
    assert len(psk) == 32
    assert psk == migration_psk(key, salt, "vm-a")
    others = {
        migration_psk(secrets.token_bytes(32), salt, "vm-a"),
        migration_psk(key, secrets.token_bytes(SALT_SIZE), "vm-a"),
        migration_psk(key, salt, "vm-b"),
    }
    assert psk not in others
    assert len(others) == 3
    with pytest.raises(InvalidInputError, match="salt"):
        migration_psk(key, salt[:16], "vm-a")


def test_an_endpoint_with_a_short_salt_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="salt"):
        StreamEndpoint.from_dict({"address": "127.0.0.1", "port": 1, "salt": "AAAA"})


def test_vm_migrate_needs_the_destination_and_its_own_options(hosts: Pair) -> None:
    runner = CliRunner()
    out = runner.invoke(cli, ["vm", "migrate", "api-mig", "--config", str(hosts.a.config_file)])
    assert out.exit_code == 2
    assert "say where the destination is" in out.output
    out = runner.invoke(cli, [
        "vm", "migrate", "api-mig", "--config", str(hosts.a.config_file),
        "--to-config", str(hosts.b.config_file),
    ])  # fmt: skip
    assert out.exit_code == 2  # A refuses: the VM is not running there (nothing released)
    assert "not running" in out.output
