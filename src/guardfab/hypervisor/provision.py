"""Provision a shielded VM from a signed template disk, its shielding data (PDK) and its KP.

Order matters. Every check comes before anything that outlives a refusal is
written: the one thing written earlier is a private copy of the template, in a
0700 temporary directory beside the VM that any failure removes whole.

1. the PDK's owner signature is verified (:func:`load_shielding_data`); the
   template disk is copied once (not through a symlink, a regular file only)
   into the private directory, and *that copy* is checked against the PDK's
   volume ID qualifiers: the signature file must satisfy one qualifier
   (publisher, name, version) and the copy must be byte for byte what that
   publisher signed. A mismatch fails with every qualifier's reason;
2. the KP must carry exactly the PDK's guardians (``kp_guardians``), and the
   VM it would make must pass its security policy: a shielded VM boots its own
   disk through the signed chain, so a request with a direct kernel is refused
   (:mod:`guardfab.hypervisor.policy`, rule ``firmware-boot``); then a direct
   kernel/initrd of another VM must lie in the host's ``direct_boot_dir``
   (:mod:`guardfab.hypervisor.bootpaths`);
3. the PDK's secrets are revealed by ``reveal_secrets`` -- a guardian's job, not
   the host's: the host agent passes its ``open_shielding_data``, which has the
   KPS (a guardian the PDK names) open the PDK for this host's health certificate
   and answer the secrets sealed to the host key (ADR 0010). A PDK for another
   fabric fails here, before anything exists;
4. in the private directory: the OS disk (a LUKS copy of the verified template
   copy) and the specialization disk (the answer file, built in memory and
   written through a memfd, LUKS-encrypted) under fresh random keys;
5. the KP is released (``key_source``: the host agent, which brings a valid
   health certificate); the vault goes under the *new* transport key with the
   egress KP, committed at once (no QEMU to wait for);
6. the template copy is removed and the directory renamed into place. Any
   failure removes the directory: nothing is left.

The template is read once from where the administrator named it: verification
and conversion both read the private copy, so whoever can write the template's
location cannot swap it between the check and the copy (security review, issue 6).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from guardfab.errors import FormatError, NotAuthorizedError, UsageError, VerificationError
from guardfab.files import atomic_write
from guardfab.formats.encoding import require_dict, require_int, require_str
from guardfab.formats.key_protector import load_key_protector
from guardfab.formats.shielding_data import SecurityPolicy, ShieldingData, load_shielding_data
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.formats.template import VerifiedDiskSignature, VolumeIdQualifier
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.hypervisor.bootpaths import check_direct_boot
from guardfab.hypervisor.disk import (
    copy_template_privately,
    create_encrypted_copy,
    create_encrypted_from_bytes,
)
from guardfab.hypervisor.policy import check_vm_policy
from guardfab.hypervisor.spec import (
    DEFAULT_MEMORY_MIB,
    DebugDevices,
    DirectKernel,
    DiskSpec,
    SecurityLevel,
    VmSpec,
)
from guardfab.hypervisor.specialize import AnswerFile
from guardfab.hypervisor.vault import VaultContents, VaultStore, seal_vault
from guardfab.tenant.template import verify_disk

RECORD_FILE = "vm.json"
#: The private copy of the template disk, verified and converted, then removed.
TEMPLATE_COPY = "template.raw"
RECORD_TYPE = "guardfab.vm"
DISK_IDS = ("os", "spec")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_HOSTNAME_LINE = re.compile(r"^(?:hostname|local-hostname):\s*([A-Za-z0-9-]{1,63})\s*$", re.M)
_LEVELS = {
    SecurityPolicy.SHIELDED: SecurityLevel.SHIELDED,
    SecurityPolicy.ENCRYPTION_SUPPORTED: SecurityLevel.ENCRYPTION_SUPPORTED,
}

#: Passed as ``direct_boot_dir`` by a caller that is root on this host itself
#: (its own scripts, tests): any kernel path it names is its own choice. The
#: management API never passes it: it passes the configured directory or ``None``.
LOCAL_ROOT_BOOT = Path("/")

#: Opens a PDK's secrets: in the reference, the KPS as a guardian of the PDK.
RevealSecrets = Callable[[ShieldingData], ShieldingSecrets]


class KeySource(Protocol):
    """Releases a VM's keys for its KP (the host agent's local API, or a KPS directly)."""

    def release(self, kp: bytes) -> ReleasedKeys:
        """Old and new transport keys and the egress KP; raises if the host is refused."""
        ...


@dataclass(frozen=True)
class VmRecord:
    """What the host keeps about a VM in ``vm.json``: public, no secret in it."""

    name: str
    policy: SecurityPolicy
    pdk_id: str
    template: str
    host_port: int | None
    memory_mib: int
    created_at: int
    boot: DirectKernel | None = None
    #: A serial console on a Unix socket (encryption-supported VMs only; see
    #: :mod:`guardfab.hypervisor.settings`). Off unless a fabric administrator turns it on.
    console: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        boot = self.boot
        return {
            "type": RECORD_TYPE,
            "name": self.name,
            "policy": self.policy.value,
            "pdk_id": self.pdk_id,
            "template": self.template,
            "host_port": self.host_port,
            "memory_mib": self.memory_mib,
            "created_at": self.created_at,
            "boot": None
            if boot is None
            else {"kernel": str(boot.kernel), "initrd": str(boot.initrd), "cmdline": boot.cmdline},
            "console": self.console,
        }

    @classmethod
    def from_dict(cls, value: Any) -> VmRecord:
        """Load the JSON form."""
        obj = require_dict(value, what="VM record")
        boot = obj.get("boot")
        port = obj.get("host_port")
        console = obj.get("console", False)  # records written before the setting existed
        if not isinstance(console, bool):
            raise FormatError("VM record: 'console' must be true or false")
        return cls(
            name=require_str(obj, "name", what="VM record"),
            policy=SecurityPolicy(require_str(obj, "policy", what="VM record")),
            pdk_id=require_str(obj, "pdk_id", what="VM record"),
            template=require_str(obj, "template", what="VM record"),
            host_port=port if isinstance(port, int) else None,
            memory_mib=require_int(obj, "memory_mib", what="VM record"),
            created_at=require_int(obj, "created_at", what="VM record"),
            boot=None
            if boot is None
            else DirectKernel(Path(boot["kernel"]), Path(boot["initrd"]), str(boot["cmdline"])),
            console=console,
        )

    def spec(self, vm_dir: Path) -> VmSpec:
        """The runtime's spec of this VM in ``vm_dir``.

        The console setting passes through as recorded: for a shielded VM the
        policy check refuses it (:mod:`guardfab.hypervisor.policy`), so a
        ``vm.json`` edited by hand to ask for one makes the VM refuse to start
        rather than start open.
        """
        return VmSpec(
            name=self.name,
            level=_LEVELS[self.policy],
            memory_mib=self.memory_mib,
            kernel=_with_serial_console(self.boot) if self.console else self.boot,
            disks=tuple(DiskSpec(d, vm_dir / "disks" / f"{d}.qcow2") for d in DISK_IDS),
            host_port=self.host_port,
            debug=DebugDevices(console=self.console),
        )


def _with_serial_console(boot: DirectKernel | None) -> DirectKernel | None:
    """A directly booted kernel writes to the serial port only if told (``console=ttyS0``).

    A firmware-booted guest chooses its console itself (its own boot loader's settings).
    """
    if boot is None or "console=" in boot.cmdline:
        return boot
    return replace(boot, cmdline=f"{boot.cmdline} console=ttyS0".strip())


def write_record(vm_dir: Path, record: VmRecord) -> None:
    """Write ``vm.json`` atomically (temp file, fsync, rename), 0600: never half written."""
    data = (json.dumps(record.to_dict(), indent=2) + "\n").encode("utf-8")
    atomic_write(Path(vm_dir) / RECORD_FILE, data, mode=0o600, overwrite=True)


def load_record(vm_dir: Path) -> VmRecord:
    """Read ``vm.json`` of the VM in ``vm_dir``."""
    try:
        text = (Path(vm_dir) / RECORD_FILE).read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UsageError(f"{vm_dir} is not a VM directory (no {RECORD_FILE})") from exc
    return VmRecord.from_dict(json.loads(text))


def check_template(
    disk: Path, signature: bytes, qualifiers: tuple[VolumeIdQualifier, ...]
) -> VerifiedDiskSignature:
    """The disk's signature satisfies one qualifier and the disk is what was signed.

    Raises:
        NotAuthorizedError: no qualifier admits the signature (every reason listed).
        VerificationError: the disk's content is not what the publisher signed.
    """
    if not qualifiers:
        raise NotAuthorizedError(
            "the shielding data admits no template disk (no volume ID qualifier)"
        )
    reasons = []
    for qualifier in qualifiers:
        try:
            qualifier.verify(signature)
        except (FormatError, VerificationError, NotAuthorizedError) as exc:
            reasons.append(f"{qualifier.name}: {exc}")
            continue
        return verify_disk(disk, signature, qualifier.publisher)
    raise NotAuthorizedError(
        "template disk refused by every volume ID qualifier of the shielding data: "
        + "; ".join(reasons),
        hint="provision from a template the VM's owner admits in its shielding data",
    )


def hash_password(password: str) -> str:
    """A SHA-512 crypt(3) hash (``openssl passwd -6``); the password goes on stdin only."""
    result = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],  # noqa: S607
        input=password.encode() + b"\n",
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        raise UsageError("openssl passwd failed to hash the administrator password")
    return result.stdout.decode().strip()


def guest_answer_file(secrets: ShieldingSecrets, *, default_hostname: str) -> AnswerFile:
    """The test guest's answer file from a PDK's secrets.

    The hostname comes from a cloud-init answer file's ``hostname:`` line; root's
    password hash from the administrator credentials; the guest serves the first
    of the PDK's other files.
    """
    hostname = default_hostname
    if secrets.answer_file is not None:
        found = _HOSTNAME_LINE.search(secrets.answer_file.content.decode("utf-8", "replace"))
        hostname = found.group(1) if found else hostname
    name, content = next(iter(secrets.files.items()), (None, b""))
    return AnswerFile(
        hostname=hostname,
        admin_password_hash=hash_password(secrets.admin.password),
        file_name=name,
        file_content=content,
    )


@dataclass(frozen=True)
class ProvisionRequest:
    """What a fabric administrator hands in for a new VM (files already read).

    ``boot`` (a kernel QEMU loads itself) is for encryption-supported VMs and
    tests only; a shielded VM boots its template disk through the firmware.
    """

    name: str
    template_disk: Path
    template_sig: bytes
    pdk: bytes
    kp: bytes
    boot: DirectKernel | None = None
    host_port: int | None = None
    memory_mib: int = DEFAULT_MEMORY_MIB


def _check_name(request: ProvisionRequest, vm_dir: Path) -> None:
    if not _NAME_RE.fullmatch(request.name):
        raise UsageError("a VM name is 1-63 lower-case letters, digits and '-'")
    if vm_dir.exists():
        raise UsageError(f"VM {request.name!r} exists already ({vm_dir})")


def _check_request(request: ProvisionRequest, pdk: ShieldingData, template: Path) -> None:
    """The private ``template`` copy is what the PDK admits; the KP is the PDK's."""
    check_template(template, request.template_sig, pdk.header.qualifiers)
    kp = load_key_protector(request.kp)
    if tuple(sorted(kp.guardian_ids)) != pdk.header.kp_guardians:
        raise NotAuthorizedError(
            "the key protector's guardians are not the shielding data's",
            hint="use the KP made for this VM with the PDK's owner and guardians",
        )


def provision(
    request: ProvisionRequest,
    vms_dir: Path,
    *,
    reveal_secrets: RevealSecrets,
    key_source: KeySource,
    direct_boot_dir: Path | None,
) -> VmRecord:
    """Create the VM ``request.name`` under ``vms_dir`` (see the module docstring).

    ``direct_boot_dir`` is the only directory a direct kernel/initrd may come from
    (:func:`~guardfab.hypervisor.bootpaths.check_direct_boot`; ``None``: none may);
    the record keeps the resolved paths. It has no default: a caller chooses,
    and only one that is root on this host itself passes :data:`LOCAL_ROOT_BOOT`.

    Raises:
        NotAuthorizedError, VerificationError: template, PDK or KP refused (nothing created).
        PolicyError: the VM would break its security policy, e.g. a shielded VM with a
            direct kernel (nothing created, no KP released).
        DirectBootRefusedError: a direct kernel/initrd outside ``direct_boot_dir`` or
            not a regular file (checked after the policy; nothing created).
        InvalidInputError, TransportError: the KP's release failed (nothing created).
    """
    vm_dir = Path(vms_dir) / request.name
    _check_name(request, vm_dir)
    pdk = load_shielding_data(request.pdk)
    vms_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{request.name}.", dir=vms_dir))
    try:
        template = partial / TEMPLATE_COPY
        copy_template_privately(request.template_disk, template)
        _check_request(request, pdk, template)
        record = _new_record(request, pdk)
        check_vm_policy(record.spec(vm_dir))  # before the PDK is opened or a KP released
        # After the policy, so a shielded VM's direct kernel is refused as firmware-boot.
        boot = check_direct_boot(request.boot, direct_boot_dir)
        record = replace(record, boot=boot)
        answer = guest_answer_file(reveal_secrets(pdk), default_hostname=request.name)
        _build(
            replace(request, template_disk=template, boot=boot), record, answer, partial, key_source
        )
        template.unlink()
        partial.rename(vm_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return record


def _new_record(request: ProvisionRequest, pdk: ShieldingData) -> VmRecord:
    return VmRecord(
        name=request.name,
        policy=pdk.header.policy,
        pdk_id=pdk.header.pdk_id,
        template=request.template_disk.name,
        host_port=request.host_port,
        memory_mib=request.memory_mib,
        created_at=int(time.time()),
        boot=request.boot,
    )


def _build(
    request: ProvisionRequest,
    record: VmRecord,
    answer: AnswerFile,
    vm_dir: Path,
    key_source: KeySource,
) -> None:
    contents = VaultContents.generate(DISK_IDS)
    (vm_dir / "disks").mkdir(mode=0o700)
    create_encrypted_copy(
        request.template_disk, vm_dir / "disks" / "os.qcow2", contents.disks["os"]
    )
    create_encrypted_from_bytes(
        answer.to_bytes(), vm_dir / "disks" / "spec.qcow2", contents.disks["spec"]
    )
    released = key_source.release(request.kp)
    store = VaultStore(vm_dir / "keys")
    sealed = seal_vault(contents, released.new_transport_key, vm_name=request.name)
    store.commit(store.write_pending(sealed, released.egress_kp).number)
    write_record(vm_dir, record)
