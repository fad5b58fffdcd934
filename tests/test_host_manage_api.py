"""The agent's management API over real HTTPS on 127.0.0.1, with a real agent, HGS and KPS.

No VM boots here (provisioning makes real LUKS disks and spends a real KPS
release): roles, refusals, the audit of every change, strict bodies, TLS.
"""

from __future__ import annotations

import sqlite3
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

import vm_fabric_harness
from guardfab.cli.main import cli
from guardfab.errors import FormatError, NotAuthorizedError, UsageError
from guardfab.formats.encoding import b64url_encode
from guardfab.formats.shielding_data import SecurityPolicy
from guardfab.host.manage.audit import ManagementAudit
from guardfab.host.manage.client import (
    ManagementClient,
    ManagementConnection,
    ManagementUnavailableError,
)
from guardfab.host.manage.material import rotate_token
from guardfab.hypervisor.provision import load_record
from guardfab.store.audit_chain import AuditRecord
from guardfab.store.errors import AuditChainError
from manage_harness import ManagedHost, managed_host
from vm_fabric_harness import TenantVm, VmFabric

vm_fabric = vm_fabric_harness.vm_fabric

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def host(vm_fabric: VmFabric, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedHost]:
    """One managed host for the module (its agent stops at the end)."""
    with managed_host(tmp_path_factory.mktemp("managed"), vm_fabric, "host-managed") as running:
        yield running


@pytest.fixture(scope="module")
def provisioned(vm_fabric: VmFabric, host: ManagedHost) -> TenantVm:
    """A shielded VM provisioned through the API by the admin (no boot)."""
    tenant = vm_fabric.tenant_vm("api-vm")
    with host.client("admin") as client:
        record = client.provision(_body(tenant))
    assert (record["name"], record["policy"], record["running"]) == ("api-vm", "shielded", False)
    return tenant


def _body(tenant: TenantVm, **changes: object) -> dict[str, object]:
    return {
        "name": tenant.name,
        "template": str(tenant.template),
        "template_sig": b64url_encode(tenant.template_sig),
        "pdk": b64url_encode(tenant.pdk),
        "kp": b64url_encode(tenant.kp),
        **changes,
    }


def _audit(host: ManagedHost) -> list[AuditRecord]:
    assert host.service.management is not None
    return host.service.management.context.audit.records()


def _last(host: ManagedHost) -> AuditRecord:
    return _audit(host)[-1]


def _raw(
    host: ManagedHost, method: str, path: str, token: str | None, **kw: object
) -> httpx.Response:
    """One request with ``token`` (or, if it has a space, that whole Authorization header)."""
    headers = {}
    if token is not None:
        headers["Authorization"] = token if " " in token else f"Bearer {token}"
    verify = ssl.create_default_context(cafile=str(host.files.ca))
    with httpx.Client(base_url=host.url, verify=verify) as http:
        return http.request(method, "/manage/v1" + path, headers=headers, **kw)  # type: ignore[arg-type]


def _tree(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


# --------------------------------------------------------------------------- roles


def test_admin_provisions_and_the_reviewer_reads(host: ManagedHost, provisioned: TenantVm) -> None:
    with host.client("reviewer") as reviewer:
        assert [vm["name"] for vm in reviewer.list()] == ["api-vm"]
        assert reviewer.show("api-vm")["pdk_id"]
        assert reviewer.call("GET", "/whoami") == {"role": "reviewer"}
    granted = [r for r in _audit(host) if r.details["operation"] == "provision"]
    assert [(r.actor, r.subject, r.outcome) for r in granted] == [("admin", "api-vm", "granted")]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/vms/api-vm/start", None),
        ("POST", "/vms/api-vm/stop", None),
        ("PATCH", "/vms/api-vm/settings", {"console": False}),
        ("POST", "/vms/api-vm/console", None),
        ("POST", "/vms/api-vm/key-protector/restore-last-known-good", None),
    ],
)
def test_the_reviewer_cannot_change_anything(
    host: ManagedHost, provisioned: TenantVm, method: str, path: str, body: object
) -> None:
    vm_dir = host.config.vms_dir / "api-vm"
    before = _tree(vm_dir)
    with host.client("reviewer") as reviewer, pytest.raises(NotAuthorizedError, match="reviewer"):
        reviewer.call(method, path, body)  # type: ignore[arg-type]
    assert _tree(vm_dir) == before
    record = _last(host)
    assert (record.actor, record.subject, record.outcome) == ("reviewer", "api-vm", "refused")
    assert record.details["operation"] == path.rsplit("/", 1)[1]
    assert "reviewer role may not" in record.details["reason"]


