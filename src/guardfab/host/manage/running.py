"""The management API as a part of a running agent: audit store, operations, server."""

from __future__ import annotations

import logging

from guardfab.host.agent import GuardedHostAgent
from guardfab.host.config import check_listen
from guardfab.host.manage.api import ManagementContext, create_app
from guardfab.host.manage.audit import ManagementAudit
from guardfab.host.manage.material import ManagementFiles
from guardfab.host.manage.operations import VmOperations
from guardfab.host.manage.server import ManagementServer

logger = logging.getLogger(__name__)


class Management:
    """The started API of one agent; :meth:`stop` ends it and closes its audit store."""

    def __init__(self, context: ManagementContext, server: ManagementServer) -> None:
        self.context = context
        self.server = server

    @classmethod
    def start_if_ready(cls, agent: GuardedHostAgent) -> Management | None:
        """Serve the API if the host's management directory exists; ``None`` otherwise."""
        config = agent.config
        files = ManagementFiles(config.management_dir)
        if not files.ready():
            logger.warning(
                "management API off: %s is not initialized ('guardfab host manage init')",
                files.dir,
            )
            return None
        audit = ManagementAudit(files.audit_db)
        # A migration destination listens where the API does (reachable from the CLI's side).
        address, _ = check_listen(config.manage_listen)
        vms = VmOperations(
            config.vms_dir,
            agent,
            agent.open_shielding_data,
            stream_address=address,
            direct_boot_dir=config.direct_boot_dir,
        )
        context = ManagementContext(files, audit, vms)
        try:
            server = ManagementServer(create_app(context), config.manage_listen, files).start()
        except BaseException:
            audit.close()
            raise
        logger.info("management API listening on %s", server.url)
        return cls(context, server)

    @property
    def url(self) -> str:
        """The API's base URL on this machine."""
        return self.server.url

    def stop(self) -> None:
        """Stop serving, then close the audit store."""
        self.server.stop()
        self.context.audit.close()
