"""Certificate checks both the HGS's own TLS and its etcd client TLS get in ``hgs diagnose``.

One implementation, so a certificate that expires in 20 days is a warning whether
it is the one hosts see or the one the HGS shows etcd.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from guardfab import diagnostics as diag
from guardfab.diagnostics import Check

#: A TLS certificate expiring sooner than this is a warning.
EXPIRY_WARNING = datetime.timedelta(days=30)


def validity(name: str, leaf: x509.Certificate, now: datetime.datetime, renew: str) -> Check:
    """The certificate is valid now and for :data:`EXPIRY_WARNING` more (a warning if not)."""
    until = leaf.not_valid_after_utc
    if now < leaf.not_valid_before_utc:
        return diag.fail(name, f"not valid before {leaf.not_valid_before_utc}", renew)
    if now > until:
        return diag.fail(name, f"expired on {until.isoformat()}", renew)
    if until - now < EXPIRY_WARNING:
        return diag.warn(name, f"expires on {until.isoformat()} ({(until - now).days} days)", renew)
    return diag.ok(name, f"valid until {until.isoformat()}")


def key_match(name: str, key_file: Path, leaf: x509.Certificate, *, label: str, cert: str) -> Check:
    """The private key in ``key_file`` (shown as ``label``) belongs to ``leaf`` (``cert``)."""
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        same = key.public_key().public_bytes(serialization.Encoding.DER, spki) == (
            leaf.public_key().public_bytes(serialization.Encoding.DER, spki)
        )
    except (OSError, ValueError, TypeError) as exc:
        return diag.fail(
            name, f"{label} does not load ({exc})", f"restore {label} (unencrypted PEM) from backup"
        )
    if not same:
        return diag.fail(
            name,
            f"{label} is not the certificate's key",
            f"put the key that belongs to {cert} in {label}",
        )
    return diag.ok(name, f"{label} matches the certificate")
