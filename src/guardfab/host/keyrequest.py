"""The agent's edge to the Key Protection Service, behind a small interface.

The agent asks for a VM's keys through :class:`KeyReleaser`, so its logic (find
a valid health certificate, attest on demand, fail over to the fallback HGS) is
tested with an in-memory releaser, and the real one speaks to the KPS over HTTPS
through :func:`guardfab.host.keyrelease.request_release`, which decrypts the
transport keys with the host encryption key. The keys stay in memory: the agent
passes them to the hypervisor layer over its local socket and never writes them
anywhere.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from guardfab.errors import TransportError, UsageError
from guardfab.formats import jose


@dataclass(frozen=True)
class ReleasedKeys:
    """What a release returns: the VM's old and new transport keys and its egress KP.

    ``repr`` shows none of them, so a stray log line or traceback cannot leak a key.
    """

    old_transport_key: bytes = field(repr=False)
    new_transport_key: bytes = field(repr=False)
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
            InvalidInputError: the KPS refused (the KP, or the certificate).
        """


_RequestRelease = Callable[[str, Path, str, bytes, Any], tuple[bytes, bytes, bytes]]


class KpsKeyReleaser:
    """The real releaser: :func:`guardfab.host.keyrelease.request_release` over HTTPS.

    That module is imported on first use, so an agent built before it existed
    still attests and reports a clear error for key requests.
    """

    def __init__(self, request_release: _RequestRelease | None = None) -> None:
        self._request_release = request_release

    def _function(self) -> _RequestRelease:
        if self._request_release is None:
            try:
                module = importlib.import_module("guardfab.host.keyrelease")
            except ImportError as exc:
                raise UsageError(
                    "this guardfab has no key release client (guardfab.host.keyrelease)",
                    hint="upgrade guardfab on this host",
                ) from exc
            self._request_release = cast("_RequestRelease", module.request_release)
        return self._request_release

    def release(
        self,
        url: str,
        ca_file: Path,
        health_certificate: str,
        kp: bytes,
        host_key: jose.AsymmetricKey,
    ) -> ReleasedKeys:
        """Ask the KPS at ``url``; see :meth:`KeyReleaser.release`."""
        try:
            old, new, egress = self._function()(url, ca_file, health_certificate, kp, host_key)
        except OSError as exc:  # a transport failure the client did not wrap
            raise TransportError(f"KPS at {url} unreachable ({type(exc).__name__})") from exc
        return ReleasedKeys(old, new, egress)