@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/outgoing", "migrate-offer"),
        ("/outgoing/leave", "migrate-leave"),
        ("/incoming/finish", "migrate-finish"),
        ("/incoming/forward", "migrate-forward"),
        ("/incoming/abort", "migrate-abort"),
    ],
)
def test_the_reviewer_cannot_migrate(
    host: ManagedHost, provisioned: TenantVm, path: str, operation: str
) -> None:
    vm_dir = host.config.vms_dir / "api-vm"
    before = _tree(vm_dir)
    with host.client("reviewer") as reviewer, pytest.raises(NotAuthorizedError, match="reviewer"):
        reviewer.call("POST", f"/vms/api-vm{path}")
    assert _tree(vm_dir) == before
    record = _last(host)
    assert (record.actor, record.details["operation"], record.outcome) == (
        "reviewer", operation, "refused",
    )  # fmt: skip


def test_the_reviewer_cannot_provision(vm_fabric: VmFabric, host: ManagedHost) -> None:
    tenant = vm_fabric.tenant_vm("api-by-reviewer")
    with host.client("reviewer") as reviewer, pytest.raises(NotAuthorizedError):
        reviewer.provision(_body(tenant))
    assert not (host.config.vms_dir / "api-by-reviewer").exists()
    record = _last(host)
    assert (record.actor, record.outcome, record.details["operation"]) == (
        "reviewer", "refused", "provision",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("token", "actor", "error"),
    [
        (None, "no-token", "MissingCredentialError"),
        ("not-a-token", "unknown-token", "NotAuthorizedError"),
        ("Basic YWRtaW46YWRtaW4=", "no-token", "MissingCredentialError"),
    ],
)
def test_no_or_unknown_token_is_refused_and_audited(
    host: ManagedHost, provisioned: TenantVm, token: str | None, actor: str, error: str
) -> None:
    before = _tree(host.config.vms_dir / "api-vm")
    response = _raw(host, "POST", "/vms/api-vm/start", token)
    assert response.status_code == 403
    assert response.json()["error"]["type"] == error
    assert _tree(host.config.vms_dir / "api-vm") == before
    record = _last(host)
    assert (record.actor, record.subject, record.outcome) == (actor, "api-vm", "refused")
    refused_read = _raw(host, "GET", "/vms", token)
    assert refused_read.status_code == 403  # reads too
    assert "server" not in refused_read.headers  # a refusal does not name the software


def test_a_revoked_token_is_refused_at_once(host: ManagedHost, provisioned: TenantVm) -> None:
    old = host.files.token_file("reviewer").read_bytes()
    (host.files.dir / "old-reviewer.token").write_bytes(old)
    (host.files.dir / "old-reviewer.token").chmod(0o600)
    rotate_token(host.files, "reviewer")
    with host.client(token_file=host.files.dir / "old-reviewer.token") as stale:
        with pytest.raises(NotAuthorizedError, match="unknown or revoked"):
            stale.list()
        with pytest.raises(NotAuthorizedError):
            stale.action("api-vm", "stop")
    assert _last(host).actor == "unknown-token"
    with host.client("reviewer") as fresh:
        assert [vm["name"] for vm in fresh.list()] == ["api-vm"]


# --------------------------------------------------------------------------- policy


