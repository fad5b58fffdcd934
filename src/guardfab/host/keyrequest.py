"""The agent's edge to the Key Protection Service, behind a small interface.

The agent asks for a VM's keys through :class:`KeyReleaser`, so its logic (find
a valid health certificate, attest on demand, fail over to the fallback HGS) is
tested with an in-memory releaser, and the real one (:class:`KpsKeyReleaser`)
speaks to the KPS over HTTPS through
:func:`guardfab.host.keyrelease.request_release`, which verifies the KPS's answer
and decrypts the transport keys with the host encryption key. The keys stay in
memory as :class:`~guardfab.formats.key_protector.TransportKey` (whose repr is
redacted): the agent passes them to the hypervisor layer over its local socket
and never writes them anywhere.

The same edge opens a VM's shielding data (PDK) during provisioning
(:meth:`KeyReleaser.open_shielding_data`): the KPS, a guardian of the PDK,
decrypts it for this attested host, and the secrets come back as a
:class:`~guardfab.formats.shielding_secrets.ShieldingSecrets`, in memory only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from guardfab.formats import jose
from guardfab.formats.key_protector import TransportKey
from guardfab.formats.shielding_secrets import ShieldingSecrets
from guardfab.host.keyrelease import request_release, request_shielding_secrets


@dataclass(frozen=True)
class ReleasedKeys:
    """What a release returns: the VM's current and new transport keys and its egress KP.

    ``repr`` shows none of them, so a stray log line or traceback cannot leak a key.
    """

    old_transport_key: TransportKey = field(repr=False)
    new_transport_key: TransportKey = field(repr=False)
    egress_kp: bytes = field(repr=False)


class KeyReleaser(Protocol):
    """Asks one KPS to release a VM's keys to this host."""

    def release(
        self,
        url: str,
        ca_file: Path,
        health_certificate: str,
        kp: bytes,
        host_key: jose.AsymmetricKey,
    ) -> ReleasedKeys:
        """Release the keys wrapped in ``kp``, decrypted with ``host_key``.

        Raises:
            TransportError: the KPS did not answer (the agent tries the other HGS).
            InvalidInputError: the KPS refused (the KP, or the certificate), or its
                answer did not verify.
        """

    def open_shielding_data(
        self,
        url: str,
        ca_file: Path,
        health_certificate: str,
        pdk: bytes,
        host_key: jose.AsymmetricKey,
    ) -> ShieldingSecrets:
        """Have the KPS open the shielding data ``pdk``, decrypting its answer with ``host_key``.

        Raises:
            TransportError: the KPS did not answer (the agent tries the other HGS).
            InvalidInputError: the KPS refused (the PDK, or the certificate), or its
                answer did not verify.
        """


class KpsKeyReleaser:
    """The real releaser: :func:`guardfab.host.keyrelease.request_release` over HTTPS."""

    def release(
        self,
        url: str,
        ca_file: Path,
        health_certificate: str,
        kp: bytes,
        host_key: jose.AsymmetricKey,
    ) -> ReleasedKeys:
        """Ask the KPS at ``url``; see :meth:`KeyReleaser.release`."""
        current, new, egress = request_release(url, ca_file, health_certificate, kp, host_key)
        return ReleasedKeys(current, new, egress)

    def open_shielding_data(
        self,
        url: str,
        ca_file: Path,
        health_certificate: str,
        pdk: bytes,
        host_key: jose.AsymmetricKey,
    ) -> ShieldingSecrets:
        """Ask the KPS at ``url``; see :meth:`KeyReleaser.open_shielding_data`."""
        return request_shielding_secrets(url, ca_file, health_certificate, pdk, host_key)
