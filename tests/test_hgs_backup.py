"""HGS backup and restore: the encrypted envelope, what it holds, and the restore drill.

The drill: a tenant makes a KP for HGS-1's guardian, HGS-1 releases it; HGS-1 is
stopped and exported; the backup is imported into a fresh directory and served
by a fresh process (HGS-2, its own new TLS CA); a host attests at HGS-2, which
releases the egress KP of HGS-1's release and refuses a rollback to generation
0, because the generations seen were backed up too.
"""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from joserfc import jwe
from joserfc.jwk import OctKey

from guardfab.attestation.trust import AttestationMode
from guardfab.cli.main import cli
from guardfab.errors import FormatError, NotAuthorizedError, UsageError
from guardfab.formats.encoding import b64url_decode
from guardfab.formats.key_protector import load_key_protector
from guardfab.hgs.backup import (
    BACKUP_JWE_TYPE,
    PBES2_COUNT,
    Backup,
    BackupSecret,
    RestoreOptions,
    collect,
    export_state,
    import_state,
    new_key_file,
    open_backup,
    seal,
)
from guardfab.hgs.state import HgsConfig, HgsState, init_state
from guardfab.host.keyrelease import KeyReleaseRefusedError, request_release
from guardfab.store.audit import AuditLog
from guardfab.store.sqlite import SqliteStore
from hgs_harness import start_hgs
from test_kps_fixtures import Host, Tenant, enable_modes, kps_document, open_store

NOW = time.time()
KEY = BackupSecret.from_key_file(new_key_file())


@pytest.fixture
def hgs_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "hgs1"
    init_state(directory, HgsConfig(service_name="backup-test"))
    store = SqliteStore(HgsState(directory).store_path())
    try:
        store.put("trust/policies/Hgs_Example", b'{"state":"enabled"}')
        store.put("nonces/used", b"", ttl=60)
        store.put("activations/pending", b"{}", ttl=60)
        store.put("candidates/short-lived", b"{}", ttl=3600)
        AuditLog(store).append(kind="test", actor="a", subject="s", outcome="success")
    finally:
        store.close()
    return directory


def test_backup_holds_the_state_but_not_the_transient_records(hgs_dir: Path) -> None:
    backup = collect(hgs_dir, now=NOW)
    keys = {k for k, _ in backup.records}
    assert "trust/policies/Hgs_Example" in keys
    assert any(k.startswith("audit/") for k in keys)
    assert not any(k.startswith(("nonces/", "activations/", "candidates/")) for k in keys)
    assert {"hgs.json", "access.json", "keys/attestation-signing.pem", "keys/nonce.key"} <= set(
        backup.files
    )
    kps_files = [p for p in backup.files if p.startswith("keys/kps/")]
    assert len(kps_files) == 4, "one KPS guardian: two private keys, its document, key.json"
    assert backup.files["keys/nonce.key"][1] == 0o600
    assert "state.db" not in backup.files


def test_passphrase_backup_uses_pbes2_with_600000_iterations(hgs_dir: Path) -> None:
    secret = BackupSecret.from_passphrase("correct horse battery staple")
    data = seal(collect(hgs_dir, now=NOW), secret)
    header = json.loads(b64url_decode(data.decode().split(".")[0], what="header"))
    assert (header["alg"], header["enc"], header["typ"]) == (
        "PBES2-HS512+A256KW",
        "A256GCM",
        BACKUP_JWE_TYPE,
    )
    assert header["p2c"] >= 600_000 == PBES2_COUNT
    assert len(b64url_decode(header["p2s"], what="salt")) == 16
    assert b"PRIVATE KEY" not in data
    assert open_backup(data, secret).service_name == "backup-test"
    with pytest.raises(NotAuthorizedError, match="does not decrypt"):
        open_backup(data, BackupSecret.from_passphrase("correct horse battery stapler"))
    with pytest.raises(UsageError, match="PBES2"):
        open_backup(data, KEY)


def test_key_file_backup_and_a_wrong_key(hgs_dir: Path) -> None:
    data = seal(collect(hgs_dir, now=NOW), KEY)
    header = json.loads(b64url_decode(data.decode().split(".")[0], what="header"))
    assert header["alg"] == "A256KW"
    assert open_backup(data, KEY).created_at == int(NOW)
    with pytest.raises(NotAuthorizedError):
        open_backup(data, BackupSecret.from_key_file(new_key_file()))


def test_a_weak_iteration_count_is_refused(hgs_dir: Path) -> None:
    """A backup made with joserfc's default PBES2 count (2048) is refused before decryption."""
    plaintext = collect(hgs_dir, now=NOW).to_bytes()
    header = {"alg": "PBES2-HS512+A256KW", "enc": "A256GCM", "typ": BACKUP_JWE_TYPE, "p2c": 2048}
    token = jwe.encrypt_compact(
        header,
        plaintext,
        OctKey.import_key(b"correct horse battery staple"),
        algorithms=["PBES2-HS512+A256KW", "A256GCM"],
    )
    registry_bound = BackupSecret.from_passphrase("correct horse battery staple")
    with pytest.raises(FormatError, match="p2c must be 600000"):
        open_backup(token.encode(), registry_bound)


@pytest.mark.parametrize("text", ["short", ""])
def test_short_passphrases_are_refused(text: str) -> None:
    with pytest.raises(UsageError):
        BackupSecret.from_passphrase(text)


