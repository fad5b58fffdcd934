"""Backing up an HGS on etcd and restoring it into SQLite or into another etcd prefix.

The round trip, against a real etcd and real ``hgs serve`` processes: an HGS on
etcd attests a host; ``hgs export-state`` backs it up; ``hgs import-state``
restores it into a new SQLite HGS (the way off etcd) and into an empty etcd
prefix (the way onto it). Both hold the same trust state and records, and their
audit chains verify; the etcd one is served and attests the same host again.
A restore into a prefix that holds anything is refused and writes nothing; a
restore that fails part way leaves the prefix empty again; a backup bigger than
one transaction goes in as several that fit the cluster's --max-txn-ops.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from joserfc.jwk import ECKey

from etcd_harness import EtcdCluster, etcd_server_fixture, new_prefix  # noqa: F401 -- fixture
from guardfab.cli.main import cli
from guardfab.errors import UsageError
from guardfab.formats import jose
from guardfab.hgs import registry as reg
from guardfab.hgs.backup import (
    TRANSIENT_PREFIXES,
    BackupSecret,
    RestoreOptions,
    collect,
    export_state,
    new_key_file,
    restore,
)
from guardfab.hgs.server import open_store
from guardfab.hgs.state import EtcdStoreSettings, HgsConfig, HgsState, init_state
from guardfab.host.attestation import HgsAttestationClient, attest_with_host_key
from guardfab.store import AuditLog, EtcdStore, Store, StoreUsageError, verify
from hgs_harness import RunningHgs, start_hgs
from test_hgs_etcd_diagnose import register_host_key

NOW = time.time()
KEY = BackupSecret.from_key_file(new_key_file())


def etcd_settings(cluster: EtcdCluster, prefix: str, **more: object) -> EtcdStoreSettings:
    more.setdefault("max_txn_ops", 512)
    return EtcdStoreSettings(tuple(cluster.endpoints), prefix, **more)  # type: ignore[arg-type]


def attest(hgs: RunningHgs, signing: ECKey) -> str:
    """Attest for real with the registered host key (raises if refused); the certificate."""
    client = HgsAttestationClient(hgs.url, Path(hgs.ca))
    try:
        host_key = jose.public_jwk(ECKey.generate_key("P-384"))
        return attest_with_host_key(client, signing, host_key=host_key).health_certificate
    finally:
        client.close()


def stored(store: Store) -> dict[str, bytes]:
    """Every lasting record (what a backup carries), by key."""
    return {
        e.key: e.value
        for e in store.list("")
        if e.expires_at is None and not e.key.startswith(TRANSIENT_PREFIXES)
    }


@pytest.fixture
def etcd_hgs(tmp_path: Path, etcd_server: EtcdCluster) -> Iterator[tuple[Path, ECKey]]:
    """An HGS on etcd in host-key mode that has attested a host once (then stopped)."""
    prefix = new_prefix()
    store_settings = etcd_settings(etcd_server, prefix).to_dict()
    directory = tmp_path / "hgs-etcd"
    init_state(directory, HgsConfig(service_name="etcd-backup", store=store_settings))
    signing = register_host_key(directory)
    hgs = start_hgs(directory, init=False)
    try:
        attest(hgs, signing)
    finally:
        hgs.stop()
    yield directory, signing
    etcd_server.wipe(prefix)


def export(directory: Path, tmp_path: Path) -> tuple[Path, Path]:
    key_file, backup_file = tmp_path / "backup.key", tmp_path / "etcd.backup"
    result = CliRunner().invoke(
        cli,
        ["hgs", "export-state", "--dir", str(directory), "--out", str(backup_file),
         "--key-file", str(key_file), "--new-key-file"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return key_file, backup_file


def import_args(target: Path, key_file: Path, backup_file: Path) -> list[str]:
    return ["hgs", "import-state", "--dir", str(target), "--in", str(backup_file),
            "--key-file", str(key_file)]  # fmt: skip


def test_export_from_etcd_then_import_into_sqlite_and_into_etcd(
    etcd_hgs: tuple[Path, ECKey], tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    directory, signing = etcd_hgs
    source = open_store(HgsState(directory))
    try:
        original, original_trust = stored(source), reg.Registry(source).trust()
        assert any(k.startswith(reg.LAST) for k in original), "the attestation left its record"
    finally:
        source.close()
    key_file, backup_file = export(directory, tmp_path)
    runner = CliRunner()

    to_sqlite = runner.invoke(cli, import_args(tmp_path / "sqlite", key_file, backup_file))
    assert to_sqlite.exit_code == 0, to_sqlite.output
    assert "store: state.db" in to_sqlite.output
    prefix = new_prefix()
    to_etcd = runner.invoke(
        cli,
        [*import_args(tmp_path / "etcd", key_file, backup_file),
         *[a for e in etcd_server.endpoints for a in ("--store-etcd", e)],
         "--store-etcd-prefix", prefix, "--store-etcd-max-txn-ops", "512"],
    )  # fmt: skip
    assert to_etcd.exit_code == 0, to_etcd.output
    assert f"store: etcd prefix '{prefix}'" in to_etcd.output

    for restored in (tmp_path / "sqlite", tmp_path / "etcd"):
        state = HgsState(restored)
        store = open_store(state)
        try:
            records = stored(store)
            assert reg.Registry(store).trust() == original_trust
            report = verify(store)  # `hgs audit verify`
            kinds = [r.kind for r in AuditLog(store).iter_records()]
        finally:
            store.close()
        assert {k: v for k, v in records.items() if not k.startswith("audit/")} == {
            k: v for k, v in original.items() if not k.startswith("audit/")
        }
        assert report.records == len(kinds)
        # The chain came along (the export's own record is written after the snapshot).
        assert kinds == ["admin", "attestation", "hgs-restore"]
    assert HgsState(tmp_path / "sqlite").config.store["backend"] == "sqlite"
    assert HgsState(tmp_path / "etcd").etcd_settings().prefix == prefix

    served = start_hgs(tmp_path / "etcd", init=False)  # the restored etcd HGS attests the host
    try:
        assert attest(served, signing)
    finally:
        served.stop()
        etcd_server.wipe(prefix)


def test_export_is_one_snapshot_and_audited_with_its_revision(
    etcd_hgs: tuple[Path, ECKey],
) -> None:
    directory, _ = etcd_hgs
    backup = collect(directory, now=NOW)
    store = open_store(HgsState(directory))
    try:
        assert isinstance(store, EtcdStore)
        assert backup.revision is not None
        assert backup.revision <= store.current_revision()
        assert dict(backup.records) == stored(store)
    finally:
        store.close()
    export_state(directory, KEY, now=NOW)
    store = open_store(HgsState(directory))
    try:
        last = list(AuditLog(store).iter_records())[-1]
    finally:
        store.close()
    assert last.kind == "hgs-export"
    assert last.details["etcd_revision"] >= backup.revision


def test_import_into_a_prefix_that_holds_anything_is_refused_and_writes_nothing(
    etcd_hgs: tuple[Path, ECKey], tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    directory, _ = etcd_hgs
    occupied = HgsState(directory).etcd_settings().prefix
    key_file, backup_file = export(directory, tmp_path)
    probe = EtcdStore(etcd_server.endpoints, prefix=occupied)
    try:
        before = (probe.stored_keys(), probe.current_revision())
        result = CliRunner().invoke(
            cli,
            [*import_args(tmp_path / "again", key_file, backup_file),
             "--store-etcd", etcd_server.endpoints[0], "--store-etcd-prefix", occupied],
        )  # fmt: skip
        assert result.exit_code != 0
        assert f"etcd prefix '{occupied}' already holds" in result.output
        assert "nothing was written" in result.output
        assert (probe.stored_keys(), probe.current_revision()) == before
    finally:
        probe.close()
    assert not (tmp_path / "again").exists()
    assert not list(tmp_path.glob(".again*"))


def test_an_expired_leftover_makes_a_prefix_not_empty(
    tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    init_state(tmp_path / "src", HgsConfig(service_name="small"))
    backup = collect(tmp_path / "src", now=NOW)
    prefix = new_prefix()
    leftover = EtcdStore(etcd_server.endpoints, prefix=prefix, clock=lambda: NOW - 3600)
    try:
        leftover.put("nonces/old", b"", ttl=1)  # long expired by now's clock; still stored
    finally:
        leftover.close()
    with pytest.raises(UsageError, match="already holds 2 key"):
        restore(
            backup,
            tmp_path / "dst",
            RestoreOptions(etcd=etcd_settings(etcd_server, prefix)),
            now=NOW,
        )
    etcd_server.wipe(prefix)


def test_a_big_backup_goes_in_as_transactions_that_fit_the_cluster(
    tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    init_state(tmp_path / "src", HgsConfig(service_name="big"))
    backup = collect(tmp_path / "src", now=NOW)
    extra = [(f"hosts/tpm/h{i:04}", b"{}" * 20) for i in range(700)]
    extra += [(f"baselines/b{i:02}", bytes(200_000)) for i in range(12)]  # ~2.4 MB
    big = dataclasses.replace(backup, records=backup.records + extra)
    prefix = new_prefix()
    # The cluster runs with 512; tell the store 128 (etcd's default) and it must still fit.
    settings = etcd_settings(etcd_server, prefix, max_txn_ops=128)
    try:
        restore(big, tmp_path / "dst", RestoreOptions(etcd=settings), now=NOW)
        store = open_store(HgsState(tmp_path / "dst"))
        try:
            records = stored(store)
            assert verify(store).records == 1  # the restore's own record
        finally:
            store.close()
        assert all(records[k] == v for k, v in extra)
    finally:
        etcd_server.wipe(prefix)


def test_a_restore_that_fails_part_way_leaves_the_prefix_empty(
    tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    init_state(tmp_path / "src", HgsConfig(service_name="partial"))
    backup = collect(tmp_path / "src", now=NOW)
    records = [(f"hosts/tpm/h{i:04}", b"{}") for i in range(300)]
    records.append(("hosts/tpm/too-big", bytes(2 * 1024 * 1024)))  # refused by the store
    broken = dataclasses.replace(backup, records=backup.records + records)
    prefix = new_prefix()
    settings = etcd_settings(etcd_server, prefix)
    probe = EtcdStore(etcd_server.endpoints, prefix=prefix)
    try:
        with pytest.raises(StoreUsageError):
            restore(broken, tmp_path / "dst", RestoreOptions(etcd=settings), now=NOW)
        assert probe.stored_keys() == 0, "the first 300 records were not taken back"
        assert probe.current_revision() > 0
    finally:
        probe.close()
        etcd_server.wipe(prefix)
    assert not (tmp_path / "dst").exists()
    assert not list(tmp_path.glob(".dst*"))


def test_a_backup_of_a_sqlite_hgs_restores_into_etcd(
    tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    """The way onto etcd: SQLite HGS -> backup -> etcd prefix."""
    init_state(tmp_path / "src", HgsConfig(service_name="onto-etcd"))
    store = open_store(HgsState(tmp_path / "src"))
    try:
        AuditLog(store).append(kind="admin", actor="a", subject="s", outcome="success")
        store.put("trust/policies/Hgs_Example", b'{"state":"enabled"}')
        original = stored(store)
    finally:
        store.close()
    prefix = new_prefix()
    restore(
        collect(tmp_path / "src", now=NOW),
        tmp_path / "dst",
        RestoreOptions(etcd=etcd_settings(etcd_server, prefix)),
        now=NOW,
    )
    store = open_store(HgsState(tmp_path / "dst"))
    try:
        assert isinstance(store, EtcdStore)
        restored = stored(store)
        assert verify(store).records == 2
    finally:
        store.close()
        etcd_server.wipe(prefix)
    assert {k: v for k, v in restored.items() if not k.startswith("audit/")} == {
        k: v for k, v in original.items() if not k.startswith("audit/")
    }
