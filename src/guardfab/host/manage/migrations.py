"""Both halves of a live migration as operations of one agent (ADR 0015).

The fabric administrator's CLI drives two agents, each through its own API and
its own admin token (:mod:`.orchestrate`); an agent never calls another. This
agent is the *source* of VMs it runs (offer, send, leave, take back) and the
*destination* of VMs it receives (receive, finish, forward, abort). What it
answers is public or sealed: the offer, the stream's endpoint, a sealed pair.

An incoming migration that nobody finishes or aborts is not left waiting: after
:data:`INCOMING_TIMEOUT` seconds the agent finishes it itself if the whole
stream arrived (the source gave its disks away and waits paused: the guest is
better off running here), else abandons it (QEMU stopped, the directory and its
pair kept for the hand-back).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guardfab.errors import UsageError
from guardfab.hypervisor.errors import HypervisorError
from guardfab.hypervisor.incoming import IncomingVm, hand_back, receive
from guardfab.hypervisor.migrate import (
    PAUSED_AFTER_STREAM,
    MigrationOffer,
    SealedPair,
    StreamEndpoint,
    TakenBack,
    attach,
    leave_source,
    make_offer,
    newest_generation,
    resume_source,
    send_stream,
    take_back,
)
from guardfab.hypervisor.migration import MIGRATION_TIMEOUT
from guardfab.hypervisor.power import rekey_running, running_pid
from guardfab.hypervisor.vm import QemuVm

if TYPE_CHECKING:
    from guardfab.host.manage.operations import VmOperations

logger = logging.getLogger(__name__)

#: Seconds an incoming migration may wait for its stream and its finish.
INCOMING_TIMEOUT = 600.0
#: Seconds ``finish`` waits for a stream still arriving.
FINISH_TIMEOUT = 60.0


def free_port(address: str) -> int:
    """A TCP port free right now on ``address`` (for the destination to listen on)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as probe:
        probe.bind((address, 0))
        port: int = probe.getsockname()[1]
        return port


