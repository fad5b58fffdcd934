"""Wiring of the guarded-host agent as a service: keys, attester, socket, API, signals, systemd.

``guardfab host agent`` and the systemd unit run :func:`run_foreground`. Start-up
order matters to the hypervisor layer: the previous state is recovered and the
socket is listening before systemd hears ``READY=1``, so a key request right
after start either uses the cached certificate or attests on demand.

When the host's management directory is initialized (``guardfab host manage
init``), the agent also serves the
management API (:mod:`guardfab.host.manage`) over HTTPS in a thread, with
itself as the VMs' key source; it stops with the agent.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
from types import FrameType

from guardfab.host.agent import Clock, GuardedHostAgent
from guardfab.host.attester import load_host_key, make_attester
from guardfab.host.config import HostConfig
from guardfab.host.keyrequest import KeyReleaser, KpsKeyReleaser
from guardfab.host.localapi import LocalApiServer
from guardfab.host.manage.running import Management

logger = logging.getLogger(__name__)


def build_agent(
    config: HostConfig,
    *,
    releaser: KeyReleaser | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> GuardedHostAgent:
    """An agent for ``config``: its keys loaded, the attester of its mode.

    Raises:
        UsageError, FormatError: a host key is missing or unreadable.
    """
    key = load_host_key(config.encryption_key, "host encryption key")
    return GuardedHostAgent(
        config,
        make_attester(config, key),
        releaser or KpsKeyReleaser(),
        key,
        clock=clock,
        rng=rng,
    )


class AgentService:
    """An agent with its scheduler thread, its local socket and its management API."""

    def __init__(self, agent: GuardedHostAgent) -> None:
        self.agent = agent
        self._server: LocalApiServer | None = None
        self._scheduler: threading.Thread | None = None
        self.management: Management | None = None

    def start(self, *, scheduler_thread: bool = True) -> AgentService:
        """Recover the previous state, listen on the socket, start the scheduler.

        With ``scheduler_thread`` false the caller runs :meth:`GuardedHostAgent.run`.
        """
        config = self.agent.config
        self.agent.recover()
        self._server = LocalApiServer(
            config.socket, self.agent, allowed_uid=config.allowed_uid
        ).start()
        try:
            self.management = Management.start_if_ready(self.agent)
        except BaseException:
            self._server.close()
            raise
        if scheduler_thread:
            self._scheduler = threading.Thread(target=self.agent.run, name="scheduler", daemon=True)
            self._scheduler.start()
        return self

    def stop(self) -> None:
        """Stop the scheduler, the management API and the socket (its file is removed)."""
        self.agent.stop()
        if self._scheduler is not None:
            self._scheduler.join()
            self._scheduler = None
        if self.management is not None:
            self.management.stop()
            self.management = None
        if self._server is not None:
            self._server.close()
            self._server = None


def sd_notify(message: str) -> None:
    """Tell systemd about our state (Type=notify); a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        logger.warning("cannot notify systemd: %s", exc)


def run_foreground(config: HostConfig) -> None:
    """Run the agent until SIGTERM or SIGINT (the systemd unit's ExecStart)."""
    service = AgentService(build_agent(config)).start(scheduler_thread=False)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logger.info("signal %d: stopping", signum)
        service.agent.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    logger.info("agent listening on %s (mode %s)", config.socket, config.mode.value)
    sd_notify("READY=1")
    try:
        service.agent.run()
    finally:
        sd_notify("STOPPING=1")
        service.stop()
