"""The trusted state the attestation engine reads: immutable, typed, indexed once.

The HGS service loads these records from its store and builds one
:class:`TrustState` per configuration version; the engine only reads it. Every
lookup the hot path makes is a dictionary lookup keyed by a digest (EK digest,
AK Name, CI policy digest, host key thumbprint, PCR value tuple), built once in
``__post_init__``, so a check costs the same with ten hosts or ten thousand.

Identities:

* **EK digest**: SHA-256 of the EK's DER SubjectPublicKeyInfo. It is the same
  whether computed from the host's TPM2B_PUBLIC or from its EK certificate, so
  a host can be registered from either.
* **AK Name**: the TPM Name of the AK (nameAlg || H(TPMT_PUBLIC)), what
  TPM2_ActivateCredential checks; an :class:`AkBinding` records that an AK
  answered a MakeCredential challenge for that EK.
* **host key id**: the RFC 7638 thumbprint of the registered signing key.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import Store

from guardfab.attestation.baseline import BaselineSet, TpmBaseline
from guardfab.attestation.summary import hex_digest
from guardfab.errors import FormatError, UsageError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    reject_unknown_fields,
    require_dict,
    require_str,
)
from guardfab.tpm.eventlog import PCR_COUNT
from guardfab.tpm.structures import TpmtPublic, as_public, public_key

#: PCRs every quote must cover: the facts and baselines read PCRs 0-7.
FACT_PCRS: tuple[int, ...] = tuple(range(8))
#: Where GRUB measures the files it loads, so where a CI policy file shows up.
DEFAULT_CI_POLICY_PCR = 9
MAX_ID_CHARS = 256
_K = TypeVar("_K")
_V = TypeVar("_V")


class AttestationMode(enum.StrEnum):
    """How hosts prove they are healthy (several may be active during a switch)."""

    TPM = "tpm"
    HOST_KEY = "host-key"
    #: Deprecated, as in the reference: a CA-issued certificate names the host's group.
    ADMIN_GROUP = "admin-group"


class PolicyState(enum.StrEnum):
    """An attestation policy's state. LOCKED: enforced and cannot be disabled."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    LOCKED = "locked"


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise UsageError(f"{what}: 1 to {MAX_ID_CHARS} characters")
    if not value.isprintable():
        raise UsageError(f"{what}: only printable characters")
    return value


def ek_digest(ek: TpmtPublic | bytes | x509.Certificate) -> bytes:
    """SHA-256 of the EK's DER SubjectPublicKeyInfo (from TPM2B_PUBLIC or the EK certificate).

    Raises:
        FormatError: the public area is malformed or not a usable key.
    """
    key = ek.public_key() if isinstance(ek, x509.Certificate) else public_key(as_public(ek))
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


@dataclass(frozen=True)
class TpmHost:
    """A registered TPM host: its name and its EK digest (see :func:`ek_digest`)."""

    host_id: str
    ek_digest: bytes

    def __post_init__(self) -> None:
        _check_id(self.host_id, "host id")
        if len(self.ek_digest) != 32:
            raise UsageError("EK digest: 32 bytes (SHA-256 of the SubjectPublicKeyInfo)")

    def to_dict(self) -> dict[str, Any]:
        """The stored form."""
        return {"host_id": self.host_id, "ek_digest": self.ek_digest.hex()}

    @classmethod
    def from_dict(cls, obj: Any) -> TpmHost:
        """Load a stored record."""
        what = "TPM host"
        obj = require_dict(obj, what=what)
        reject_unknown_fields(obj, {"host_id", "ek_digest"}, what=what)
        return cls(require_str(obj, "host_id", what=what), hex_digest(obj, "ek_digest", what=what))


