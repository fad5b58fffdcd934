"""What the HGS trusts, kept in the store, and the per-host records it keeps.

Store layout (every value canonical JSON)::

    trust/version                     bumped by every change below (cache key)
    trust/modes                       ["tpm", ...]
    trust/settings                    {"admit_certified_eks": bool, "ci_policy_pcr": int}
    trust/tpm-hosts/<host id>         TpmHost
    trust/ek-roots/<sha256 of DER>    {"pem": ...}   TPM vendor CA roots
    trust/ek-intermediates/<sha256>   {"pem": ...}
    trust/ak-bindings/<AK Name hex>   AkBinding (written after ActivateCredential)
    trust/baselines/<name>            TpmBaseline
    trust/ci-policies/<digest hex>    CiPolicy
    trust/host-keys/<key id>          HostKey
    trust/host-groups/<name>          {"name": ...}  (admin-group mode, deprecated)
    trust/group-roots/<sha256>        {"pem": ...}
    trust/revoked/<host id>           {"host_id": ..., "revoked_at": ...}
    trust/policies/<policy name>      {"state": "enabled"|"disabled"|"locked"}
    candidates/<id>                   CandidateBaseline
    hosts/last/<host id>              last attestation: result + verified summary (its
                                      events as a reference, events_sha256, to hosts/boot/)
    hosts/boot/<host id>              the host's last verified boot: the summary's events
                                      member and its SHA-256, written once per boot
    nonces/<nonce id>                 used challenges (TTL = their remaining life)
    activations/<id>                  pending MakeCredential secrets (TTL)

Every change to ``trust/`` goes through :meth:`Registry.trust_txn`, which bumps
``trust/version`` in the same transaction, so :meth:`Registry.trust` can cache
the assembled :class:`TrustState` and rebuild it only when that key moved.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from guardfab.attestation.baseline import TpmBaseline
from guardfab.attestation.trust import (
    DEFAULT_CI_POLICY_PCR,
    AkBinding,
    AttestationMode,
    CiPolicy,
    HostKey,
    PolicyState,
    TpmHost,
    TrustState,
)
from guardfab.errors import FormatError
from guardfab.formats.encoding import canonical_json
from guardfab.store.base import ABSENT, Condition, Store, Txn

TRUST = "trust/"
VERSION_KEY = "trust/version"
MODES_KEY = "trust/modes"
SETTINGS_KEY = "trust/settings"
TPM_HOSTS = "trust/tpm-hosts/"
EK_ROOTS = "trust/ek-roots/"
EK_INTERMEDIATES = "trust/ek-intermediates/"
AK_BINDINGS = "trust/ak-bindings/"
BASELINES = "trust/baselines/"
CI_POLICIES = "trust/ci-policies/"
HOST_KEYS = "trust/host-keys/"
HOST_GROUPS = "trust/host-groups/"
GROUP_ROOTS = "trust/group-roots/"
REVOKED = "trust/revoked/"
POLICIES = "trust/policies/"
CANDIDATES = "candidates/"
LAST = "hosts/last/"
BOOT = "hosts/boot/"
NONCES = "nonces/"
ACTIVATIONS = "activations/"

_T = TypeVar("_T")


def encode(value: Any) -> bytes:
    """The stored bytes of a JSON value."""
    return canonical_json(value)


def decode(data: bytes, *, what: str) -> Any:
    """A stored JSON value (the store is trusted, but a corrupt record must still be named)."""
    try:
        return json.loads(data)
    except ValueError as exc:
        raise FormatError(f"stored {what} is not JSON") from exc


def version_condition(version: int) -> Condition:
    """The compare that holds while ``trust/version`` is still at ``version`` (0: never set)."""
    return ABSENT if version == 0 else version


def certificate_key(cert: x509.Certificate) -> str:
    """The store id of a CA certificate: SHA-256 of its DER."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


_DER = __import__(
    "cryptography.hazmat.primitives.serialization", fromlist=["Encoding"]
).Encoding.DER