def test_loosening_a_shielded_vm_is_refused_and_audited(
    host: ManagedHost, provisioned: TenantVm
) -> None:
    vm_dir = host.config.vms_dir / "api-vm"
    before = _tree(vm_dir)
    with host.client("admin") as admin:
        with pytest.raises(NotAuthorizedError, match="shielded: console=on refused"):
            admin.settings("api-vm", console=True)
        settings = _last(host)
        with pytest.raises(NotAuthorizedError, match="shielded: attaching a console refused"):
            admin.action("api-vm", "console")
        console = _last(host)
    assert _tree(vm_dir) == before
    for record, operation in ((settings, "settings"), (console, "console")):
        assert (record.actor, record.subject, record.outcome) == ("admin", "api-vm", "refused")
        assert record.details["operation"] == operation
        assert record.details["refusal"] == "loosening-shielded-vm"
        assert record.details["error"] == "LooseningRefusedError"


# --------------------------------------------------------------------------- bad input


def test_strict_bodies_and_names(vm_fabric: VmFabric, host: ManagedHost) -> None:
    tenant = vm_fabric.tenant_vm("api-strict")
    admin = host.token("admin")
    cases = [
        _body(tenant, extra="field"),
        _body(tenant, name="../escape"),
        _body(tenant, template="relative/path.img"),
        _body(tenant, console=True),
        _body(tenant, port=0),
    ]
    for body in cases:
        response = _raw(host, "POST", "/vms", admin, json=body)
        assert response.status_code == 422, body
        assert response.json()["error"]["type"] == "InvalidRequestError"
        assert tenant.password not in response.text
        record = _last(host)
        assert (record.actor, record.outcome, record.details["operation"]) == (
            "admin", "refused", "provision",
        )  # fmt: skip
    assert (
        _raw(host, "PATCH", "/vms/api-vm/settings", admin, json={"console": "yes"}).status_code
        == 422
    )
    assert _raw(host, "POST", "/vms/UPPER/start", admin).status_code == 422
    assert not (host.config.vms_dir / "api-strict").exists()
    long_name = "x" * 400
    for token, actor in ((host.token("reviewer"), "reviewer"), (None, "no-token")):
        assert _raw(host, "POST", f"/vms/{long_name}/stop", token).status_code == 403
        record = _last(host)
        assert (record.actor, record.subject, record.outcome) == (
            actor,
            "(invalid name)",
            "refused",
        )
    big = {"pdk": "A" * (4 * 1024 * 1024)}
    assert _raw(host, "POST", "/vms", admin, json=_body(tenant, **big)).status_code in (413, 422)


def test_a_changed_template_byte_is_refused_through_the_api(
    vm_fabric: VmFabric, host: ManagedHost
) -> None:
    tenant = vm_fabric.tenant_vm("api-tampered")
    data = bytearray(tenant.template.read_bytes())
    data[4096] ^= 0xFF
    tenant.template.write_bytes(bytes(data))
    with host.client("admin") as admin, pytest.raises(Exception, match="signed digest") as caught:
        admin.provision(_body(tenant))
    assert caught.type.__name__ == "VerificationError"
    assert not (host.config.vms_dir / "api-tampered").exists()
    assert [p.name for p in host.config.vms_dir.iterdir() if p.name.startswith(".")] == []
    record = _last(host)
    assert (record.subject, record.outcome, record.details["error"]) == (
        "api-tampered", "refused", "VerificationError",
    )  # fmt: skip


def test_unknown_vm_and_missing_operations_are_clear(host: ManagedHost) -> None:
    with host.client("admin") as admin, pytest.raises(UsageError, match="no VM 'ghost'"):
        admin.action("ghost", "start")


# --------------------------------------------------------------------------- transport


def test_the_client_checks_tls_and_token_file(
    vm_fabric: VmFabric, host: ManagedHost, tmp_path: Path
) -> None:
    wrong_ca = Path(vm_fabric.hgs.ca)
    connection = ManagementConnection(host.url, wrong_ca, host.files.token_file("admin"))
    with pytest.raises(ManagementUnavailableError), ManagementClient(connection) as client:
        client.list()
    loose = tmp_path / "token"
    loose.write_text(host.token("admin"))
    loose.chmod(0o644)
    with pytest.raises(UsageError, match="readable by others"):
        ManagementClient(ManagementConnection(host.url, host.files.ca, loose))
    with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer from a TLS server
        httpx.get(host.url.replace("https", "http") + "/healthz", timeout=5)


