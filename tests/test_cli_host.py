"""``guardfab host`` commands, and the whole set-up through the CLI alone.

The walkthrough test is what an administrator types: configure the host,
hand its identity and baseline to the HGS administrator (who registers them
with ``guardfab hgs``), attest, read the status; then a host whose boot measured
one application more is refused with the reason, and a host nobody registered is
UnauthorizedHost. Real HGS over HTTPS, real swtpm TPMs; no agent runs, so
``host attest`` attests itself and ``host status`` reads what it recorded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import swtpm_harness
from guardfab.attestation.trust import ek_digest
from guardfab.cli.main import cli
from guardfab.formats import jose, keyfiles
from guardfab.host.config import load_config
from guardfab.host.keys import load_or_create_key
from guardfab.host.tpm import HostTpm
from hgs_harness import RunningHgs, start_hgs
from host_agent_harness import serve_hgs
from swtpm_harness import Swtpm, simulate_measured_boot
from test_attestation_fixtures import CI_POLICY_FILE, Boot

tpm_factory = swtpm_harness.tpm_factory
start_swtpm = swtpm_harness.start_swtpm
swtpm = swtpm_harness.swtpm

GOLDEN = Boot().log_bytes()
COMMANDS = ["configure", "status", "attest", "identity", "baseline", "diagnose", "agent"]


@pytest.fixture(scope="module")
def hgs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHgs]:
    """One HGS for the tests that only need its URL and CA (nothing is registered)."""
    running = start_hgs(tmp_path_factory.mktemp("cli-host") / "hgs")
    try:
        yield running
    finally:
        running.stop()


def run(*args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == code, result.output + str(result.exception or "")
    return result


def booted(start: Callable[[str], Swtpm], name: str, log: bytes) -> Swtpm:
    device = start(name)
    with HostTpm(device.tcti) as tpm:
        simulate_measured_boot(tpm, log)
    return device


def configure_host(root: Path, hgs: RunningHgs, device: Swtpm | None, *extra: str) -> Path:
    """'host configure' for a host under ``root``; returns the configuration path."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "etc" / "host.json"
    mode = ["--mode", "tpm", "--tcti", device.tcti] if device else ["--mode", "host-key"]
    run(
        "host",
        "configure",
        "--config",
        str(config),
        *mode,
        "--attestation-url",
        hgs.url,
        "--key-protection-url",
        hgs.url,
        "--ca",
        hgs.ca,
        "--event-log",
        str(root / "binary_bios_measurements"),
        "--state-dir",
        str(root / "state"),
        "--socket",
        str(root / "run" / "agent.sock"),
        *extra,
    )
    return config


def hgs_admin(hgs: RunningHgs, *args: str) -> Result:
    return run("hgs", *args, "--dir", str(hgs.directory), "--url", hgs.url)


# --------------------------------------------------------------------------- help and configure


def test_every_command_explains_itself() -> None:
    assert "guarded host" in run("--help").output
    group = run("host", "--help").output
    for command in COMMANDS:
        assert command in group
        text = run("host", command, "--help").output
        assert len(text.split("Options:")[0].split("\n")) > 4, f"host {command} --help is thin"
        assert "--config" in text


def test_configure_writes_a_private_config_and_creates_the_keys(
    tmp_path: Path, hgs: RunningHgs
) -> None:
    config_path = configure_host(tmp_path, hgs, None)
    config = load_config(config_path)
    assert config_path.stat().st_mode & 0o777 == 0o600
    assert config.signing_key == config_path.parent / "host-signing.pem"
    for key in (config.encryption_key, config.signing_key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert config.state_dir.stat().st_mode & 0o777 == 0o700
    signing = load_or_create_key(config.signing_key).as_pem(private=True)

    data = json.loads(config_path.read_text())
    data["retry"]["max_delay"] = 77.0  # an administrator's tuning survives re-configuring
    config_path.write_text(json.dumps(data))
    configure_host(tmp_path, hgs, None, "--allowed-uid", "107")
    again = load_config(config_path)
    assert (again.retry.max_delay, again.allowed_uid) == (77.0, 107)
    assert load_or_create_key(config.signing_key).as_pem(private=True) == signing, "key kept"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--attestation-url", "http://hgs:80"], 1, "not an https URL"),
        (["--fallback-attestation-url", "https://hgs2"], 2, "give both fallback URLs"),
        (["--ca", "/etc/hostname"], 2, "not a readable PEM CA certificate"),
    ],
)
def test_configure_refuses_bad_settings_and_writes_nothing(
    tmp_path: Path, hgs: RunningHgs, args: list[str], code: int, message: str
) -> None:
    config = tmp_path / "host.json"
    base = {"--attestation-url": hgs.url, "--ca": hgs.ca}
    overrides = dict(zip(args[::2], args[1::2], strict=True))
    options = [x for k, v in (base | overrides).items() for x in (k, v)]
    if "--fallback-attestation-url" in overrides:
        options = [x for k, v in base.items() for x in (k, v)] + args
    result = run(
        "host",
        "configure",
        "--config",
        str(config),
        "--mode",
        "host-key",
        "--key-protection-url",
        hgs.url,
        *options,
        code=code,
    )
    assert message in result.output
    assert not config.exists()


