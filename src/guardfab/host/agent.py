"""The guarded-host agent: keep a valid health certificate, and use it to get VM keys.

Design (threads, not asyncio: the TPM, tpm2-pytss and httpx's sync client are all
blocking, and there are only two kinds of work):

* **one scheduler loop** (:meth:`GuardedHostAgent.run`) attests at start, again
  after 75% of the certificate's life, and after a failure with exponential
  backoff and jitter, bounded by ``retry.max_delay``;
* **request handlers** (the local socket's threads, :mod:`guardfab.host.localapi`)
  call :meth:`GuardedHostAgent.release`, :meth:`GuardedHostAgent.open_shielding_data`
  and :meth:`GuardedHostAgent.attest_now`. A KPS request (a VM's keys, or its
  shielding data during provisioning) that finds no usable certificate attests
  on demand first; both kinds share :meth:`GuardedHostAgent._ask_kps`.

One lock serializes attestations (the TPM is used by one thread at a time and a
burst of key requests causes one attestation, not one each); another guards the
status and the certificate, which every thread reads.

Failover: the primary HGS is tried first; when it does not answer, the fallback
is tried in the same attempt, and the agent then keeps using the fallback first
for ``retry.failback_after`` seconds before giving the primary the first try again.
Only "did not answer" fails over: an HGS that refused the host would refuse it
on every node of the cluster.

Time comes from an injected :class:`Clock`, so tests reach the renewal point or
an expiry by moving a fake clock, not by sleeping for hours.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TypeVar

from guardfab.errors import GuardfabError, TransportError, UsageError
from guardfab.formats import jose
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.host.attestation import (
    AttestationAnswer,
    AttestationRefusedError,
    HgsAttestationClient,
    HgsUnavailableError,
)
from guardfab.host.attester import Attester
from guardfab.host.config import HgsSite, HostConfig, RetrySettings
from guardfab.host.keyrelease import KeyReleaseRefusedError
from guardfab.host.keyrequest import KeyReleaser, ReleasedKeys
from guardfab.host.status import (
    AgentStatus,
    CachedCertificate,
    HostStatus,
    StateFiles,
    failure_entry,
)

logger = logging.getLogger(__name__)

#: The scheduler re-reads the clock at least this often (suspend, clock steps).
MAX_SLEEP = 60.0
#: KPS refusals after which a fresh certificate may succeed: HTTP 401 (the
#: certificate) and these reasons.
_REATTEST_STATUS = 401
_REATTEST_REASONS = frozenset({"certificate-expired", "issued-before-deny-date"})

ClientFactory = Callable[[str, Path, float], HgsAttestationClient]
#: What one KPS request returns (keys, or shielding secrets).
Answer = TypeVar("Answer")
#: One KPS request: (KPS URL, health certificate) -> its answer.
KpsRequest = Callable[[str, str], Answer]


class Clock(Protocol):
    """Wall-clock time and an interruptible sleep."""

    def now(self) -> float:
        """Seconds since the epoch."""

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        """Wait ``seconds``, or less if ``wake`` is set."""


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        """``time.time()``."""
        return time.time()

    def sleep(self, seconds: float, wake: threading.Event) -> None:
        """Wait on ``wake`` for at most ``seconds``."""
        wake.wait(max(0.0, seconds))


class HostNotGuardedError(GuardfabError):
    """A key request found no usable health certificate, and attesting did not give one."""

    hint = "see 'guardfab host status' for why, and 'guardfab host diagnose' for the fix"


class NoHgsAnsweredError(HgsUnavailableError):
    """No configured HGS answered (primary nor fallback); ``failures`` says why for each."""

    def __init__(self, failures: list[dict[str, str]]) -> None:
        super().__init__("no HGS answered: " + "; ".join(f["reason"] for f in failures))
        self.failures = failures


def backoff_delay(failures: int, retry: RetrySettings, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive failed attempts.

    Doubles from ``initial_delay`` up to ``max_delay``; up to ``jitter`` of it is
    removed at random so that hosts that failed together retry apart.
    """
    exponent = min(max(failures - 1, 0), 32)
    base = min(retry.max_delay, retry.initial_delay * 2.0**exponent)
    return base * (1.0 - retry.jitter * rng.random())