def test_material_is_private(host: ManagedHost) -> None:
    for name in ("server.key", "admin.token", "reviewer.token", "access.json"):
        assert stat.S_IMODE((host.files.dir / name).stat().st_mode) == 0o600, name
    assert host.token("admin") not in host.files.access_file.read_text()


# --------------------------------------------------------------------------- audit


def test_audit_chain_verifies_holds_no_secret_and_detects_tampering(
    host: ManagedHost, provisioned: TenantVm, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        cli, ["host", "audit", "verify", "--config", str(host.config_file)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "audit log OK" in result.output
    listed = CliRunner().invoke(cli, ["host", "audit", "list", "--config", str(host.config_file)])
    assert "refused" in listed.output
    assert "granted" in listed.output
    db = host.files.audit_db.read_bytes() + Path(f"{host.files.audit_db}-wal").read_bytes()
    for secret in (host.token("admin"), host.token("reviewer"), provisioned.password):
        assert secret.encode() not in db
    assert provisioned.answer_file not in db
    copy = tmp_path / "audit.db"
    copy.write_bytes(host.files.audit_db.read_bytes())
    copy.chmod(0o600)
    with sqlite3.connect(host.files.audit_db) as live, sqlite3.connect(copy) as target:
        live.backup(target)
    with sqlite3.connect(copy) as conn:
        key, value = conn.execute(
            "SELECT key, value FROM kv WHERE key LIKE 'audit/0%' LIMIT 1"
        ).fetchone()
        conn.execute(
            "UPDATE kv SET value = ? WHERE key = ?", (value.replace(b'"admin"', b'"nobody"'), key)
        )
    log = ManagementAudit(copy)
    try:
        with pytest.raises(AuditChainError):
            log.verify()
    finally:
        log.close()


def test_format_error_type_round_trips(host: ManagedHost) -> None:
    admin = host.token("admin")
    bad = {"name": "api-b64", "template": "/x", "template_sig": "!!", "pdk": "a", "kp": "a"}
    response = _raw(host, "POST", "/vms", admin, json=bad)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "FormatError"
    with host.client("admin") as client, pytest.raises(FormatError):
        client.provision(bad)


def test_the_openapi_document_lists_the_routes(host: ManagedHost) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=str(host.files.ca))) as http:
        paths = http.get(host.url + "/openapi.json").json()["paths"]
    expected = {
        "/manage/v1/vms",
        "/manage/v1/vms/{name}/outgoing",
        "/manage/v1/vms/{name}/outgoing/send",
        "/manage/v1/vms/{name}/outgoing/take-back",
        "/manage/v1/vms/{name}/incoming",
        "/manage/v1/vms/{name}/incoming/finish",
        "/manage/v1/vms/{name}/incoming/abort",
        "/manage/v1/vms/{name}/settings",
        "/manage/v1/vms/{name}/key-protector/restore-last-known-good",
    }
    assert expected <= set(paths)
    assert "patch" in paths["/manage/v1/vms/{name}/settings"]


# --------------------------------------------------------------------------- direct boot paths


def _direct_boot_refused(
    vm_fabric: VmFabric, host: ManagedHost, name: str, kernel: Path, initrd: Path, reason: str
) -> None:
    """An encryption-supported VM asking for ``kernel``/``initrd`` is refused, nothing made."""
    tenant = vm_fabric.tenant_vm(name, policy=SecurityPolicy.ENCRYPTION_SUPPORTED)
    body = _body(tenant, kernel=str(kernel), initrd=str(initrd))
    with host.client("admin") as admin, pytest.raises(NotAuthorizedError, match=reason):
        admin.provision(body)
    assert not (host.config.vms_dir / name).exists()
    assert list(host.config.vms_dir.glob(f".{name}*")) == []
    record = _last(host)
    assert (record.actor, record.subject, record.outcome) == ("admin", name, "refused")
    assert record.details["operation"] == "provision"
    assert reason in record.details["reason"]