def test_status_of_a_host_that_never_attested(tmp_path: Path, hgs: RunningHgs) -> None:
    config = configure_host(tmp_path, hgs, None)
    text = run("host", "status", "--config", str(config)).output
    assert "Is host guarded:" in text
    assert "no" in text.split("Is host guarded:")[1].split("\n")[0]
    assert "NotAttested" in text
    data = json.loads(run("host", "status", "--config", str(config), "--json").output)
    assert (data["is_host_guarded"], data["agent_running"]) == (False, False)
    assert data["attestation_url"] == hgs.url


def test_unconfigured_host_is_told_to_configure(tmp_path: Path) -> None:
    result = run("host", "status", "--config", str(tmp_path / "none.json"), code=2)
    assert "host configure" in result.output


# --------------------------------------------------------------------------- the walkthrough


@pytest.mark.slow
def test_walkthrough_guarded_host_then_tampered_and_unregistered_hosts_refused(
    tmp_path: Path, running_hgs: RunningHgs, start_swtpm: Callable[[str], Swtpm]
) -> None:
    hgs = running_hgs
    policy = tmp_path / "ima-policy"
    policy.write_bytes(CI_POLICY_FILE)
    good = tmp_path / "host-a"
    config = configure_host(
        good, hgs, booted(start_swtpm, "host-a", GOLDEN), "--ci-policy", str(policy)
    )
    (good / "binary_bios_measurements").write_bytes(GOLDEN)

    identity, log = good / "host-a.pem", good / "host-a.log"
    run("host", "identity", "--config", str(config), "--out", str(identity))
    run(
        "host",
        "baseline",
        "--config",
        str(config),
        "--name",
        "golden",
        "--out",
        str(good / "golden.json"),
        "--log-out",
        str(log),
    )
    hgs_admin(
        hgs,
        "host",
        "add-tpm",
        "--name",
        "host-a",
        "--ek-public",
        str(identity),
        "--ek-cert",
        str(identity),
    )
    hgs_admin(hgs, "baseline", "add", "--name", "golden", "--log", str(log))
    hgs_admin(hgs, "ci-policy", "add", "--name", "ima-appraise", "--file", str(policy))

    attested = run("host", "attest", "--config", str(config)).output
    assert "Attestation status:" in attested
    assert "Passed" in attested
    status = json.loads(run("host", "status", "--config", str(config), "--json").output)
    assert (status["is_host_guarded"], status["attestation_status"]) == (True, "Passed")
    assert status["served_by"] == hgs.url

    tampered = tmp_path / "host-b"
    extended = Boot(extra_app=b"unexpected.efi").log_bytes()
    config_b = configure_host(tampered, hgs, booted(start_swtpm, "host-b", extended))
    (tampered / "binary_bios_measurements").write_bytes(extended)
    run("host", "identity", "--config", str(config_b), "--out", str(tampered / "id.pem"))
    hgs_admin(hgs, "host", "add-tpm", "--name", "host-b", "--ek-public", str(tampered / "id.pem"))
    refused = run("host", "attest", "--config", str(config_b), code=1).output
    assert "InsecureHostConfiguration" in refused
    assert "Attestation sub-status:" in refused
    assert "Hgs_PcrBaseline" in refused
    shown = run("host", "status", "--config", str(config_b)).output
    assert "Hgs_PcrBaseline" in shown
    assert "not running (last recorded status)" in shown

    stranger = tmp_path / "host-c"
    config_c = configure_host(stranger, hgs, booted(start_swtpm, "host-c", GOLDEN))
    (stranger / "binary_bios_measurements").write_bytes(GOLDEN)
    run("host", "attest", "--config", str(config_c), code=1)
    status_c = json.loads(run("host", "status", "--config", str(config_c), "--json").output)
    assert (status_c["attestation_status"], status_c["is_host_guarded"]) == (
        "UnauthorizedHost",
        False,
    )


