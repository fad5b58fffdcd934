"""Test helper (not a test module): a guarded host whose agent serves its management API.

A real host-key host, registered at the session's HGS, with its agent running
in this process (scheduler thread, Unix socket, and the management API over
HTTPS on a free 127.0.0.1 port). The agent asks the KPS to open PDKs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from guardfab.host.config import HostConfig, HostMode, save_config
from guardfab.host.keys import load_or_create_key
from guardfab.host.manage.client import ManagementClient, ManagementConnection
from guardfab.host.manage.material import ManagementFiles, init_management
from guardfab.host.service import AgentService, build_agent
from hgs_harness import free_port
from host_agent_harness import host_config, register_host_key
from vm_fabric_harness import VmFabric
from vm_harness import guest_dir


@dataclass
class ManagedHost:
    """A running agent with its management API, and how to reach it."""

    config_file: Path
    config: HostConfig
    service: AgentService
    files: ManagementFiles

    @property
    def url(self) -> str:
        """The API's base URL."""
        assert self.service.management is not None
        return self.service.management.url

    def client(self, role: str = "admin", *, token_file: Path | None = None) -> ManagementClient:
        """A client with ``role``'s token file (or ``token_file``)."""
        token = token_file or self.files.token_file(role)
        return ManagementClient(ManagementConnection(self.url, self.files.ca, token))

    def token(self, role: str) -> str:
        """``role``'s token as it is now."""
        return self.files.token_file(role).read_text().strip()


@contextmanager
def managed_host(
    root: Path, fabric: VmFabric, name: str, *, registered: bool = True
) -> Iterator[ManagedHost]:
    """A host-key host under ``root`` (registered at the HGS unless told not to)."""
    config = host_config(
        root,
        fabric.hgs,
        mode=HostMode.HOST_KEY,
        vms_dir=root / "vms",
        manage_listen=f"127.0.0.1:{free_port()}",
        # Like a host whose administrator allows direct boot of the test guest's kernel.
        direct_boot_dir=guest_dir(),
    )
    assert config.signing_key is not None
    if registered:
        register_host_key(fabric.hgs.directory, name, load_or_create_key(config.signing_key))
    files = init_management(config.management_dir, ["127.0.0.1"])
    save_config(root / "host.json", config)
    service = AgentService(build_agent(config)).start()
    try:
        yield ManagedHost(root / "host.json", config, service, files)
    finally:
        service.stop()