def test_direct_boot_is_refused_when_no_directory_is_configured(
    vm_fabric: VmFabric, host: ManagedHost, tmp_path: Path
) -> None:
    """The review's attack: the admin's own VM with the host encryption key as its initrd."""
    assert host.service.management is not None
    vms = host.service.management.context.vms
    assert host.config.direct_boot_dir is not None
    assert vms.direct_boot_dir == host.config.direct_boot_dir  # wired from the configuration
    vms.direct_boot_dir = None  # as on a host whose configuration names no directory
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    _direct_boot_refused(
        vm_fabric, host, "api-key-initrd", kernel, host.config.encryption_key,
        "no direct_boot_dir configured",
    )  # fmt: skip
    vms.direct_boot_dir = host.config.direct_boot_dir


@pytest.fixture
def boot_dir(host: ManagedHost, tmp_path: Path) -> Iterator[Path]:
    """The host allows direct boot from ``tmp_path/boot`` for one test."""
    allowed = tmp_path / "boot"
    allowed.mkdir()
    (allowed / "vmlinuz").write_bytes(b"kernel")
    (allowed / "initrd.img").write_bytes(b"initrd")
    assert host.service.management is not None
    vms = host.service.management.context.vms
    vms.direct_boot_dir = allowed
    try:
        yield allowed
    finally:
        vms.direct_boot_dir = host.config.direct_boot_dir


def test_direct_boot_paths_leaving_the_allowed_directory_are_refused(
    vm_fabric: VmFabric, host: ManagedHost, boot_dir: Path
) -> None:
    key = host.config.encryption_key
    (boot_dir / "initrd-link").symlink_to(key)
    (boot_dir / "modules").mkdir()
    kernel = boot_dir / "vmlinuz"
    attacks = [
        (key, "outside the allowed directory"),
        (boot_dir / "initrd-link", "outside the allowed directory"),
        (boot_dir / ".." / ".." / key.relative_to(key.anchor), "outside the allowed directory"),
        (boot_dir / "modules", "not a regular file"),
    ]
    for number, (initrd, reason) in enumerate(attacks):
        _direct_boot_refused(vm_fabric, host, f"api-boot-{number}", kernel, initrd, reason)


def test_direct_boot_inside_the_allowed_directory_keeps_the_resolved_paths(
    vm_fabric: VmFabric, host: ManagedHost, boot_dir: Path
) -> None:
    (boot_dir / "current").symlink_to("vmlinuz")
    tenant = vm_fabric.tenant_vm("api-boot-ok", policy=SecurityPolicy.ENCRYPTION_SUPPORTED)
    body = _body(tenant, kernel=str(boot_dir / "current"), initrd=str(boot_dir / "initrd.img"))
    with host.client("admin") as admin:
        admin.provision(body)
    record = load_record(host.config.vms_dir / "api-boot-ok")
    assert record.boot is not None
    assert (record.boot.kernel, record.boot.initrd) == (
        boot_dir.resolve() / "vmlinuz",
        boot_dir.resolve() / "initrd.img",
    )


def test_start_and_restore_recheck_a_recorded_direct_kernel(
    vm_fabric: VmFabric, host: ManagedHost, boot_dir: Path
) -> None:
    """A record from before ADR 0017, or a narrowed directory: refused before any release."""
    tenant = vm_fabric.tenant_vm("api-boot-old", policy=SecurityPolicy.ENCRYPTION_SUPPORTED)
    body = _body(tenant, kernel=str(boot_dir / "vmlinuz"), initrd=str(boot_dir / "initrd.img"))
    with host.client("admin") as admin:
        admin.provision(body)
    vm_dir = host.config.vms_dir / "api-boot-old"
    keys_before = sorted(p.relative_to(vm_dir) for p in (vm_dir / "keys").rglob("*"))
    assert host.service.management is not None
    host.service.management.context.vms.direct_boot_dir = None  # the directory was taken away
    for operation in ("start", "restore"):
        with host.client("admin") as admin, pytest.raises(NotAuthorizedError, match="direct_boot"):
            admin.action("api-boot-old", operation)
        record = _last(host)
        assert (record.subject, record.outcome) == ("api-boot-old", "refused")
        assert record.details["operation"] == operation
    assert sorted(p.relative_to(vm_dir) for p in (vm_dir / "keys").rglob("*")) == keys_before
