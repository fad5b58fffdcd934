"""What a KPS release is decided under: its configuration, the trust, and their versions.

:class:`KpsConfig` is assembled by :class:`guardfab.hgs.kps.KpsService` from the
store and the key files; a release is decided under it and the registry's
trust as last loaded (:class:`ReleaseState`), and its commit compares both
versions (``kps/version``, ``trust/version``), so nothing is granted under a
configuration or trust that moved before the commit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from guardfab.attestation.trust import TrustState
from guardfab.errors import GuardfabError, TransportError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_decode
from guardfab.formats.key_protector import MAX_KP_BYTES, KpsKeys
from guardfab.formats.shielding_data import MAX_SHIELDING_DATA_BYTES
from guardfab.hgs.kps_keys import KpsKey

#: Bumped by every configuration change; its revision is the configuration's version.
VERSION_KEY = "kps/version"
#: The newest generation issued per ``<kp_id>/<owner>`` (or, before owners, ``<kp_id>``).
GENERATIONS = "kps/generations/"
#: The KPS key the last egress of each KP is wrapped to.
SEEN = "kps/seen/"
#: Audit record kind of a key release.
RELEASE_KIND = "key-release"
#: Decisions of one release when the configuration or trust keeps moving under it.
STATE_RETRIES = 4


class KpsUnavailableError(TransportError):
    """The KPS cannot serve releases: its keys or configuration failed to load."""

    hint = "the HGS administrator runs 'guardfab hgs diagnose' and 'guardfab hgs kps key list'"


def printable(text: str, limit: int = 256) -> str:
    """``text`` cut and with non-printable characters replaced: fit for an audit field."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned or "?"


@dataclass(frozen=True)
class KpsConfig:
    """What a release checks against, assembled from the store and the key files."""

    signers: dict[str, jose.AsymmetricKey]
    deny_before: float | None
    ring: tuple[KpsKey, ...]
    #: The primary's current key generation: egress KPs are wrapped to it.
    primary_generation: int = 0

    def release_keys(self) -> tuple[KpsKeys, ...]:
        """The ring as a release uses it: the primary at its current generation first.

        Other guardians re-key at their oldest generation, so ``rekey`` never
        moves a KP there (it only moves forward): only the primary rotates KPs.
        Built once per configuration (a new configuration is a new KpsConfig), so
        what the keys compute once (the signing key's id) is not redone per release.
        """
        return self._release_keys

    @functools.cached_property
    def _release_keys(self) -> tuple[KpsKeys, ...]:
        first, *others = self.ring
        oldest = [k.kps_keys(k.generations[0].guardian.key_generation) for k in others]
        return (first.kps_keys(self.primary_generation), *oldest)


@dataclass(frozen=True)
class ReleaseState:
    """What a release is decided under: the configuration and trust, with their versions."""

    version: int
    config: KpsConfig
    trust_version: int
    trust: TrustState
    #: As last loaded, versions not read for this release (then checked at commit).
    cached: bool


def base64url_text_limit(max_bytes: int) -> int:
    """Characters of unpadded base64url text that encode at most ``max_bytes`` bytes."""
    return (max_bytes * 4) // 3 + 4


#: The request fields carrying a KP file and a shielding data file (base64url).
MAX_KP_TEXT = base64url_text_limit(MAX_KP_BYTES)
MAX_PDK_TEXT = base64url_text_limit(MAX_SHIELDING_DATA_BYTES)


def decode_request_file(
    text: str, *, max_text: int, what: str, rejected: type[GuardfabError]
) -> bytes:
    """A file sent in a request as base64url text: size-bounded first, refused as ``rejected``."""
    if not isinstance(text, str) or len(text) > max_text:
        raise rejected(f"{what}: not base64url text of acceptable size")
    try:
        return b64url_decode(text, what=what)
    except GuardfabError as exc:
        raise rejected(f"{what} refused: {exc}") from exc
