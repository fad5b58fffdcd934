"""An HGS whose state lives in etcd: configuration, ``hgs init --store-etcd``, two nodes attesting.

The end-to-end test is the point of an HGS cluster: two ``guardfab hgs serve``
processes (the same keys, copied, as a cluster's nodes have) on one real etcd.
A challenge from one node is answered at the other, a replay of it at the first
is refused because the consumed nonce is in the shared store, and the audit log
both appended to is one verified chain.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from joserfc.jwk import ECKey

from etcd_harness import EtcdCluster, etcd_server_fixture, new_prefix  # noqa: F401 -- fixture
from guardfab.attestation.trust import AttestationMode, HostKey
from guardfab.cli.main import cli
from guardfab.errors import FormatError, UsageError
from guardfab.formats import jose
from guardfab.hgs import registry as reg
from guardfab.hgs.server import open_store
from guardfab.hgs.state import EtcdStoreSettings, HgsConfig, HgsState, init_state
from guardfab.host.attestation import HgsAttestationClient, host_key_evidence
from guardfab.store import EtcdStore, StoreError, verify
from hgs_harness import RunningHgs, start_hgs

HOST_KEY = jose.public_jwk(ECKey.generate_key("P-384"))


def etcd_config(endpoints: list[str], prefix: str, **settings: object) -> HgsConfig:
    store = EtcdStoreSettings(tuple(endpoints), prefix, **settings).to_dict()  # type: ignore[arg-type]
    return HgsConfig(service_name="test-hgs", store=store)


# --- configuration -------------------------------------------------------------


def test_etcd_settings_round_trip_through_hgs_json() -> None:
    config = etcd_config(
        ["https://10.0.0.1:2379", "https://10.0.0.2:2379"],
        "fabric-a/",
        ca_file="etcd-ca.pem",
        username="hgs",
        password_file="/etc/guardfab/etcd.password",
        max_txn_ops=512,
    )
    again = HgsConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert EtcdStoreSettings.from_dict(again.store).max_txn_ops == 512


BAD_STORES = [
    ({"backend": "zookeeper"}, "store.backend"),
    ({"backend": "etcd"}, "store.endpoints"),
    ({"backend": "etcd", "endpoints": []}, "store.endpoints"),
    ({"backend": "etcd", "endpoints": ["ftp://x:1"]}, "store.endpoints"),
    ({"backend": "etcd", "endpoints": ["http://root:pw@x:1"]}, "user name or password"),
    ({"backend": "etcd", "endpoints": ["http://x:1"], "timeout": 0}, "store.timeout"),
    ({"backend": "etcd", "endpoints": ["http://x:1"], "max_txn_ops": 64}, "max_txn_ops"),
    ({"backend": "etcd", "endpoints": ["http://x:1"], "username": "u"}, "go together"),
    ({"backend": "etcd", "endpoints": ["http://x:1"], "ca_file": 7}, "store.ca_file"),
]


@pytest.mark.parametrize(("store", "named"), BAD_STORES, ids=[s[1] for s in BAD_STORES])
def test_bad_store_settings_are_refused_naming_the_field(
    store: dict[str, object], named: str
) -> None:
    data = HgsConfig(service_name="x").to_dict() | {"store": store}
    with pytest.raises(FormatError, match=named) as info:
        HgsConfig.from_dict(data)
    assert "pw@" not in str(info.value)


def test_hgs_init_with_store_etcd_writes_no_secret(tmp_path: Path) -> None:
    password_file = tmp_path / "etcd.password"
    password_file.write_text("s3cret-etcd-password\n")
    password_file.chmod(0o600)
    result = CliRunner().invoke(
        cli,
        [
            "hgs", "init", "--dir", str(tmp_path / "hgs"),
            "--store-etcd", "https://10.0.0.1:2379", "--store-etcd", "https://10.0.0.2:2379",
            "--store-etcd-prefix", "fabric-a/", "--store-etcd-user", "hgs",
            "--store-etcd-password-file", str(password_file), "--store-etcd-max-txn-ops", "512",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = (tmp_path / "hgs" / "hgs.json").read_text()
    assert "s3cret-etcd-password" not in text
    settings = HgsState(tmp_path / "hgs").etcd_settings()
    assert settings.endpoints == ("https://10.0.0.1:2379", "https://10.0.0.2:2379")
    assert (settings.prefix, settings.username, settings.max_txn_ops) == ("fabric-a/", "hgs", 512)
    assert settings.password_file == str(password_file)
    assert not (tmp_path / "hgs" / "state.db").exists()


@pytest.mark.parametrize(
    "command",
    [["hgs", "init"], ["hgs", "import-state", "--in", __file__, "--key-file", __file__]],
    ids=["init", "import-state"],
)
def test_store_etcd_options_without_an_endpoint_are_refused(
    tmp_path: Path, command: list[str]
) -> None:
    result = CliRunner().invoke(
        cli, [*command, "--dir", str(tmp_path / "hgs"), "--store-etcd-user", "hgs"]
    )
    assert result.exit_code != 0
    assert "--store-etcd URL" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "hgs").exists()


def test_an_sqlite_hgs_has_no_etcd_settings(tmp_path: Path) -> None:
    init_state(tmp_path / "hgs", HgsConfig(service_name="x"))
    with pytest.raises(UsageError, match="not keep its state in etcd"):
        HgsState(tmp_path / "hgs").etcd_settings()


# --- opening the store -----------------------------------------------------------


def test_open_store_opens_etcd_and_fails_early_when_it_is_down(
    tmp_path: Path, etcd_server: EtcdCluster
) -> None:
    init_state(tmp_path / "up", etcd_config(etcd_server.endpoints, new_prefix()))
    store = open_store(HgsState(tmp_path / "up"))
    try:
        assert isinstance(store, EtcdStore)
        revision = store.put("probe", b"1")
        assert store.current_revision() == revision
    finally:
        store.close()
    init_state(tmp_path / "down", etcd_config(["http://127.0.0.1:9"], "x/", timeout=0.5))
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:9"):
        open_store(HgsState(tmp_path / "down"))


# --- two HGS nodes on one etcd ---------------------------------------------------


@pytest.fixture
def two_nodes(tmp_path: Path, etcd_server: EtcdCluster) -> tuple[RunningHgs, RunningHgs]:
    prefix = new_prefix()
    init_state(tmp_path / "node-a", etcd_config(etcd_server.endpoints, prefix, max_txn_ops=512))
    shutil.copytree(tmp_path / "node-a", tmp_path / "node-b")  # a cluster's nodes share keys
    # node-a serves with one worker process, node-b with two: three store clients.
    nodes = []
    try:
        for name in ("node-a", "node-b"):
            nodes.append(start_hgs(tmp_path / name, init=False, workers=len(nodes) + 1))
        yield nodes[0], nodes[1]  # type: ignore[misc]
    finally:
        for node in nodes:
            node.stop()
        etcd_server.wipe(prefix)


def test_two_hgs_nodes_on_one_etcd_share_nonces_hosts_and_the_audit_chain(
    two_nodes: tuple[RunningHgs, RunningHgs],
) -> None:
    node_a, node_b = two_nodes
    signing = ECKey.generate_key("P-256")
    key = HostKey(jose.thumbprint(signing), "host-k", jose.public_jwk(signing))
    store = open_store(HgsState(node_a.directory))
    try:
        reg.Registry.trust_txn([
            (reg.MODES_KEY, [AttestationMode.HOST_KEY.value]),
            (reg.HOST_KEYS + key.key_id, key.to_dict()),
        ]).commit(store)  # fmt: skip
        client_a = HgsAttestationClient(node_a.url, Path(node_a.ca))
        client_b = HgsAttestationClient(node_b.url, Path(node_b.ca))
        try:
            nonce = client_a.challenge()
            evidence = host_key_evidence(signing, nonce=nonce, host_key=HOST_KEY).to_dict()
            status, body = client_b.attest(nonce, evidence)  # node B saw A's registration
            replay_status, replay = client_a.attest(nonce, evidence)  # consumed at B
            second = client_b.challenge()
            other = host_key_evidence(signing, nonce=second, host_key=HOST_KEY).to_dict()
            status_a, body_a = client_a.attest(second, other)
        finally:
            client_a.close()
            client_b.close()
        report = verify(store)
    finally:
        store.close()
    assert status == 200, body
    assert body["health_certificate"]
    assert status_a == 200, body_a
    assert replay_status != 200
    assert "already used" in json.dumps(replay)
    # One success at each node, two records in one chain that verifies (the replay is
    # refused before anything is written).
    assert (report.records, report.outcomes) == (2, {"success": 2})