@dataclass(frozen=True)
class AkBinding:
    """An AK proven (by MakeCredential/ActivateCredential) to live in the TPM of an EK."""

    ak_name: bytes
    ek_digest: bytes
    host_id: str

    def to_dict(self) -> dict[str, Any]:
        """The stored form."""
        return {
            "ak_name": self.ak_name.hex(),
            "ek_digest": self.ek_digest.hex(),
            "host_id": self.host_id,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> AkBinding:
        """Load a stored record."""
        what = "AK binding"
        obj = require_dict(obj, what=what)
        reject_unknown_fields(obj, {"ak_name", "ek_digest", "host_id"}, what=what)
        return cls(
            hex_digest(obj, "ak_name", what=what, size=34),
            hex_digest(obj, "ek_digest", what=what),
            require_str(obj, "host_id", what=what, max_len=MAX_ID_CHARS),
        )


@dataclass(frozen=True)
class CiPolicy:
    """A registered code integrity policy: a name and the SHA-256 of the policy file."""

    name: str
    digest: bytes

    def __post_init__(self) -> None:
        _check_id(self.name, "CI policy name")
        if len(self.digest) != 32:
            raise UsageError("CI policy digest: SHA-256 (32 bytes) of the policy file")

    def to_dict(self) -> dict[str, Any]:
        """The stored form."""
        return {"name": self.name, "digest": self.digest.hex()}

    @classmethod
    def from_dict(cls, obj: Any) -> CiPolicy:
        """Load a stored record."""
        what = "CI policy"
        obj = require_dict(obj, what=what)
        reject_unknown_fields(obj, {"name", "digest"}, what=what)
        return cls(require_str(obj, "name", what=what), hex_digest(obj, "digest", what=what))


@dataclass(frozen=True)
class HostKey:
    """A registered host signing key (host-key mode). ``key_id`` is its RFC 7638 thumbprint."""

    key_id: str
    host_id: str
    jwk: Mapping[str, Any]
    revoked: bool = False
    key: jose.AsymmetricKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_id(self.host_id, "host id")
        key = jose.import_public_jwk(dict(self.jwk), what=f"host key {self.key_id}")
        jose.signing_alg_for(key)  # refuses curves guardfab does not sign with
        if jose.thumbprint(key) != self.key_id:
            raise UsageError(f"host key {self.key_id}: the id is not the key's thumbprint")
        object.__setattr__(self, "jwk", MappingProxyType(jose.public_jwk(key)))
        object.__setattr__(self, "key", key)

    def to_dict(self) -> dict[str, Any]:
        """The stored form."""
        return {
            "key_id": self.key_id,
            "host_id": self.host_id,
            "jwk": dict(self.jwk),
            "revoked": self.revoked,
        }

    @classmethod
    def from_dict(cls, obj: Any) -> HostKey:
        """Load a stored record."""
        what = "host key"
        obj = require_dict(obj, what=what)
        reject_unknown_fields(obj, {"key_id", "host_id", "jwk", "revoked"}, what=what)
        revoked = obj.get("revoked")
        if not isinstance(revoked, bool):
            raise FormatError(f"{what}: 'revoked' must be true or false")
        try:
            return cls(
                require_str(obj, "key_id", what=what),
                require_str(obj, "host_id", what=what),
                require_dict(obj.get("jwk"), what=what),
                revoked,
            )
        except UsageError as exc:
            raise FormatError(f"{what}: {exc}") from exc


def _store(roots: tuple[x509.Certificate, ...]) -> Store | None:
    return Store(list(roots)) if roots else None


def _index(items: Iterable[_V], key: Callable[[_V], _K], what: str) -> dict[_K, _V]:
    out: dict[_K, _V] = {}
    for item in items:
        k = key(item)
        if k in out:
            raise UsageError(f"{what} registered twice")
        out[k] = item
    return out


@dataclass(frozen=True)
class TrustState:
    """Everything the engine trusts, as of one configuration version.

    Attributes:
        modes: the active attestation modes.
        tpm_hosts: registered TPM hosts (by EK digest).
        ek_roots, ek_intermediates: TPM vendor CAs an EK certificate may chain to.
        admit_certified_eks: admit an unregistered TPM whose EK certificate chains
            to ``ek_roots`` (its host id is then ``ek-<digest prefix>``).
        ak_bindings: AKs activated for an EK (by AK Name).
        baselines: registered TPM baselines.
        ci_policies: registered CI policies (by digest); ci_policy_pcr: where
            the boot loader measures them.
        required_pcrs: PCRs every quote must cover, beyond :data:`FACT_PCRS`
            (always required).
        host_keys: registered host keys (by thumbprint).
        host_groups, group_roots: admin-group mode's registered groups and CAs.
        revoked_hosts: host ids refused in every mode.
        policy_states: stored policy states by name; missing names take the
            policy's default (see :mod:`guardfab.attestation.policies`).
    """

    modes: frozenset[AttestationMode] = frozenset({AttestationMode.TPM})
    tpm_hosts: tuple[TpmHost, ...] = ()
    ek_roots: tuple[x509.Certificate, ...] = ()
    ek_intermediates: tuple[x509.Certificate, ...] = ()
    admit_certified_eks: bool = False
    ak_bindings: tuple[AkBinding, ...] = ()
    baselines: tuple[TpmBaseline, ...] = ()
    ci_policies: tuple[CiPolicy, ...] = ()
    ci_policy_pcr: int = DEFAULT_CI_POLICY_PCR
    required_pcrs: tuple[int, ...] = FACT_PCRS
    host_keys: tuple[HostKey, ...] = ()
    host_groups: frozenset[str] = frozenset()
    group_roots: tuple[x509.Certificate, ...] = ()
    revoked_hosts: frozenset[str] = frozenset()
    policy_states: Mapping[str, PolicyState] = field(default_factory=dict)
    # Indexes, built once.
    baseline_set: BaselineSet = field(init=False, repr=False, compare=False)
    quote_pcrs: frozenset[int] = field(init=False, repr=False, compare=False)
    ek_store: Store | None = field(init=False, repr=False, compare=False)
    group_store: Store | None = field(init=False, repr=False, compare=False)
    _hosts: dict[bytes, TpmHost] = field(init=False, repr=False, compare=False)
    _bindings: dict[bytes, AkBinding] = field(init=False, repr=False, compare=False)
    _ci: dict[bytes, CiPolicy] = field(init=False, repr=False, compare=False)
    _keys: dict[str, HostKey] = field(init=False, repr=False, compare=False)
    #: The stored policy states, sorted: the key a policy set's plan is kept by
    #: (:class:`~guardfab.attestation.policies.PolicySet`), read at every attestation.
    policy_states_key: tuple[tuple[str, PolicyState], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not 0 <= self.ci_policy_pcr < PCR_COUNT:
            raise UsageError(f"CI policy PCR must be in 0-{PCR_COUNT - 1}")
        if any(not 0 <= pcr < PCR_COUNT for pcr in self.required_pcrs):
            raise UsageError(f"required PCRs must be in 0-{PCR_COUNT - 1}")
        indexes = {
            "baseline_set": BaselineSet(self.baselines),
            "quote_pcrs": frozenset(self.required_pcrs) | frozenset(FACT_PCRS),
            "ek_store": _store(self.ek_roots),
            "group_store": _store(self.group_roots),
            "_hosts": _index(self.tpm_hosts, lambda h: h.ek_digest, "an EK"),
            "_bindings": _index(self.ak_bindings, lambda b: b.ak_name, "an AK"),
            "_ci": _index(self.ci_policies, lambda c: c.digest, "a CI policy digest"),
            "_keys": _index(self.host_keys, lambda k: k.key_id, "a host key"),
            "policy_states": MappingProxyType(dict(self.policy_states)),
            "policy_states_key": tuple(sorted(self.policy_states.items())),
        }
        for name, value in indexes.items():
            object.__setattr__(self, name, value)

    def tpm_host(self, ek: bytes) -> TpmHost | None:
        """The registered host with this EK digest."""
        return self._hosts.get(ek)

    def ak_binding(self, ak_name: bytes) -> AkBinding | None:
        """The EK this AK was activated for."""
        return self._bindings.get(ak_name)

    def ci_policy(self, digest: bytes) -> CiPolicy | None:
        """The registered CI policy with this SHA-256 digest."""
        return self._ci.get(digest)

    def host_key(self, key_id: str) -> HostKey | None:
        """The registered host key with this thumbprint."""
        return self._keys.get(key_id)

    def is_revoked(self, host_id: str) -> bool:
        """Whether the host has been revoked (refused in every mode)."""
        return host_id in self.revoked_hosts