@pytest.mark.parametrize(
    "path", ["../escape", "keys/../../x", "/etc/passwd", "state.db", "keys/.hidden"]
)
def test_restore_refuses_paths_outside_the_state_and_writes_nothing(
    hgs_dir: Path, tmp_path: Path, path: str
) -> None:
    backup = collect(hgs_dir, now=NOW)
    evil = Backup(backup.created_at, backup.service_name, {**backup.files, path: (b"x", 0o600)}, [])
    with pytest.raises(FormatError, match="not part of an HGS directory"):
        import_state(seal(evil, KEY), KEY, tmp_path / "new", RestoreOptions(), now=NOW)
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".new*"))


def test_restore_refuses_a_non_empty_directory(hgs_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        import_state(seal(collect(hgs_dir, now=NOW), KEY), KEY, target, RestoreOptions(), now=NOW)
    assert [p.name for p in target.iterdir()] == ["keep"]


def test_restore_makes_a_new_tls_identity_unless_kept(hgs_dir: Path, tmp_path: Path) -> None:
    data = seal(collect(hgs_dir, now=NOW), KEY)
    fresh = tmp_path / "fresh"
    kept = tmp_path / "kept"
    import_state(data, KEY, fresh, RestoreOptions(server_names=("hgs2.test",)), now=NOW)
    import_state(data, KEY, kept, RestoreOptions(keep_tls=True), now=NOW)
    original = (hgs_dir / "tls" / "ca.pem").read_bytes()
    assert (fresh / "tls" / "ca.pem").read_bytes() != original
    assert (kept / "tls" / "ca.pem").read_bytes() == original
    assert HgsState(fresh).config.server_names == ("hgs2.test",)
    for restored in (fresh, kept):
        assert stat.S_IMODE(restored.stat().st_mode) == 0o700
        for private in ("keys/attestation-signing.pem", "tls/server.key", "tokens/admin.token"):
            assert stat.S_IMODE((restored / private).stat().st_mode) == 0o600, private
        state = HgsState(restored)
        assert state.attestation_signing_key().thumbprint() == (
            HgsState(hgs_dir).attestation_signing_key().thumbprint()
        )
        store = SqliteStore(state.store_path())
        try:
            kinds = [r.kind for r in AuditLog(store).iter_records()]
            assert AuditLog(store).verify().records == len(kinds), "the chain continues intact"
            assert store.get("trust/policies/Hgs_Example") is not None
        finally:
            store.close()
        assert kinds[-2:] == ["test", "hgs-restore"]


@pytest.mark.slow
def test_restore_drill(tmp_path: Path) -> None:
    hgs1 = start_hgs(tmp_path / "hgs1")
    try:
        enable_modes(hgs1, AttestationMode.HOST_KEY)
        host = Host("host-a")
        host.register(hgs1)
        tenant = Tenant()
        kp = tenant.kp(kps_document(hgs1))
        cert1 = host.attest(hgs1)
        _, new1, egress1 = request_release(hgs1.url, Path(hgs1.ca), cert1, kp, host.encryption)
    finally:
        hgs1.stop()

    runner = CliRunner()
    key_file, backup_file = tmp_path / "backup.key", tmp_path / "hgs1.backup"
    exported = runner.invoke(cli, ["hgs", "export-state", "--dir", str(hgs1.directory),
                                   "--out", str(backup_file), "--key-file", str(key_file),
                                   "--new-key-file"])  # fmt: skip
    assert exported.exit_code == 0, exported.output
    assert stat.S_IMODE(backup_file.stat().st_mode) == 0o600
    hgs2_dir = tmp_path / "hgs2"
    imported = runner.invoke(
        cli,
        ["hgs", "import-state", "--dir", str(hgs2_dir), "--in", str(backup_file),
         "--key-file", str(key_file)],
    )  # fmt: skip
    assert imported.exit_code == 0, imported.output

    hgs2 = start_hgs(hgs2_dir, init=False)
    try:
        assert Path(hgs2.ca).read_bytes() != Path(hgs1.ca).read_bytes()
        cert2 = host.attest(hgs2)  # host keys and modes came back with the store
        current, _, egress2 = request_release(
            hgs2.url, Path(hgs2.ca), cert2, egress1, host.encryption
        )
        assert current == new1, "HGS-2 opens what HGS-1 re-keyed the VM to"
        assert load_key_protector(egress2).generation == 2
        with pytest.raises(KeyReleaseRefusedError) as rollback:
            request_release(hgs2.url, Path(hgs2.ca), cert2, kp, host.encryption)
        assert (rollback.value.status, rollback.value.reason) == (409, "rollback")
        store = open_store(hgs2)
        try:
            kinds = [r.kind for r in AuditLog(store).iter_records()]
        finally:
            store.close()
        assert kinds.index("hgs-restore") < len(kinds) - 2
        assert kinds[-2:] == ["key-release", "key-release"]
    finally:
        hgs2.stop()


def test_export_state_is_audited(hgs_dir: Path) -> None:
    export_state(hgs_dir, KEY, now=NOW)
    store = SqliteStore(HgsState(hgs_dir).store_path())
    try:
        assert list(AuditLog(store).iter_records())[-1].kind == "hgs-export"
    finally:
        store.close()