# --------------------------------------------------------------------------- identity, baseline


@pytest.mark.slow
def test_tpm_identity_is_what_the_hgs_registers(
    tmp_path: Path, hgs: RunningHgs, swtpm: Swtpm
) -> None:
    config = configure_host(tmp_path, hgs, swtpm)
    pem, doc = tmp_path / "id.pem", tmp_path / "id.json"
    run("host", "identity", "--config", str(config), "--out", str(pem))
    run("host", "identity", "--config", str(config), "--out", str(doc), "--format", "json")
    with HostTpm(swtpm.tcti) as tpm:
        ek = tpm.read_ek()
    data = pem.read_bytes()
    key = serialization.load_pem_public_key(data)
    cert = x509.load_pem_x509_certificate(data)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    assert ek_digest(cert) == ek_digest(ek.public)
    document = json.loads(doc.read_text())
    assert document["ek_digest"] == ek_digest(ek.public).hex()
    assert document["ek_certificate_matches"] is True
    assert b"PRIVATE" not in data
    again = run("host", "identity", "--config", str(config), "--out", str(pem), code=2)
    assert "already exists" in again.output


def test_host_key_identity_is_the_public_signing_key(tmp_path: Path, hgs: RunningHgs) -> None:
    config = load_config(configure_host(tmp_path, hgs, None))
    assert config.signing_key is not None
    out = tmp_path / "id.pem"
    run("host", "identity", "--config", str(tmp_path / "etc" / "host.json"), "--out", str(out))
    public = keyfiles.load_public_key(out.read_bytes(), what="identity")
    assert jose.thumbprint(public) == jose.thumbprint(load_or_create_key(config.signing_key))
    assert b"PRIVATE" not in out.read_bytes()


def test_baseline_captures_this_hosts_log(tmp_path: Path, hgs: RunningHgs) -> None:
    from guardfab.attestation.baseline import baseline_from_log  # noqa: PLC0415

    config = configure_host(tmp_path, hgs, None)
    (tmp_path / "binary_bios_measurements").write_bytes(GOLDEN)
    out, log = tmp_path / "b.json", tmp_path / "b.log"
    run(
        "host",
        "baseline",
        "--config",
        str(config),
        "--name",
        "golden",
        "--out",
        str(out),
        "--log-out",
        str(log),
    )
    assert json.loads(out.read_text()) == baseline_from_log("golden", GOLDEN).to_dict()
    assert log.read_bytes() == GOLDEN
    (tmp_path / "broken.log").write_bytes(b"\x00" * 100)
    result = run(
        "host",
        "baseline",
        "--config",
        str(config),
        "--name",
        "x",
        "--event-log",
        str(tmp_path / "broken.log"),
        "--out",
        str(tmp_path / "x.json"),
        code=1,
    )
    assert "error:" in result.output
    assert not (tmp_path / "x.json").exists()


# --------------------------------------------------------------------------- fallback


@pytest.mark.slow
def test_attest_use_fallback_goes_to_the_fallback_only(
    tmp_path: Path, running_hgs: RunningHgs, swtpm: Swtpm
) -> None:
    (tmp_path / "binary_bios_measurements").write_bytes(GOLDEN)
    second = serve_hgs(running_hgs.directory)
    try:
        config = configure_host(
            tmp_path,
            running_hgs,
            swtpm,
            "--fallback-attestation-url",
            second.url,
            "--fallback-key-protection-url",
            second.url,
        )
        result = run(
            "host", "attest", "--config", str(config), "--use-fallback", "--json", code=1
        )  # not registered: refused, by the fallback
        data = json.loads(result.output)
        assert (data["attestation_status"], data["served_by"]) == ("UnauthorizedHost", second.url)
        assert data["using_fallback"] is True
        second.stop()
        down = run("host", "attest", "--config", str(config), "--use-fallback", code=3).output
        assert "TransientError" in down
        assert "unreachable" in down
    finally:
        second.stop()