class VmMigrations:
    """The migration operations of one agent, sharing its locks and held keys."""

    def __init__(self, vms: VmOperations, stream_address: str) -> None:
        self._vms = vms
        self._address = stream_address
        self._incoming: dict[str, IncomingVm] = {}
        #: Per VM, the newest KP generation it held when this agent sent its stream.
        self._sent: dict[str, int] = {}
        self._timers: dict[str, threading.Timer] = {}

    # ------------------------------------------------------------ source

    def offer(self, name: str) -> dict[str, Any]:
        """The running VM's offer; its vault contents got again first if this agent lost them."""
        with self._vms.vm(name) as vm_dir:
            self._vms.record(vm_dir)
            if running_pid(vm_dir) is None:
                raise UsageError(f"VM {name!r} is not running on this host")
            if name not in self._vms.held:
                # The agent restarted since it started the VM: one re-keying release.
                self._vms.held[name] = rekey_running(vm_dir, self._vms.keys)
            return make_offer(vm_dir).to_dict()

    def send(self, name: str, endpoint: StreamEndpoint) -> dict[str, Any]:
        """Send the VM's state to the destination's endpoint (TLS-PSK)."""
        with self._vms.vm(name) as vm_dir:
            self._vms.record(vm_dir)
            contents = self._vms.held.get(name)
            if contents is None:
                raise UsageError(f"VM {name!r}: no migration offered (offer it first)")
            # What this host knew to be current when the stream went: only a
            # hand-back newer than that comes from this stream's destination.
            self._sent[name] = newest_generation(vm_dir)
            source = attach(vm_dir)
            try:
                stats = send_stream(source, contents, endpoint)
            finally:
                let_go(source)
            return {
                "name": name,
                "total_time_ms": stats.total_time_ms,
                "downtime_ms": stats.downtime_ms,
                "transferred_bytes": stats.transferred_bytes,
            }

    def leave(self, name: str) -> dict[str, Any]:
        """The destination runs the guest: stop here and remove this host's files of it."""
        with self._vms.vm(name) as vm_dir:
            self._vms.record(vm_dir)
            source = attach(vm_dir)
            try:
                leave_source(source, vm_dir)
            finally:
                let_go(source)
            self._vms.held.pop(name, None)
            self._sent.pop(name, None)
            return {"name": name, "left": True}

    def take_back(self, name: str, pair: SealedPair) -> dict[str, Any]:
        """Keep the destination's pair as pending; run the VM again if it waits paused.

        A paused source runs again only for the hand-back of the stream this
        agent sent last: a pair it had not held before, newer than the newest
        KP it offered, and only once. A replayed older hand-back (equal to the
        pending pair, after a later stream went) must not wake a source whose
        guest may run at the destination now: two guests on the same disks.
        """
        with self._vms.vm(name) as vm_dir:
            self._vms.record(vm_dir)
            taken = take_back(vm_dir, pair)
            resumed = False
            if running_pid(vm_dir) is not None:
                resumed = self._resume_if_handed_back(name, vm_dir, taken)
            return {"name": name, "pending_pair": taken.number, "resumed": resumed}

    def _resume_if_handed_back(self, name: str, vm_dir: Path, taken: TakenBack) -> bool:
        source = attach(vm_dir)
        try:
            if source.status() not in PAUSED_AFTER_STREAM:
                return False  # it runs (a retry after a resume, or no stream went)
            sent = self._sent.get(name)
            if not taken.new or sent is None or taken.generation <= sent:
                kept = f"kept as pending pair {taken.number}; " if taken.new else ""
                raise UsageError(
                    f"VM {name!r} waits paused after a stream, and this key pair is not the "
                    f"hand-back of that stream: {kept}not resuming the VM (the destination "
                    "may run it)",
                    hint="if the destination does not run the VM, stop it here and start it "
                    "again (power-on uses the pending pair)",
                )
            if name not in self._vms.held:
                self._vms.held[name] = rekey_running(vm_dir, self._vms.keys)
            resumed = resume_source(source, self._vms.held[name].disks)
            self._sent.pop(name, None)  # one resume per stream
            return resumed
        finally:
            let_go(source)

    # ------------------------------------------------------------ destination

    def receive(self, name: str, offer: MigrationOffer, port: int | None) -> dict[str, Any]:
        """Release with this host's certificate, lay out, start QEMU and listen."""
        if offer.name != name:
            raise UsageError(f"the offer is for VM {offer.name!r}, not {name!r}")
        with self._vms.vm(name):
            if name in self._incoming:
                raise UsageError(f"VM {name!r} is being received already")
            incoming = receive(
                offer,
                self._vms.vms_dir,
                self._vms.keys,
                address=self._address,
                port=port if port is not None else free_port(self._address),
                direct_boot_dir=self._vms.direct_boot_dir,
            )
            self._incoming[name] = incoming
        timer = threading.Timer(INCOMING_TIMEOUT, self._expire, args=(name, incoming))
        timer.daemon = True
        self._timers[name] = timer
        timer.start()
        return {"name": name, **incoming.endpoint.to_dict()}

    def finish(self, name: str) -> dict[str, Any]:
        """The stream arrived: run the guest here and make the VM this host's."""
        with self._vms.vm(name):
            incoming = self._incoming.get(name)
            if incoming is None:
                raise UsageError(f"VM {name!r}: no incoming migration waiting on this host")
            incoming.finish(min(FINISH_TIMEOUT, MIGRATION_TIMEOUT))
            self._done(name, incoming)
            return {"name": name, "pid": incoming.vm.pid, "destination": str(incoming.vm_dir)}

    def forward(self, name: str) -> dict[str, Any]:
        """Open the VM's host port here (once the source has let it go)."""
        with self._vms.vm(name) as vm_dir:
            self._vms.record(vm_dir)
            vm = attach(vm_dir)
            try:
                vm.forward_host_port()
            finally:
                let_go(vm)
            return {"name": name, "forwarded": vm.spec.host_port}

    def abort(self, name: str) -> dict[str, Any]:
        """Stop an unfinished incoming migration; answer its pair, for the source to take back."""
        with self._vms.vm(name) as vm_dir:
            incoming = self._incoming.pop(name, None)
            self._stop_timer(name)
            if incoming is not None:
                incoming.abandon()
            return {"name": name, **hand_back(vm_dir).to_dict()}

    def _stop_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None and timer is not threading.current_thread():
            timer.cancel()

    def _done(self, name: str, incoming: IncomingVm) -> None:
        self._incoming.pop(name, None)
        self._stop_timer(name)
        self._vms.held[name] = incoming.contents
        let_go(incoming.vm)

    def _expire(self, name: str, incoming: IncomingVm) -> None:
        """Nobody finished or aborted in time: finish if the stream arrived, else abandon."""
        with self._vms.vm(name):
            if self._incoming.get(name) is not incoming:
                return  # finished or aborted meanwhile
            try:
                if incoming.landed():
                    incoming.finish(FINISH_TIMEOUT)
                    self._done(name, incoming)
                    logger.warning("incoming migration of VM %s finished by its timeout", name)
                    return
            except HypervisorError:
                logger.exception("incoming migration of VM %s could not finish", name)
            self._incoming.pop(name, None)
            self._stop_timer(name)
            incoming.abandon()
            logger.warning(
                "incoming migration of VM %s abandoned after %.0f s: its key pair waits "
                "for 'guardfab vm migrate %s --abort'",
                name,
                INCOMING_TIMEOUT,
                name,
            )


def let_go(runtime: object) -> None:
    """Close this process's QMP session to a VM that runs on without it.

    QEMU's QMP socket serves one client at a time: a session the agent kept open
    after a start, or after a refused migration, would make the next operation on
    the VM (a migration, a checkpoint) wait in vain for QEMU's greeting. The VM
    keeps running.
    """
    if isinstance(runtime, QemuVm):
        with contextlib.suppress(HypervisorError):
            runtime.qmp.close()


__all__ = ["FINISH_TIMEOUT", "INCOMING_TIMEOUT", "VmMigrations", "free_port", "let_go"]
