"""The Key Protection Service inside the HGS: the pure release wired to the store and audit log.

:func:`guardfab.keyprotection.release` decides; this module feeds it the trusted
state and records the outcome. Store layout (canonical JSON values)::

    kps/version                 bumped by every configuration change (cache key)
    kps/signers/<kid>           {"jwk", "source", "added_at"}  trusted attestation signers
    kps/own-signer-distrusted   present once the administrator removed the HGS's own signer
    kps/deny-before             {"time"}  refuse certificates issued earlier
    kps/keys/primary            {"id", "key_generation"}  the primary KPS guardian and
                                its current key generation (else the oldest, newest)
    kps/generations/<kp_id>/<owner>
                                {"generation", "at"}  newest generation issued per KP
                                (per kp_id AND owner: a copied kp_id counts apart)
    kps/seen/<kp_id>/<owner>    {"kps_key", "key_generation", "owner", "generation",
                                 "host_id", "at"}  the KPS key the last egress is wrapped to

Stores written before the counter included the owner hold ``kps/generations/<kp_id>``
and ``kps/seen/<kp_id>``: a KP with no counter of its own yet is held to the old
counter of its kp_id (never weaker than before), and every release writes the new keys.

A shielding data opening (``POST /keyprotection/v1/shielding-data/open``)
writes its audit record and nothing else, granted or refused: it consumes no
generation and changes no state (ADR 0010).

Each release is ONE store transaction: it compares ``kps/generations/<kp_id>/<owner>``
with the revision the check read (and ``kps/version`` and ``trust/version`` with
those it was decided under, see :mod:`guardfab.hgs.kps_release`), writes the new
generation and the ``seen`` record, and appends the audit record. Two concurrent
releases of one generation cannot both mint an egress KP: the second loses the
compare and is refused as a replay. A refusal appends its audit record only.

The HGS's own attestation signer is trusted by default without a record (a
fresh HGS releases to the hosts it attests, and starting a service writes
nothing); removing it like any other signer records that it is distrusted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardfab.errors import GuardfabError, UsageError
from guardfab.formats import jose
from guardfab.formats.guardian import KeyAlgorithm
from guardfab.hgs.audit_batch import LoopBatcher
from guardfab.hgs.kps_config import (
    MAX_PDK_TEXT,
    RELEASE_KIND,
    SEEN,
    VERSION_KEY,
    KpsConfig,
    KpsUnavailableError,
    decode_request_file,
    printable,
)
from guardfab.hgs.kps_keys import KpsKey, KpsKeyDirectory, key_ring, kps_guardian_name
from guardfab.hgs.kps_release import KeyReleases
from guardfab.hgs.kps_report import rotation_report
from guardfab.hgs.registry import Registry, decode, encode
from guardfab.hgs.service import HgsService
from guardfab.keyprotection import (
    KeyReleaseError,
    OpeningResult,
    ReleaseResult,
    ShieldingDataRejectedError,
    load_signer_keys,
    open_shielding_data,
    public_signer_jwk,
)
from guardfab.store.audit import AuditLog
from guardfab.store.base import Store, Txn

SIGNERS = "kps/signers/"
OWN_DISTRUSTED_KEY = "kps/own-signer-distrusted"
DENY_BEFORE_KEY = "kps/deny-before"
PRIMARY_KEY = "kps/keys/primary"
#: A deny-before date this far in the future is refused: it would deny every certificate.
MAX_DENY_BEFORE_SKEW = 60
#: The base64url text of the largest shielding data file.
#: Audit record kind of a shielding data opening (a release's: RELEASE_KIND).
OPENING_KIND = "shielding-data-open"
_AUDIT_MESSAGE_CHARS = 500


class KpsNotFoundError(UsageError):
    """An admin request named a signer or KPS key that does not exist."""


@dataclass(frozen=True)
class _Change:
    """One audited configuration change: what the audit record says and what is written."""

    kind: str
    subject: str
    outcome: str
    details: dict[str, Any] = field(default_factory=dict)
    puts: Sequence[tuple[str, Any]] = ()
    deletes: Sequence[str] = ()


def _config_txn(puts: Sequence[tuple[str, Any]] = (), deletes: Sequence[str] = ()) -> Txn:
    """A configuration change; it bumps ``kps/version`` so every worker reloads."""
    txn = Txn()
    for key, value in puts:
        txn.put(key, encode(value))
    for key in deletes:
        txn.delete(key)
    return txn.put(VERSION_KEY, b"")


class KpsService:
    """Key releases and KPS administration for one HGS (shared by request handlers)."""

    def __init__(self, service: HgsService, *, keys: KpsKeyDirectory | None = None) -> None:
        self.store: Store = service.store
        self.audit: AuditLog = service.audit
        self.registry: Registry = service.registry
        self.clock: Callable[[], float] = service.clock
        self.keys = keys or KpsKeyDirectory.of_state(service.state.dir)
        self.service_name = service.state.config.service_name
        self._lock = threading.Lock()
        self._cached: tuple[int, KpsConfig] | None = None
        self._own_signer: dict[str, Any] = service.signers()["keys"][0]
        #: Commits of the releases that reach them in one event-loop turn, shared.
        self.batcher: LoopBatcher = service.audit_batcher
        self._store_threads = service.store_threads
        self._releases = KeyReleases(self)

    # ----------------------------------------------------------------- configuration

    def config(self) -> KpsConfig:
        """The current configuration, reloaded only when ``kps/version`` moved."""
        return self._current_config()[1]

    def _current_config(self) -> tuple[int, KpsConfig]:
        """The current configuration and its ``kps/version`` (one store read)."""
        entry = self.store.get(VERSION_KEY)
        version = 0 if entry is None else entry.revision
        cached = self._cached
        if cached is not None and cached[0] == version:
            return cached
        with self._lock:
            self._cached = (version, self._load_config())
            return self._cached

    def _load_config(self) -> KpsConfig:
        signers: dict[str, jose.AsymmetricKey] = {}
        for record in self.signers():
            signers.update(load_signer_keys(record["jwk"]))
        deny = self._get(DENY_BEFORE_KEY)
        primary = self._get(PRIMARY_KEY)
        ring = key_ring(self.keys.load_all(), None if primary is None else str(primary["id"]))
        current = None if primary is None else primary.get("key_generation")
        return KpsConfig(
            signers=signers,
            deny_before=None if deny is None else float(deny["time"]),
            ring=tuple(ring),
            primary_generation=int(current) if ring and current is not None else _newest(ring),
        )

    def _get(self, key: str) -> Any | None:
        entry = self.store.get(key)
        return None if entry is None else decode(entry.value, what=key)

    def _release_config(self) -> KpsConfig:
        try:
            config = self.config()
        except GuardfabError as exc:
            raise KpsUnavailableError(f"the KPS configuration does not load: {exc}") from exc
        if not config.ring:
            raise KpsUnavailableError("this HGS has no KPS key")
        return config

    # ----------------------------------------------------------------- releases

    def release(self, health_certificate: str, key_protector: str) -> ReleaseResult:
        """Decide one release and record it (:meth:`KeyReleases.release`).

        Raises:
            KeyReleaseError: refused (audited; nothing else changed).
            KpsUnavailableError: the KPS keys or configuration do not load (audited).
        """
        return self._releases.release(health_certificate, key_protector)

    async def release_batched(
        self, health_certificate: str, key_protector: str, batcher: LoopBatcher
    ) -> ReleaseResult:
        """:meth:`release` with its commit shared with the loop turn's others.

        On a store that waits on the network it runs whole on one of the
        service's store threads (:meth:`HgsService.attest_batched` says why).
        """
        if self._store_threads is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._store_threads, self.release, health_certificate, key_protector
            )
        return await self._releases.release_batched(health_certificate, key_protector, batcher)

    def loaded_config(self, *, fresh: bool) -> tuple[int, KpsConfig]:
        """The configuration and its ``kps/version``: as last loaded (no store read),
        unless ``fresh`` or none is loaded yet."""
        cached = None if fresh else self._cached
        return cached if cached is not None else self._current_config()

    def audit_refusal(self, exc: GuardfabError, *, kind: str = RELEASE_KIND) -> None:
        """Audit a refused request: the reason, and the host and KP or PDK if already verified."""
        opening = kind == OPENING_KIND
        actor = "unidentified-host"
        subject = "unidentified-pdk" if opening else "unidentified-kp"
        details: dict[str, Any] = {"reason": "kps-unavailable"}
        if isinstance(exc, KeyReleaseError):
            details["reason"] = exc.reason
            if exc.generation is not None:
                details["generation"] = exc.generation
            actor = printable(exc.host_id) if exc.host_id else actor
            subject = (exc.pdk_id if opening else exc.kp_id) or subject
        details["message"] = str(exc)[:_AUDIT_MESSAGE_CHARS]
        self.audit.append(
            kind=kind, actor=actor, subject=subject, outcome="refused", details=details
        )

    # ----------------------------------------------------------------- shielding data

    def open_shielding_data(self, health_certificate: str, shielding_data: str) -> OpeningResult:
        """Open a VM's shielding data for an attested host; audit it, change nothing else.

        Raises:
            KeyReleaseError: refused (audited; nothing else changed).
            KpsUnavailableError: the KPS keys or configuration do not load (audited).
        """
        try:
            config = self._release_config()
            result = open_shielding_data(
                health_certificate,
                _decode_pdk(shielding_data),
                kps_keys=config.release_keys(),
                trusted_signers=config.signers,
                now=self.clock(),
                deny_before=config.deny_before,
                revoked_hosts=self.registry.trust().revoked_hosts,
            )
        except GuardfabError as exc:
            self.audit_refusal(exc, kind=OPENING_KIND)
            raise
        self.audit.append(
            kind=OPENING_KIND,
            actor=printable(result.host_id),
            subject=result.pdk_id,
            outcome="granted",
            details=result.audit_details(),
        )
        return result

    # ----------------------------------------------------------------- signers

    def signers(self) -> list[dict[str, Any]]:
        """The trusted attestation signers: the records, and this HGS's own unless removed."""
        rows = [
            {"kid": e.key.removeprefix(SIGNERS), **decode(e.value, what=e.key)}
            for e in self.store.list(SIGNERS)
        ]
        own = self._own_signer["kid"]
        if self.store.get(OWN_DISTRUSTED_KEY) is None and all(r["kid"] != own for r in rows):
            rows.insert(0, {"kid": own, "jwk": self._own_signer, "source": "own (default)"})
        return rows

    def add_signers(self, document: Any, *, actor: str) -> list[str]:
        """Trust the signer(s) of a JWK or JWK Set; return their ids."""
        keys = load_signer_keys(document)
        now = int(self.clock())
        puts = [
            (SIGNERS + kid, {"jwk": public_signer_jwk(key), "source": "admin", "added_at": now})
            for kid, key in keys.items()
        ]
        kids = sorted(keys)
        deletes = [OWN_DISTRUSTED_KEY] if self._own_signer["kid"] in keys else []
        change = _Change("kps-signer", ",".join(kids), "added", {"signers": kids}, puts, deletes)
        self._change(change, actor=actor)
        return kids

    def remove_signer(self, kid: str, *, actor: str) -> None:
        """Stop trusting a signer: its certificates are refused from the next release on."""
        if kid not in {r["kid"] for r in self.signers()}:
            raise KpsNotFoundError(f"no trusted attestation signer {kid[:64]!r}")
        puts = [(OWN_DISTRUSTED_KEY, {"kid": kid})] if kid == self._own_signer["kid"] else []
        change = _Change("kps-signer", kid, "removed", {}, puts, [SIGNERS + kid])
        self._change(change, actor=actor)

    # ----------------------------------------------------------------- deny-before

    def deny_before(self) -> int | None:
        """The deny-before date (Unix seconds), if set."""
        record = self._get(DENY_BEFORE_KEY)
        return None if record is None else int(record["time"])

    def set_deny_before(self, when: int | None, *, actor: str) -> None:
        """Refuse certificates issued before ``when`` (None clears the date).

        Raises:
            UsageError: ``when`` is in the future (it would refuse every certificate).
        """
        if when is None:
            change = _Change("kps-deny-before", "deny-before", "cleared", deletes=[DENY_BEFORE_KEY])
            self._change(change, actor=actor)
            return
        if when > self.clock() + MAX_DENY_BEFORE_SKEW:
            raise UsageError(
                "the deny-before date is in the future: every certificate would be refused",
                hint="give a past date or 'now'",
            )
        record = {"time": int(when), "set_at": int(self.clock())}
        change = _Change(
            "kps-deny-before", "deny-before", "set", record, [(DENY_BEFORE_KEY, record)]
        )
        self._change(change, actor=actor)

    # ----------------------------------------------------------------- KPS keys

    def list_keys(self) -> list[dict[str, Any]]:
        """Every KPS key, primary first (the primary at its current key generation)."""
        config = self.config()
        return [
            k.summary(primary=i == 0, current=config.primary_generation if i == 0 else None)
            for i, k in enumerate(config.ring)
        ]

    def add_key(
        self,
        *,
        actor: str,
        name: str | None = None,
        algorithm: KeyAlgorithm = KeyAlgorithm.EC_P256,
        make_primary: bool = False,
        new_guardian: bool = False,
    ) -> dict[str, Any]:
        """Rotate: a new key generation of the primary guardian (current if ``make_primary``).

        Without ``make_primary`` the new generation is only staged (copy its files
        to every node, then make it primary); the current one is pinned in the
        store first so that it stays current. ``new_guardian`` makes a second KPS
        guardian (a new signing key, which tenants must grant) instead.
        """
        if new_guardian:
            return self._add_guardian(actor, name, algorithm, make_primary=make_primary)
        config = self._release_config()
        primary = config.ring[0]
        key = self.keys.add_generation(primary.id)
        chosen = key.newest if make_primary else config.primary_generation
        puts = [(PRIMARY_KEY, {"id": key.id, "key_generation": chosen})]
        details = {"key_generation": key.newest, "primary": make_primary}
        self._change(_Change("kps-key", key.id, "generation-added", details, puts), actor=actor)
        return key.summary(primary=True, current=key.newest) | {"current": make_primary}

    def _add_guardian(
        self, actor: str, name: str | None, algorithm: KeyAlgorithm, *, make_primary: bool
    ) -> dict[str, Any]:
        now = self.clock()
        stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now))
        key = self.keys.create(
            name or kps_guardian_name(self.service_name, f"kps-{stamp}"),
            now=now,
            algorithm=algorithm,
        )
        puts = [(PRIMARY_KEY, {"id": key.id, "key_generation": 0})] if make_primary else []
        details = {"name": key.name, "primary": make_primary}
        self._change(_Change("kps-key", key.id, "added", details, puts), actor=actor)
        return key.summary(primary=make_primary)

    def make_primary(self, key_id: str, *, actor: str, key_generation: int | None = None) -> int:
        """Make ``key_id`` at ``key_generation`` (default: its newest) primary and current.

        Egress KPs are then wrapped to it, it is published, and KPs last seen on
        other keys show in the report. Rotation only moves forward: an older
        generation of the primary guardian is refused (a retired key may be why
        the administrator rotated).

        Returns:
            The key generation made current.
        """
        if key_id not in self.keys.ids():
            raise KpsNotFoundError(f"no KPS key {key_id[:64]!r}")
        key = self.keys.load(key_id)  # its files must load before it becomes primary
        number = key.newest if key_generation is None else key_generation
        key.generation(number)
        config = self._release_config()
        if key_id == config.ring[0].id and number < config.primary_generation:
            raise UsageError(
                f"KPS key {key_id} is at key generation {config.primary_generation}:"
                f" going back to {number} is refused",
                hint="rotate forward with 'guardfab hgs kps key add --make-primary'",
            )
        puts = [(PRIMARY_KEY, {"id": key_id, "key_generation": number})]
        details = {"key_generation": number}
        self._change(_Change("kps-key", key_id, "made-primary", details, puts), actor=actor)
        return number

    def _change(self, change: _Change, *, actor: str) -> None:
        """Apply a configuration change and its audit record in one transaction."""
        self.audit.append(
            kind=change.kind,
            actor=actor,
            subject=printable(change.subject),
            outcome=change.outcome,
            details=change.details,
            txn=_config_txn(change.puts, change.deletes),
        )

    # ----------------------------------------------------------------- publication

    def metadata(self) -> dict[str, Any]:
        """The KPS guardian documents, primary first, each at its newest published generation."""
        config = self._release_config()
        documents = [config.ring[0].generation(config.primary_generation).document]
        documents += [k.document for k in config.ring[1:]]
        return {
            "service": self.service_name,
            "primary": config.ring[0].id,
            "key_generation": config.primary_generation,
            "guardians": [
                {
                    "id": k.id,
                    "name": k.name,
                    "primary": i == 0,
                    "document": document.decode("ascii"),
                }
                for i, (k, document) in enumerate(zip(config.ring, documents, strict=True))
            ],
        }

    def primary_document(self) -> bytes:
        """The primary KPS guardian's current self-signed document, as a file to import."""
        config = self._release_config()
        return config.ring[0].generation(config.primary_generation).document + b"\n"

    def report(self) -> dict[str, Any]:
        """KPs whose last egress is wrapped to a key other than the primary's current one.

        They move to it on their next release; once none is left on a key
        generation, that key is no longer needed for them.
        """
        config = self._release_config()
        primary = (config.ring[0].id, config.primary_generation)
        return rotation_report(self.store.list(SEEN), primary, prefix=SEEN)


def _decode_pdk(text: str) -> bytes:
    return decode_request_file(
        text, max_text=MAX_PDK_TEXT, what="shielding data", rejected=ShieldingDataRejectedError
    )


def _newest(ring: Sequence[KpsKey]) -> int:
    return ring[0].newest if ring else 0