class SiteSelector:
    """Which HGS to try first: the primary, unless it recently did not answer."""

    def __init__(self, sites: tuple[HgsSite, ...], failback_after: float) -> None:
        self._primary, *rest = sites
        self._fallbacks = tuple(rest)
        self._failback_after = failback_after
        self._primary_down_since: float | None = None

    def order(self, now: float, *, use_fallback: bool = False) -> tuple[HgsSite, ...]:
        """The sites to try, in order.

        Raises:
            UsageError: ``use_fallback`` without a configured fallback.
        """
        if use_fallback:
            if not self._fallbacks:
                raise UsageError("no fallback HGS is configured", hint="see 'host configure'")
            return self._fallbacks
        down = self._primary_down_since
        if down is not None and now - down < self._failback_after:
            return (*self._fallbacks, self._primary)
        return (self._primary, *self._fallbacks)

    def is_primary(self, site: HgsSite) -> bool:
        """Whether ``site`` is the primary HGS."""
        return site == self._primary

    def unavailable(self, site: HgsSite, now: float) -> None:
        """Note that ``site`` did not answer."""
        if site == self._primary and self._primary_down_since is None:
            self._primary_down_since = now

    def answered(self, site: HgsSite) -> None:
        """Note that ``site`` answered (the primary is back in first place)."""
        if site == self._primary:
            self._primary_down_since = None


