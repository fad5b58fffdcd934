"""Power a provisioned VM on through the KPS, and off again.

Power-on, the reference's steps as this host does them:

1. ask the key source for the committed KP's keys: the host agent brings a valid
   health certificate (it attests first if it has none) and the KPS answers the
   current and the new transport key and an egress KP. A host that cannot
   attest, or is refused, gets no key: the VM does not start, and
   :class:`PowerOnRefusedError` says why;
2. if the KPS refuses the committed KP and a pending pair exists (a crash
   between re-key and commit, see :mod:`guardfab.hypervisor.vault`), the pending
   KP is asked next;
3. open the vault with the current key, seal it again under the new key and
   write it with the egress KP as the pending pair -- before QEMU starts, since
   the KPS will refuse the KP just sent from now on;
4. start swtpm and QEMU through the runtime (keys by pipe and QMP only);
5. commit the pending pair once QEMU runs.

:func:`start_vm` also answers the vault's contents, which the host agent keeps in
memory while the VM runs: a live migration's source derives the stream's key
from them (:mod:`guardfab.hypervisor.migrate`). :func:`rekey_running` gets them
again for a running VM whose agent lost them (it restarted): one re-keying
release, as a power-on does, without touching QEMU.

A VM directory that an unfinished incoming migration made (``incoming.json``
in it) is not started: its pair belongs to the migration (hand it back to the
source, or let the migration finish).

:func:`power_off` stops a VM started by another process (the CLI exits while
its VM runs) from the pid recorded in ``run.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from guardfab.errors import (
    GuardfabError,
    NotAuthorizedError,
    PolicyError,
    TransportError,
    UsageError,
)
from guardfab.formats import jose
from guardfab.host.keyrelease import request_release
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.hypervisor.policy import check_vm_policy
from guardfab.hypervisor.provision import KeySource, VmRecord, load_record
from guardfab.hypervisor.spec import VmSpec
from guardfab.hypervisor.vault import (
    KeyPair,
    VaultContents,
    VaultStore,
    open_vault,
    seal_vault,
)
from guardfab.hypervisor.vm import QemuVm, VmRuntime

RUN_FILE = "run.json"
#: Marks a VM directory that an incoming live migration made and has not finished.
INCOMING_FILE = "incoming.json"
STOP_TIMEOUT = 10.0

#: Makes the runtime of a VM from its spec and its state directory.
RuntimeFactory = Callable[[VmSpec, Path], VmRuntime]


class PowerOnRefusedError(NotAuthorizedError):
    """This host got no keys for the VM: it failed attestation or the KPS refused it."""


@dataclass
class DirectKeySource:
    """Ask a KPS directly with a health certificate already held (no agent)."""

    url: str
    ca: Path
    health_certificate: str
    host_key: jose.AsymmetricKey

    def release(self, kp: bytes) -> ReleasedKeys:
        """Release ``kp`` from the KPS at :attr:`url`."""
        old, new, egress = request_release(
            self.url, self.ca, self.health_certificate, kp, self.host_key
        )
        return ReleasedKeys(old, new, egress)


def _qemu_factory(spec: VmSpec, state_dir: Path) -> VmRuntime:
    return QemuVm(spec, state_dir)


class _HasKp(Protocol):
    @property
    def kp(self) -> bytes: ...


_Pair = TypeVar("_Pair", bound=_HasKp)


def release_first(
    pairs: Iterable[_Pair], key_source: KeySource
) -> tuple[_Pair, ReleasedKeys] | list[GuardfabError]:
    """The first pair, in order, whose KP the KPS releases; else every refusal, in order.

    A committed pair comes before the pending one a failed re-key or migration
    left. A transport error is raised, not counted as a refusal: the KPS said
    nothing about the next pair either.
    """
    refusals: list[GuardfabError] = []
    for pair in pairs:
        try:
            return pair, key_source.release(pair.kp)
        except TransportError:
            raise
        except GuardfabError as exc:
            refusals.append(exc)
    return refusals


def _release(store: VaultStore, key_source: KeySource, name: str) -> tuple[KeyPair, ReleasedKeys]:
    """The keys of the committed pair, or of the pending one if the committed is refused."""
    released = release_first(store.candidates(), key_source)
    if isinstance(released, tuple):
        return released
    if not released:
        raise PowerOnRefusedError(f"VM {name!r} has no key protector stored")
    first = released[0]
    raise PowerOnRefusedError(
        f"VM {name!r} cannot start on this host: no keys were released ({first})",
        hint=first.hint or "make this host attest (guardfab host attest) and check its health",
    ) from first


@dataclass(frozen=True)
class StartedVm:
    """A VM just started, and its vault's keys (kept in the agent's memory only)."""

    runtime: VmRuntime
    contents: VaultContents = field(repr=False)


def power_on(
    vm_dir: Path, key_source: KeySource, *, runtime_factory: RuntimeFactory = _qemu_factory
) -> VmRuntime:
    """Start the VM in ``vm_dir`` with keys released for this host (see :func:`start_vm`)."""
    return start_vm(vm_dir, key_source, runtime_factory=runtime_factory).runtime


def refuse_unfinished_incoming(vm_dir: Path, name: str) -> None:
    """Refuse to use a VM directory an unfinished incoming migration made.

    Raises:
        UsageError: ``incoming.json`` is there.
    """
    if (Path(vm_dir) / INCOMING_FILE).exists():
        raise UsageError(
            f"VM {name!r} is an unfinished incoming migration on this host",
            hint="finish it, or take its keys back to the source: "
            "guardfab vm migrate NAME --abort --to-config THIS-HOST",
        )


def bind_policy(
    contents: VaultContents, record: VmRecord, *, strict: bool = False
) -> VaultContents:
    """The vault's contents with the VM's security policy sealed in them (ADR 0015).

    A vault sealed before its VM's first power-on names no policy: the record's
    (which this host wrote from the verified PDK) is bound then. Afterwards a
    record whose policy differs from the vault's was changed -- loosened, say,
    on its way to a migration destination -- and is refused.

    Args:
        strict: refuse a vault that names no policy as well (a migration
            destination cannot trust a record it was handed).

    Raises:
        PolicyError: the record's policy is not the one sealed in the vault.
    """
    if contents.policy is None and not strict:
        return dataclasses.replace(contents, policy=record.policy.value)
    if contents.policy != record.policy.value:
        sealed = contents.policy or "none (sealed before its first start)"
        raise PolicyError(
            f"VM {record.name!r}: its record says policy {record.policy.value}, its vault "
            f"{sealed}: the record was changed",
            hint="the record must come unchanged from the VM's host; nothing was started",
        )
    return contents


def _seal_pending(
    store: VaultStore, record: VmRecord, contents: VaultContents, released: ReleasedKeys
) -> tuple[KeyPair, VaultContents]:
    """Write the released pair as pending (always: the KP sent is spent), then check the policy."""
    try:
        bound, refused = bind_policy(contents, record), None
    except PolicyError as exc:
        bound, refused = contents, exc
    pending = store.write_pending(
        seal_vault(bound, released.new_transport_key, vm_name=record.name), released.egress_kp
    )
    if refused is not None:
        raise refused
    return pending, bound


def start_vm(
    vm_dir: Path, key_source: KeySource, *, runtime_factory: RuntimeFactory = _qemu_factory
) -> StartedVm:
    """Start the VM in ``vm_dir`` with keys released for this host (see the module docstring).

    Raises:
        UsageError: the VM runs already, or is an unfinished incoming migration
            (nothing released).
        PolicyError: its record asks for what its policy forbids, e.g. a console
            on a shielded VM (nothing released).
        PowerOnRefusedError: this host got no keys (nothing started).
        TransportError: no KPS or agent answered (nothing started).
        VerificationError: the released key does not open the vault.
        HypervisorError: QEMU or swtpm failed (the pending pair stays for the next try).
    """
    vm_dir = Path(vm_dir)
    record = load_record(vm_dir)
    if running_pid(vm_dir) is not None:  # before the release: it would spend a KP generation
        raise UsageError(f"VM {record.name!r} is already running")
    refuse_unfinished_incoming(vm_dir, record.name)
    spec = record.spec(vm_dir)
    check_vm_policy(spec)  # before the release too: a refused spec must not spend a KP
    store = VaultStore(vm_dir / "keys")
    pair, released = _release(store, key_source, record.name)
    contents = open_vault(pair.vault, released.old_transport_key, vm_name=record.name)
    pending, contents = _seal_pending(store, record, contents, released)
    vm = runtime_factory(spec, vm_dir / "state")
    vm.start(contents.vm_keys())
    store.commit(pending.number, replaces=pair.number)
    _record_run(vm_dir, vm)
    return StartedVm(vm, contents)


def rekey_running(vm_dir: Path, key_source: KeySource) -> VaultContents:
    """The running VM's vault contents, through one re-keying release (QEMU untouched).

    For an agent that restarted while its VM ran, so lost the keys it held:
    release (the committed KP, else a pending one), open, seal again under the
    new key with the egress KP, commit -- the store moves on one generation
    exactly as at a power-on, and the running VM is unaffected.

    Raises:
        UsageError: the VM does not run here.
        PowerOnRefusedError: this host got no keys (nothing written).
    """
    vm_dir = Path(vm_dir)
    record = load_record(vm_dir)
    if running_pid(vm_dir) is None:
        raise UsageError(f"VM {record.name!r} is not running on this host")
    store = VaultStore(vm_dir / "keys")
    pair, released = _release(store, key_source, record.name)
    contents = open_vault(pair.vault, released.old_transport_key, vm_name=record.name)
    pending, contents = _seal_pending(store, record, contents, released)
    store.commit(pending.number, replaces=pair.number)
    return contents


def _record_run(vm_dir: Path, vm: VmRuntime) -> None:
    pid = getattr(vm, "pid", None)
    paths = getattr(vm, "paths", None)
    info = {"pid": pid, "run_dir": str(paths.run_dir) if paths is not None else None}
    path = vm_dir / RUN_FILE
    path.write_text(json.dumps(info) + "\n", encoding="utf-8")
    path.chmod(0o600)


def _run_info(vm_dir: Path) -> tuple[int | None, Path | None]:
    try:
        info = json.loads((vm_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None, None
    pid, run_dir = info.get("pid"), info.get("run_dir")
    return (pid if isinstance(pid, int) else None), (Path(run_dir) if run_dir else None)


def run_directory(vm_dir: Path) -> Path | None:
    """The sockets' directory of the VM in ``vm_dir`` while it runs (else ``None``)."""
    if running_pid(vm_dir) is None:
        return None
    return _run_info(Path(vm_dir))[1]


