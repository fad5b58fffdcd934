"""The agent's logic with in-memory fakes: scheduling, backoff, failover, on-demand, recovery.

The HGS, the TPM and the KPS are replaced by fakes here so that each rule is
checked alone and fast; test_host_agent_e2e.py runs the same agent against real
HGS processes and swtpm TPMs.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey

from guardfab.errors import TransportError, UsageError
from guardfab.formats import jose
from guardfab.formats.health_certificate import HealthCertificate, issue_health_certificate
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.host.agent import (
    GuardedHostAgent,
    HostNotGuardedError,
    SiteSelector,
    backoff_delay,
)
from guardfab.host.attestation import (
    AttestationAnswer,
    AttestationRefusedError,
    HgsUnavailableError,
)
from guardfab.host.config import HgsSite, HostConfig, HostMode, RetrySettings
from guardfab.host.keyrelease import KeyReleaseRefusedError
from guardfab.host.keyrequest import ReleasedKeys
from guardfab.host.keys import load_or_create_key
from guardfab.host.status import StateFiles
from guardfab.host.tpm import TpmDeviceError
from host_agent_harness import FakeClock, FakeKeyReleaser
from pdk_forgeries import SECRET_MARKERS, SECRETS

PRIMARY = HgsSite("https://hgs1.example", "https://hgs1.example")
FALLBACK = HgsSite("https://hgs2.example", "https://hgs2.example")
START = 1_900_000_000.0
SIGNER = ECKey.generate_key("P-256")
REFUSAL = {
    "status": "InsecureHostConfiguration",
    "failed_policies": ["Hgs_SecureBootEnabled"],
    "failures": [],
    "verdicts": [{"policy": "Hgs_SecureBootEnabled", "blocking": True, "reason": "off"}],
}


@dataclass
class FakeClient:
    url: str
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeAttester:
    """Answers per URL: 'pass', 'down', 'refuse' or 'tpm-broken'; certificates from the clock."""

    clock: FakeClock
    host_key: dict[str, Any]
    behaviour: dict[str, str] = field(default_factory=dict)
    lifetime: int = 8 * 3600
    calls: list[str] = field(default_factory=list)
    delay: float = 0.0

    @property
    def ak_name(self) -> str | None:
        return "000bak"

    def attest(self, client: Any) -> AttestationAnswer:
        self.calls.append(client.url)
        time.sleep(self.delay)
        what = self.behaviour.get(client.url, "pass")
        if what == "down":
            raise HgsUnavailableError(f"HGS at {client.url} unreachable (ConnectError)")
        if what == "refuse":
            raise AttestationRefusedError(dict(REFUSAL))
        if what == "tpm-broken":
            raise TpmDeviceError("TPM connection (device) failed: no such file")
        now = int(self.clock.now())
        cert = HealthCertificate("hgs", "host-a", "tpm", self.host_key, now, now + self.lifetime)
        token = issue_health_certificate(cert, SIGNER)
        return AttestationAnswer(token, cert.expires_at, {"status": "Passed"})


@dataclass
class FakeKps(FakeKeyReleaser):
    """The in-memory KPS, which also opens shielding data: it answers SECRETS for any PDK."""

    pdks: list[bytes] = field(default_factory=list)

    def open_shielding_data(
        self, url: str, ca_file: Path, health_certificate: str, pdk: bytes, host_key: Any
    ) -> ShieldingSecrets:
        assert ca_file.exists()
        if url in self.down:
            raise TransportError(f"KPS at {url} unreachable (ConnectError)")
        self.calls.append((url, health_certificate))
        self.pdks.append(pdk)
        return SECRETS


@dataclass
class Host:
    config: HostConfig
    clock: FakeClock
    attester: FakeAttester
    releaser: FakeKps
    agent: GuardedHostAgent


def make_host(tmp_path: Path, *, fallback: bool = True, **retry: float) -> Host:
    (tmp_path / "keys").mkdir(mode=0o700, exist_ok=True)
    key_path = tmp_path / "keys" / "enc.pem"
    key = load_or_create_key(key_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("not used by the fakes")
    settings = dict(initial_delay=5.0, max_delay=40.0, jitter=0.0, failback_after=100.0)
    config = HostConfig(
        mode=HostMode.TPM,
        primary=PRIMARY,
        fallback=FALLBACK if fallback else None,
        ca_file=ca,
        encryption_key=key_path,
        state_dir=tmp_path / "state",
        socket=tmp_path / "run" / "agent.sock",
        retry=RetrySettings(**(settings | retry)),
    )
    clock = FakeClock(START)
    attester = FakeAttester(clock, jose.public_jwk(key))
    releaser = FakeKps()
    agent = GuardedHostAgent(
        config,
        attester,
        releaser,
        key,
        clock=clock,
        rng=random.Random(1),
        client_factory=lambda url, ca, timeout: FakeClient(url),  # type: ignore[arg-type,return-value]
    )
    agent.recover()
    return Host(config, clock, attester, releaser, agent)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return make_host(tmp_path)


# --------------------------------------------------------------------------- pure parts


def test_backoff_doubles_up_to_the_bound_and_jitter_only_shortens() -> None:
    retry = RetrySettings(initial_delay=5, max_delay=40, jitter=0)
    rng = random.Random(0)
    assert [backoff_delay(n, retry, rng) for n in range(1, 7)] == [5, 10, 20, 40, 40, 40]
    assert backoff_delay(10_000, retry, rng) == 40, "no overflow after days of failures"
    jittered = replace(retry, jitter=0.25)
    delays = [backoff_delay(3, jittered, rng) for _ in range(200)]
    assert all(15 <= d <= 20 for d in delays)
    assert len(set(delays)) > 100, "hosts that failed together retry apart"


def test_site_order_fails_over_then_back_after_the_failback_interval() -> None:
    sites = SiteSelector((PRIMARY, FALLBACK), failback_after=100)
    assert sites.order(0) == (PRIMARY, FALLBACK)
    sites.unavailable(PRIMARY, 10)
    assert sites.order(50) == (FALLBACK, PRIMARY)
    sites.unavailable(PRIMARY, 60)  # still down: the interval runs from the first failure
    assert sites.order(110) == (PRIMARY, FALLBACK)
    sites.answered(PRIMARY)
    assert sites.order(111) == (PRIMARY, FALLBACK)
    assert sites.order(0, use_fallback=True) == (FALLBACK,)
    with pytest.raises(UsageError, match="no fallback"):
        SiteSelector((PRIMARY,), 100).order(0, use_fallback=True)


# --------------------------------------------------------------------------- attestation


def test_success_caches_the_certificate_and_schedules_renewal_at_75_percent(host: Host) -> None:
    status = host.agent.attest_now()
    assert (status.attestation_status, status.served_by) == ("Passed", PRIMARY.attestation_url)
    assert status.certificate_expires_at == START + 8 * 3600
    assert status.next_attempt == START + 6 * 3600
    assert status.ak_name == "000bak"
    files = StateFiles(host.config.state_dir)
    assert files.certificate_path.stat().st_mode & 0o777 == 0o600
    assert files.status_path.stat().st_mode & 0o777 == 0o644
    assert files.dir.stat().st_mode & 0o777 == 0o700
    saved = files.load_status()
    assert saved is not None
    assert saved.attestation_status == "Passed"


def test_primary_down_uses_the_fallback_in_the_same_attempt(host: Host) -> None:
    host.attester.behaviour[PRIMARY.attestation_url] = "down"
    status = host.agent.attest_now()
    assert host.attester.calls == [PRIMARY.attestation_url, FALLBACK.attestation_url]
    assert (status.served_by, status.using_fallback) == (FALLBACK.attestation_url, True)
    host.attester.calls.clear()
    host.attester.behaviour.clear()
    host.clock.advance(50)
    host.agent.attest_now()
    assert host.attester.calls == [FALLBACK.attestation_url], "no timeout on the primary again"
    host.clock.advance(60)
    status = host.agent.attest_now()
    assert host.attester.calls[-1] == PRIMARY.attestation_url
    assert not status.using_fallback


def test_no_hgs_answers_is_a_transient_error_and_the_certificate_is_kept(host: Host) -> None:
    host.agent.attest_now()
    host.clock.advance(6 * 3600)
    host.attester.behaviour = {PRIMARY.attestation_url: "down", FALLBACK.attestation_url: "down"}
    status = host.agent.attest_now()
    assert status.attestation_status == "TransientError"
    assert [f["check"] for f in status.failures] == ["hgs-reachable", "hgs-reachable"]
    assert status.is_guarded(host.clock.now()), "still guarded until the certificate expires"
    assert status.next_attempt == host.clock.now() + 5
    assert StateFiles(host.config.state_dir).load_certificate() is not None


def test_a_refusal_ends_the_guarded_state_at_once(host: Host) -> None:
    host.agent.attest_now()
    host.attester.behaviour[PRIMARY.attestation_url] = "refuse"
    status = host.agent.attest_now()
    assert status.attestation_status == "InsecureHostConfiguration"
    assert status.sub_status == ["Hgs_SecureBootEnabled"]
    assert status.failures[0]["check"] == "Hgs_SecureBootEnabled"
    assert host.attester.calls[-1] == PRIMARY.attestation_url, "a refusal does not fail over"
    assert not status.is_guarded(host.clock.now())
    assert StateFiles(host.config.state_dir).load_certificate() is None
    with pytest.raises(HostNotGuardedError, match=r"InsecureHostConfiguration \(Hgs_SecureBoot"):
        host.agent.release(b"kp")


def test_a_broken_tpm_is_a_host_error_with_its_fix(host: Host) -> None:
    host.attester.behaviour[PRIMARY.attestation_url] = "tpm-broken"
    status = host.agent.attest_now()
    assert status.attestation_status == "HostError"
    assert status.failures[0]["check"] == "host"
    assert "guardfab host diagnose" in status.failures[0]["hint"]
    assert status.consecutive_failures == 1


def test_use_fallback_attests_to_the_fallback_only(host: Host) -> None:
    status = host.agent.attest_now(use_fallback=True)
    assert host.attester.calls == [FALLBACK.attestation_url]
    assert status.using_fallback


# --------------------------------------------------------------------------- key release


def test_key_request_attests_on_demand_and_again_after_expiry(host: Host) -> None:
    keys = host.agent.release(b"kp-1")
    assert isinstance(keys, ReleasedKeys)
    assert len(host.attester.calls) == 1
    host.agent.release(b"kp-2")
    assert len(host.attester.calls) == 1, "a valid certificate is reused"
    host.clock.advance(8 * 3600 - 20)  # less than min_validity (30 s) left
    host.agent.release(b"kp-3")
    assert len(host.attester.calls) == 2
    assert [url for url, _ in host.releaser.calls] == [PRIMARY.key_protection_url] * 3


def test_key_request_goes_to_the_fallback_kps_when_the_primary_is_down(host: Host) -> None:
    host.releaser.down.add(PRIMARY.key_protection_url)
    host.agent.release(b"kp")
    assert [url for url, _ in host.releaser.calls] == [FALLBACK.key_protection_url]
    host.releaser.down.add(FALLBACK.key_protection_url)
    with pytest.raises(TransportError):
        host.agent.release(b"kp")


def test_kps_refusing_the_certificate_makes_the_agent_attest_once_more(host: Host) -> None:
    refusals = [KeyReleaseRefusedError(401, "certificate-expired", "expired", None)]
    real = host.releaser.release

    def release(*args: Any) -> ReleasedKeys:
        if refusals:
            raise refusals.pop()
        return real(*args)

    host.releaser.release = release  # type: ignore[method-assign]
    host.agent.release(b"kp")
    assert len(host.attester.calls) == 2
    refusals.append(KeyReleaseRefusedError(409, "rollback", "older generation", None))
    with pytest.raises(KeyReleaseRefusedError, match="rollback"):
        host.agent.release(b"kp")
    assert len(host.attester.calls) == 2, "a refused KP is not an attestation problem"


def test_a_burst_of_key_requests_causes_one_attestation(host: Host) -> None:
    host.attester.delay = 0.2
    errors: list[BaseException] = []

    def request() -> None:
        try:
            host.agent.release(b"kp")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(host.attester.calls) == 1
    assert len(host.releaser.calls) == 8


# --------------------------------------------------------------------------- shielding data


def test_opening_a_pdk_attests_on_demand_and_reuses_the_certificate(host: Host) -> None:
    assert host.agent.open_shielding_data(b"pdk-1") == SECRETS
    assert len(host.attester.calls) == 1
    host.agent.release(b"kp")
    assert host.agent.open_shielding_data(b"pdk-2") == SECRETS
    assert len(host.attester.calls) == 1, "one certificate serves keys and shielding data"
    assert host.releaser.pdks == [b"pdk-1", b"pdk-2"]
    assert [url for url, _ in host.releaser.calls] == [PRIMARY.key_protection_url] * 3
    assert len({cert for _, cert in host.releaser.calls}) == 1


def test_opening_a_pdk_goes_to_the_fallback_kps_when_the_primary_is_down(host: Host) -> None:
    host.releaser.down.add(PRIMARY.key_protection_url)
    assert host.agent.open_shielding_data(b"pdk") == SECRETS
    assert [url for url, _ in host.releaser.calls] == [FALLBACK.key_protection_url]
    host.releaser.down.add(FALLBACK.key_protection_url)
    with pytest.raises(TransportError):
        host.agent.open_shielding_data(b"pdk")


def test_a_refused_certificate_is_renewed_once_a_refused_pdk_is_not(host: Host) -> None:
    refusals = [KeyReleaseRefusedError(401, "certificate-expired", "expired", None)]
    real = host.releaser.open_shielding_data

    def open_pdk(*args: Any) -> ShieldingSecrets:
        if refusals:
            raise refusals.pop()
        return real(*args)

    host.releaser.open_shielding_data = open_pdk  # type: ignore[method-assign]
    assert host.agent.open_shielding_data(b"pdk") == SECRETS
    assert len(host.attester.calls) == 2
    refusals.append(KeyReleaseRefusedError(404, "pdk-for-another-fabric", "foreign", None))
    with pytest.raises(KeyReleaseRefusedError, match="pdk-for-another-fabric"):
        host.agent.open_shielding_data(b"pdk")
    assert len(host.attester.calls) == 2, "a refused PDK is not an attestation problem"


def test_an_unhealthy_host_gets_no_shielding_data(host: Host) -> None:
    host.attester.behaviour[PRIMARY.attestation_url] = "refuse"
    with pytest.raises(HostNotGuardedError, match="InsecureHostConfiguration"):
        host.agent.open_shielding_data(b"pdk")
    assert host.releaser.calls == [], "nothing was asked of the KPS"


def test_opened_secrets_never_reach_the_log(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = host.agent.open_shielding_data(b"pdk")
    logging.getLogger("test").info("opened %r", secrets)  # as a careless caller would
    assert "shielding data opened by" in caplog.text
    assert not any(marker.decode() in caplog.text for marker in SECRET_MARKERS)


# --------------------------------------------------------------------------- recovery


def test_restart_reuses_a_valid_cached_certificate(tmp_path: Path) -> None:
    first = make_host(tmp_path)
    first.agent.attest_now()
    second = make_host(tmp_path)  # same state directory and key: a restart
    status = second.agent.status()
    assert status.attestation_status == "Passed"
    assert status.next_attempt == START + 6 * 3600
    second.agent.release(b"kp")
    assert second.attester.calls == [], "no attestation after a restart"


def test_restart_attests_again_if_the_certificate_expired_or_names_another_key(
    tmp_path: Path,
) -> None:
    make_host(tmp_path).agent.attest_now()
    later = make_host(tmp_path)
    later.clock.advance(8 * 3600)
    later.agent.recover()
    assert later.agent.next_attempt() == later.clock.now()
    (tmp_path / "keys" / "enc.pem").unlink()  # a new host encryption key
    rekeyed = make_host(tmp_path)
    assert rekeyed.agent.status().certificate_expires_at is None
    assert rekeyed.agent.next_attempt() == START


def test_a_corrupt_cache_is_ignored_not_fatal(tmp_path: Path) -> None:
    make_host(tmp_path).agent.attest_now()
    files = StateFiles(tmp_path / "state")
    files.certificate_path.write_text('{"health_certificate": 5}')
    files.status_path.write_text("[not a status")
    host = make_host(tmp_path)
    assert host.agent.status().certificate_expires_at is None
    assert host.agent.attest_now().attestation_status == "Passed"


# --------------------------------------------------------------------------- scheduler


def test_scheduler_renews_retries_and_stops(host: Host) -> None:
    thread = threading.Thread(target=host.agent.run)
    thread.start()
    try:
        _wait(lambda: len(host.attester.calls) == 1)
        host.clock.advance(6 * 3600 - 1)
        time.sleep(0.1)
        assert len(host.attester.calls) == 1
        host.attester.behaviour = {
            PRIMARY.attestation_url: "down",
            FALLBACK.attestation_url: "down",
        }
        host.clock.advance(1)
        _wait(lambda: len(host.attester.calls) == 3)  # the renewal tried both
        host.attester.behaviour.clear()
        host.clock.advance(5)  # the backoff delay
        _wait(lambda: host.agent.status().attestation_status == "Passed")
        assert host.agent.status().last_success == START + 6 * 3600 + 5
    finally:
        host.agent.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()


def _wait(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