class Registry:
    """Typed access to the HGS's records in a store, with a cached TrustState."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._cached: tuple[int, TrustState] | None = None

    # ----------------------------------------------------------------- reading

    def records(self, prefix: str, load: Callable[[Any], _T]) -> list[_T]:
        """Every record under ``prefix``, loaded with ``load``."""
        return [load(decode(e.value, what=e.key)) for e in self.store.list(prefix)]

    def get(self, key: str) -> Any | None:
        """One stored JSON value, or None."""
        entry = self.store.get(key)
        return None if entry is None else decode(entry.value, what=key)

    def _certificates(self, prefix: str) -> tuple[x509.Certificate, ...]:
        return tuple(
            x509.load_pem_x509_certificate(record["pem"].encode())
            for record in self.records(prefix, dict)
        )

    def modes(self) -> frozenset[AttestationMode]:
        """The active attestation modes (TPM when never set)."""
        stored = self.get(MODES_KEY)
        return (
            frozenset(AttestationMode(m) for m in stored)
            if stored
            else frozenset({AttestationMode.TPM})
        )

    def settings(self) -> dict[str, Any]:
        """Trust settings with their defaults."""
        stored = self.get(SETTINGS_KEY) or {}
        return {
            "admit_certified_eks": bool(stored.get("admit_certified_eks", False)),
            "ci_policy_pcr": int(stored.get("ci_policy_pcr", DEFAULT_CI_POLICY_PCR)),
        }

    def trust(self) -> TrustState:
        """The current TrustState, rebuilt only when ``trust/version`` has moved."""
        return self.current_trust()[1]

    def current_trust(self) -> tuple[int, TrustState]:
        """The current TrustState and its version (one store read; a rebuild if it moved)."""
        version_entry = self.store.get(VERSION_KEY)
        version = 0 if version_entry is None else version_entry.revision
        cached = self._cached
        if cached is not None and cached[0] == version:
            return cached
        with self._lock:
            self._cached = (version, self._load_trust())
            return self._cached

    def cached_trust(self) -> tuple[int, TrustState]:
        """The TrustState last loaded and its version, without a store read if there is one.

        It may be stale. A caller acting on it must make its write conditional on
        :func:`version_condition` (and on a conflict there, re-read with
        :meth:`current_trust` and decide again): the attestation path does, and so
        saves one store read per request while never committing a decision made
        under trust that has since changed.
        """
        cached = self._cached
        return cached if cached is not None else self.current_trust()

    def _load_trust(self) -> TrustState:
        settings = self.settings()
        return TrustState(
            modes=self.modes(),
            tpm_hosts=tuple(self.records(TPM_HOSTS, TpmHost.from_dict)),
            ek_roots=self._certificates(EK_ROOTS),
            ek_intermediates=self._certificates(EK_INTERMEDIATES),
            admit_certified_eks=settings["admit_certified_eks"],
            ak_bindings=tuple(self.records(AK_BINDINGS, AkBinding.from_dict)),
            baselines=tuple(self.records(BASELINES, TpmBaseline.from_dict)),
            ci_policies=tuple(self.records(CI_POLICIES, CiPolicy.from_dict)),
            ci_policy_pcr=settings["ci_policy_pcr"],
            host_keys=tuple(self.records(HOST_KEYS, HostKey.from_dict)),
            host_groups=frozenset(r["name"] for r in self.records(HOST_GROUPS, dict)),
            group_roots=self._certificates(GROUP_ROOTS),
            revoked_hosts=frozenset(r["host_id"] for r in self.records(REVOKED, dict)),
            policy_states={
                e.key.removeprefix(POLICIES): PolicyState(decode(e.value, what=e.key)["state"])
                for e in self.store.list(POLICIES)
            },
        )

    # ----------------------------------------------------------------- writing

    @staticmethod
    def trust_txn(puts: Iterable[tuple[str, Any]] = (), deletes: Iterable[str] = ()) -> Txn:
        """A transaction changing trusted state; it also bumps ``trust/version``."""
        txn = Txn()
        for key, value in puts:
            txn.put(key, encode(value))
        for key in deletes:
            txn.delete(key)
        return txn.put(VERSION_KEY, b"")