class GuardedHostAgent:
    """Keeps this host's health certificate and releases VM keys with it.

    Args:
        config: the host configuration.
        attester: builds evidence for the configured mode.
        releaser: asks a KPS for a VM's keys.
        encryption_key: the host encryption key (the certificate's ``cnf``).
        clock: time source and sleeper (tests pass a fake one).
        rng: randomness for jitter.
        client_factory: makes an attestation client for a URL, CA and timeout.
    """

    def __init__(
        self,
        config: HostConfig,
        attester: Attester,
        releaser: KeyReleaser,
        encryption_key: jose.AsymmetricKey,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self.config = config
        self._attester = attester
        self._releaser = releaser
        self._key = encryption_key
        self._key_id = jose.thumbprint(encryption_key)
        self.clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._new_client = client_factory or _https_client
        self._files = StateFiles(config.state_dir)
        self._sites = SiteSelector(config.sites, config.retry.failback_after)
        self._state_lock = threading.Lock()
        self._attest_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._cert: CachedCertificate | None = None
        self._status = AgentStatus(mode=config.mode.value)

    # ------------------------------------------------------------------ state

    def status(self) -> AgentStatus:
        """A copy of the current status."""
        with self._state_lock:
            return replace(
                self._status,
                sub_status=list(self._status.sub_status),
                failures=list(self._status.failures),
            )

    def recover(self) -> None:
        """Pick up where a previous run left off: its status and its certificate.

        A cached certificate that is still usable and names this host's current
        encryption key is reused (no attestation, no activation); otherwise the
        agent attests at once.
        """
        self._files.ensure()
        now = self.clock.now()
        try:
            previous = self._files.load_status()
        except GuardfabError as exc:
            logger.warning("ignoring the previous status file: %s", exc)
            previous = None
        cached = self._files.load_certificate()
        if cached is not None and cached.host_key_id != self._key_id:
            logger.info("the cached certificate names another host key; attesting again")
            cached = None
        with self._state_lock:
            if previous is not None:
                self._status = replace(previous, mode=self.config.mode.value)
            if cached is not None and cached.usable(now, self.config.renewal.min_validity):
                self._cert = cached
                self._status.certificate_expires_at = cached.local_expiry
                self._status.next_attempt = cached.renew_at(self.config.renewal.fraction)
                left = cached.local_expiry - now
                logger.info("reusing the cached health certificate (valid %.0f s more)", left)
            else:
                self._cert = None
                self._status.certificate_expires_at = None
                self._status.next_attempt = now
            self._status.consecutive_failures = 0
            self._save_status_locked(now)

    def _save_status_locked(self, now: float) -> None:
        self._status.updated_at = now
        try:
            self._files.save_status(self._status)
        except (GuardfabError, OSError) as exc:  # a full disk must not stop the agent
            logger.warning("cannot write the status file: %s", exc)

    # ------------------------------------------------------------------ attestation

    def attest_now(self, *, use_fallback: bool = False) -> AgentStatus:
        """Attest now (primary first, or only the fallback); return the new status.

        Never raises for an HGS refusal or outage: those are statuses.

        Raises:
            UsageError: ``use_fallback`` and no fallback is configured.
        """
        with self._attest_lock:
            return self._attest_locked(use_fallback)

    def _attest_locked(self, use_fallback: bool) -> AgentStatus:
        """One attempt; the caller holds the attestation lock."""
        now = self.clock.now()
        sites = self._sites.order(now, use_fallback=use_fallback)
        try:
            site, outcome = self._attest_sites(sites, now)
        except NoHgsAnsweredError as exc:
            self._record_failure(HostStatus.TRANSIENT_ERROR, exc.failures, now)
        except GuardfabError as exc:
            self._record_failure(HostStatus.HOST_ERROR, [failure_entry(exc, "host")], now)
        else:
            if isinstance(outcome, AttestationRefusedError):
                self._record_refusal(site, outcome, now)
            else:
                self._record_success(site, outcome, now)
        return self.status()

    def _attest_sites(
        self, sites: tuple[HgsSite, ...], now: float
    ) -> tuple[HgsSite, AttestationAnswer | AttestationRefusedError]:
        """Try each site until one answers; its answer may be a refusal."""
        failures: list[dict[str, str]] = []
        for site in sites:
            client = self._new_client(
                site.attestation_url, self.config.ca_file, self.config.retry.http_timeout
            )
            try:
                answer: AttestationAnswer | AttestationRefusedError = self._attester.attest(client)
            except HgsUnavailableError as exc:
                logger.warning("HGS %s did not answer: %s", site.attestation_url, exc)
                self._sites.unavailable(site, now)
                failures.append(failure_entry(exc, "hgs-reachable"))
                continue
            except AttestationRefusedError as exc:
                answer = exc
            finally:
                client.close()
            self._sites.answered(site)
            return site, answer
        raise NoHgsAnsweredError(failures)

    def _record_success(self, site: HgsSite, answer: AttestationAnswer, now: float) -> None:
        cached = CachedCertificate.from_answer(
            answer, now=now, served_by=site.attestation_url, host_key_id=self._key_id
        )
        self._files.save_certificate(cached)
        with self._state_lock:
            self._cert = cached
            status = self._status
            status.attestation_status = HostStatus.PASSED
            status.sub_status, status.failures = [], []
            status.last_attempt = status.last_success = now
            status.certificate_expires_at = cached.local_expiry
            status.served_by = site.attestation_url
            status.using_fallback = not self._sites.is_primary(site)
            status.consecutive_failures = 0
            status.next_attempt = cached.renew_at(self.config.renewal.fraction)
            status.ak_name = self._attester.ak_name or status.ak_name
            self._save_status_locked(now)
        logger.info(
            "attestation Passed at %s; certificate valid for %.0f s",
            site.attestation_url,
            cached.lifetime,
        )

    def _record_refusal(self, site: HgsSite, exc: AttestationRefusedError, now: float) -> None:
        """The HGS refused the host: it is not guarded any more, whatever it held."""
        body = exc.body
        self._files.drop_certificate()
        failures = [
            {
                "check": str(f.get("check")),
                "reason": str(f.get("reason")),
                "hint": str(f.get("hint") or ""),
            }
            for f in body.get("failures") or []
        ]
        failures += [
            {"check": str(v.get("policy")), "reason": str(v.get("reason")), "hint": ""}
            for v in body.get("verdicts") or []
            if v.get("blocking")
        ]
        with self._state_lock:
            self._cert = None
            self._status.certificate_expires_at = None
            self._status.served_by = site.attestation_url
            self._status.using_fallback = not self._sites.is_primary(site)
            self._status.sub_status = [str(p) for p in body.get("failed_policies") or []]
        self._record_failure(str(body.get("status") or "Refused"), failures, now, keep=True)

    def _record_failure(
        self, status_name: str, failures: list[dict[str, str]], now: float, *, keep: bool = False
    ) -> None:
        with self._state_lock:
            status = self._status
            status.attestation_status = status_name
            if not keep:
                status.sub_status = []
            status.failures = failures
            status.last_attempt = now
            status.consecutive_failures += 1
            delay = backoff_delay(status.consecutive_failures, self.config.retry, self._rng)
            next_attempt = now + delay
            if self._cert is not None and self._cert.usable(now):
                next_attempt = max(next_attempt, self._cert.renew_at(self.config.renewal.fraction))
            status.next_attempt = next_attempt
            status.certificate_expires_at = None if self._cert is None else self._cert.local_expiry
            self._save_status_locked(now)
        reasons = "; ".join(f["reason"] for f in failures)[:500]
        logger.warning(
            "attestation failed: %s (%s); next attempt in %.0f s",
            status_name,
            reasons,
            next_attempt - now,
        )

    # ------------------------------------------------------------------ key release

    def usable_certificate(self) -> CachedCertificate:
        """The current certificate, attesting first if there is no usable one.

        Raises:
            HostNotGuardedError: attesting did not give a certificate.
        """
        min_validity = self.config.renewal.min_validity
        cert = self._usable(min_validity)
        if cert is not None:
            return cert
        with self._attest_lock:  # one attestation for a burst of requests
            cert = self._usable(min_validity)
            if cert is not None:
                return cert
            status = self._attest_locked(use_fallback=False)
        cert = self._usable(min_validity)
        if cert is None:
            reasons = ", ".join(status.sub_status) or "; ".join(
                f["reason"] for f in status.failures
            )
            raise HostNotGuardedError(
                f"this host has no valid health certificate: {status.attestation_status}"
                + (f" ({reasons})" if reasons else "")
            )
        self._wake.set()  # the scheduler re-reads its next attempt
        return cert

    def _usable(self, min_validity: float) -> CachedCertificate | None:
        with self._state_lock:
            cert = self._cert
        return cert if cert is not None and cert.usable(self.clock.now(), min_validity) else None

    def release(self, kp: bytes) -> ReleasedKeys:
        """Get a VM's keys from the KPS with a usable health certificate.

        Raises:
            HostNotGuardedError: no certificate could be obtained.
            TransportError: no KPS answered.
            InvalidInputError: the KPS refused (the KP, or the certificate).
        """

        def release(url: str, certificate: str) -> ReleasedKeys:
            return self._releaser.release(url, self.config.ca_file, certificate, kp, self._key)

        return self._ask_kps(release, done="keys released")

    def open_shielding_data(self, pdk: bytes) -> ShieldingSecrets:
        """Have the KPS open a VM's shielding data (PDK) for this host, for provisioning.

        The same certificate rules as :meth:`release`. The secrets stay in memory
        (their repr is redacted): never logged, never written, never in an error.

        Raises:
            HostNotGuardedError: no certificate could be obtained.
            TransportError: no KPS answered.
            InvalidInputError: the PDK does not load (nothing is sent), the KPS
                refused (the PDK, or the certificate), or its answer did not verify.
        """

        def open_pdk(url: str, certificate: str) -> ShieldingSecrets:
            return self._releaser.open_shielding_data(
                url, self.config.ca_file, certificate, pdk, self._key
            )

        return self._ask_kps(open_pdk, done="shielding data opened")

    def _ask_kps(self, request: KpsRequest[Answer], *, done: str) -> Answer:
        """Run ``request`` with a usable certificate; attest once more if the KPS refuses it."""
        try:
            return self._ask_once(request, done=done)
        except KeyReleaseRefusedError as exc:
            if exc.status != _REATTEST_STATUS and exc.reason not in _REATTEST_REASONS:
                raise
            logger.info("the KPS refused the certificate (%s); attesting again", exc)
            with self._state_lock:
                self._cert = None
            return self._ask_once(request, done=done)

    def _ask_once(self, request: KpsRequest[Answer], *, done: str) -> Answer:
        """One try with the current (or a fresh) certificate: each KPS in failover order."""
        cert = self.usable_certificate()
        last: TransportError | None = None
        for site in self._sites.order(self.clock.now()):
            try:
                answer = request(site.key_protection_url, cert.token)
            except TransportError as exc:
                logger.warning("KPS %s did not answer: %s", site.key_protection_url, exc)
                last = exc
                continue
            logger.info("%s by %s", done, site.key_protection_url)
            return answer
        raise last or TransportError("no KPS is configured")

    # ------------------------------------------------------------------ scheduler

    def next_attempt(self) -> float:
        """When the scheduler attests next (the clock's time)."""
        with self._state_lock:
            due = self._status.next_attempt
        return self.clock.now() if due is None else due

    def run(self) -> None:
        """The scheduler loop, until :meth:`stop`; :meth:`recover` must have run."""
        while not self._stop.is_set():
            self._wake.clear()
            now, due = self.clock.now(), self.next_attempt()
            if now < due:
                self.clock.sleep(min(due - now, MAX_SLEEP), self._wake)
                continue
            try:
                self.attest_now()
            except Exception:  # the agent must outlive any one bug (logged with its traceback)
                logger.exception("unexpected error during attestation")
                with self._state_lock:
                    self._status.next_attempt = now + self.config.retry.max_delay

    def wake(self) -> None:
        """Make the scheduler look at the time and its next attempt again."""
        self._wake.set()

    def stop(self) -> None:
        """End :meth:`run` soon (it finishes an attestation in progress)."""
        self._stop.set()
        self._wake.set()


def _https_client(url: str, ca_file: Path, timeout: float) -> HgsAttestationClient:
    """The real attestation client; a missing or bad CA file is a configuration error."""
    try:
        return HgsAttestationClient(url, ca_file, timeout=timeout)
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"cannot use the HGS CA file {ca_file} ({type(exc).__name__})",
            hint="point 'ca_file' at the HGS's CA certificate (PEM), e.g. with 'host configure'",
        ) from exc
