"""The VM's security policy sealed in its vault, and the check of a record against it (pure).

A migration destination gets the VM record from the administrator's hands; the
vault, which only a release opens, is the authority on the VM's policy
(ADR 0015). End to end (a loosened record refused at a real destination):
tests/test_vm_migrate.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from guardfab.errors import FormatError, PolicyError
from guardfab.formats.key_protector import TransportKey
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.hypervisor.power import bind_policy
from guardfab.hypervisor.provision import VmRecord
from guardfab.hypervisor.vault import VaultContents, open_vault, seal_vault

RECORD = VmRecord(
    name="vm1",
    policy=SecurityPolicy.SHIELDED,
    pdk_id="pdk",
    template="t.img",
    host_port=None,
    memory_mib=256,
    created_at=0,
)


def test_a_vault_without_a_policy_still_opens_and_binds_at_first_start() -> None:
    contents = VaultContents.generate(["os"])
    assert b"policy" not in contents.to_bytes(), "vaults sealed before stay byte for byte"
    bound = bind_policy(contents, RECORD)
    assert bound.policy == "shielded"
    key = TransportKey(bytes(range(32)))
    reopened = open_vault(seal_vault(bound, key, vm_name="vm1"), key, vm_name="vm1")
    assert reopened.policy == "shielded"
    assert reopened.vtpm_migration == contents.vtpm_migration


def test_a_record_whose_policy_differs_from_the_vaults_is_refused() -> None:
    bound = bind_policy(VaultContents.generate(["os"]), RECORD)
    loosened = dataclasses.replace(RECORD, policy=SecurityPolicy.ENCRYPTION_SUPPORTED)
    with pytest.raises(PolicyError, match="record was changed"):
        bind_policy(bound, loosened)
    assert bind_policy(bound, RECORD) is bound


def test_a_destination_refuses_a_vault_that_names_no_policy() -> None:
    with pytest.raises(PolicyError, match="sealed before its first start"):
        bind_policy(VaultContents.generate(["os"]), RECORD, strict=True)


@pytest.mark.parametrize("policy", ["", "Shielded", "x" * 40, 7])
def test_a_bad_policy_in_a_vault_is_a_format_error(policy: object) -> None:
    body = json.loads(VaultContents.generate(["os"]).to_bytes())
    body["policy"] = policy
    with pytest.raises(FormatError):
        VaultContents.from_bytes(json.dumps(body).encode())
