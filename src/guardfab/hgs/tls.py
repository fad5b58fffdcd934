"""TLS material for the HGS: the shared implementation (:mod:`guardfab.access.tls`), HGS-named.

``hgs init`` makes a private CA named "<service> HGS CA" and a server
certificate; an operator may bring their own (PEM or PKCS#12).
"""

from __future__ import annotations

import datetime

from guardfab.access import tls as _shared
from guardfab.access.tls import TlsMaterial, load_given_pem, load_given_pkcs12


def make_private_ca_and_server(
    service_name: str, server_names: list[str], *, now: datetime.datetime
) -> TlsMaterial:
    """Create the HGS's private CA and a server certificate for ``server_names``."""
    return _shared.make_private_ca_and_server(f"{service_name} HGS CA", server_names, now=now)


__all__ = ["TlsMaterial", "load_given_pem", "load_given_pkcs12", "make_private_ca_and_server"]
