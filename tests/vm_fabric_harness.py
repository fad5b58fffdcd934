"""Test helper (not a test module): a real HGS with its KPS, a guarded host, tenants and templates.

One HGS (``guardfab hgs serve`` over HTTPS) per session, with host-key mode on;
a host-key host registered and attested for real; a publisher who signs
template disks (the test guest's disks that boot through the signed chain:
:meth:`vm_harness.Guest.template`); tenants who make a PDK and a KP for the
fabric's KPS guardian.
``reveal_secrets`` opens a PDK with the KPS guardian's private keys, as the KPS
does for an attested host (tests of the hypervisor layer without an agent).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from joserfc.jwk import ECKey

from guardfab.attestation.trust import AttestationMode
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.formats.key_protector import create_key_protector
from guardfab.formats.shielding_data import SecurityPolicy, ShieldingData, create_shielding_data
from guardfab.formats.shielding_secrets import (
    AdminCredentials,
    AnswerFile,
    AnswerFileKind,
    ShieldingSecrets,
)
from guardfab.formats.template import DiskVersion, PublisherKey, VersionRule, VolumeIdQualifier
from guardfab.hgs.kps_keys import KpsKeyDirectory
from guardfab.hypervisor.power import DirectKeySource
from guardfab.hypervisor.provision import ProvisionRequest
from guardfab.tenant.guardians import GuardianKeys, new_guardian_keys
from guardfab.tenant.template import protect_disk
from hgs_harness import RunningHgs, start_hgs
from test_kps_fixtures import Host, attested_host, enable_modes, kps_document, minted_certificate
from vm_harness import Guest, built_guest

TEMPLATE_NAME = "guardfab-guest"
TEMPLATE_VERSION = DiskVersion(1, 0, 0, 0)


@dataclass
class TenantVm:
    """One tenant's VM as the tenant knows it: its template, PDK, KP and secrets."""

    name: str
    template: Path
    template_sig: bytes
    pdk: bytes
    kp: bytes
    marker: str
    hostname: str
    password: str
    file_content: bytes
    answer_file: bytes

    def request(self, **changes: object) -> ProvisionRequest:
        """The fabric administrator's provisioning request."""
        fields: dict[str, object] = {
            "name": self.name,
            "template_disk": self.template,
            "template_sig": self.template_sig,
            "pdk": self.pdk,
            "kp": self.kp,
            **changes,
        }
        return ProvisionRequest(**fields)  # type: ignore[arg-type]

    def needles(self) -> dict[str, bytes]:
        """What must never be found in clear in the host's files."""
        return {
            "template marker": self.marker.encode(),
            "answer file": self.answer_file,
            "admin password": self.password.encode(),
            "served file": self.file_content,
        }


@dataclass
class VmFabric:
    """The HGS, its KPS guardian, one attested host, the test guest and a template publisher."""

    root: Path
    hgs: RunningHgs
    kps: GuardianKeys
    host: Host
    certificate: str
    guest: Guest
    publisher: ECKey = field(default_factory=lambda: ECKey.generate_key("P-256"))

    def key_source(self, certificate: str | None = None) -> DirectKeySource:
        """The attested host asking the KPS with its certificate (or ``certificate``)."""
        return DirectKeySource(
            self.hgs.url,
            Path(self.hgs.ca),
            self.certificate if certificate is None else certificate,
            self.host.encryption,
        )

    def other_host(self, host_id: str) -> DirectKeySource:
        """Another guarded host, registered and attested for real, with its own key."""
        host, certificate = attested_host(self.hgs, host_id)
        return DirectKeySource(self.hgs.url, Path(self.hgs.ca), certificate, host.encryption)

    def unattested_host(self, host_id: str) -> DirectKeySource:
        """A registered host whose only health certificate expired an hour ago."""
        host = Host(host_id)
        host.register(self.hgs)
        expired = minted_certificate(self.hgs, host, issued=time.time() - 7200, lifetime=3600)
        return DirectKeySource(self.hgs.url, Path(self.hgs.ca), expired, host.encryption)

    def reveal_secrets(self, pdk: ShieldingData) -> ShieldingSecrets:
        """Open a PDK as the KPS (a guardian of the PDK) would."""
        return pdk.reveal(self.kps)

    def template(self, marker: str, *, kernel: Path | None = None) -> tuple[Path, bytes]:
        """A template disk holding ``marker``, signed by the publisher.

        ``kernel`` replaces the guest's signed kernel on the disk: the publisher
        signs whatever it is given, so provisioning accepts such a disk.
        """
        path = self.root / f"template-{secrets.token_hex(4)}.img"
        self.guest.template(path, marker, kernel=kernel)
        _, signature = protect_disk(
            path, self.publisher, name=TEMPLATE_NAME, version=TEMPLATE_VERSION
        )
        return path, signature

    def qualifier(self) -> VolumeIdQualifier:
        """The qualifier a tenant puts in its PDK to admit the publisher's template."""
        return VolumeIdQualifier(
            PublisherKey.from_key(self.publisher),
            TEMPLATE_NAME,
            TEMPLATE_VERSION,
            VersionRule.EQUALS,
        )

    def tenant_vm(
        self,
        name: str,
        *,
        fabric_document: bytes | None = None,
        policy: SecurityPolicy = SecurityPolicy.SHIELDED,
    ) -> TenantVm:
        """A new tenant with a template, a PDK and a KP for this fabric (or another's)."""
        owner = new_guardian_keys("owner", KeyAlgorithm.EC_P256)
        document = fabric_document if fabric_document is not None else kps_document(self.hgs)
        marker = f"guardfab-marker-{secrets.token_hex(8)}"
        hostname = f"{name}-{secrets.token_hex(3)}"
        password = f"pw-{secrets.token_hex(12)}"
        content = f"tenant-secret-{secrets.token_hex(12)}".encode()
        answer = f"#cloud-config\nhostname: {hostname}\n# {secrets.token_hex(8)}\n".encode()
        pdk_secrets = ShieldingSecrets(
            admin=AdminCredentials("root", password),
            answer_file=AnswerFile(AnswerFileKind.CLOUD_INIT, answer),
            files={"tenant.txt": content},
        )
        pdk = create_shielding_data(
            owner,
            [document],
            policy=policy,
            secrets=pdk_secrets,
            qualifiers=[self.qualifier()],
            name=name,
            created_at=int(time.time()),
        )
        kp, _ = create_key_protector(owner, [document])
        template, signature = self.template(marker)
        return TenantVm(
            name, template, signature, pdk, kp, marker, hostname, password, content, answer
        )


@pytest.fixture(scope="session")
def vm_fabric(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmFabric]:
    """The session's fabric (one per xdist worker); the HGS stops at the end."""
    root = tmp_path_factory.mktemp("vmfabric")
    hgs = start_hgs(root / "hgs")
    try:
        enable_modes(hgs, AttestationMode.HOST_KEY)
        host, certificate = attested_host(hgs, "host-a")
        kps = KpsKeyDirectory.of_state(hgs.directory).load_all()[0].keys
        yield VmFabric(root, hgs, kps, host, certificate, built_guest())
    finally:
        hgs.stop()