def running_pid(vm_dir: Path) -> int | None:
    """QEMU's pid if the VM in ``vm_dir`` runs (the pid is still that VM's QEMU)."""
    pid, run_dir = _run_info(Path(vm_dir))
    if pid is None or run_dir is None:
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if str(run_dir).encode() in cmdline else None


def power_off(vm_dir: Path) -> bool:
    """Stop the VM in ``vm_dir`` (SIGTERM to QEMU's process group, then SIGKILL).

    swtpm exits with its QEMU. Returns whether a running VM was stopped.
    """
    vm_dir = Path(vm_dir)
    pid = running_pid(vm_dir)
    _, run_dir = _run_info(vm_dir)
    if pid is not None:
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while running_pid(vm_dir) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if running_pid(vm_dir) is not None:
            _signal_group(pid, signal.SIGKILL)
    (vm_dir / RUN_FILE).unlink(missing_ok=True)
    if run_dir is not None:
        shutil.rmtree(run_dir, ignore_errors=True)
    return pid is not None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


__all__ = [
    "INCOMING_FILE",
    "DirectKeySource",
    "PowerOnRefusedError",
    "RuntimeFactory",
    "StartedVm",
    "bind_policy",
    "power_off",
    "power_on",
    "refuse_unfinished_incoming",
    "rekey_running",
    "run_directory",
    "running_pid",
    "start_vm",
]
