"""The one error tree of guardfab.

Every error says what failed, why, and what a person can do about it
(``diagnostics()``), in the manner of sigstore-python's errors. Two subtrees:

* :class:`InvalidInputError` -- untrusted or invalid data: a file, a token or a
  request that failed to parse or verify. Retrying with the same input fails again.
* :class:`TransportError` -- a peer or device did not answer or answered badly:
  the HGS over HTTPS, a TPM, QEMU. Retrying later may succeed.

Error messages never contain secret material: callers pass descriptions of what
was wrong, never the bytes that were wrong.
"""

from __future__ import annotations


class GuardfabError(Exception):
    """Root of every error that guardfab raises on purpose."""

    #: A short hint for a person: what to do about it.
    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def diagnostics(self) -> str:
        """Return a multi-line explanation for a person."""
        text = f"error: {self}"
        if self.hint:
            text += f"\nhint: {self.hint}"
        return text


class InvalidInputError(GuardfabError):
    """Data that is malformed, tampered with or fails verification."""


class FormatError(InvalidInputError):
    """Bytes that do not parse as the expected format, version or size."""


class VerificationError(InvalidInputError):
    """Data that parsed but whose signature, digest or binding does not verify."""


class NotAuthorizedError(InvalidInputError):
    """A valid object that does not grant the requested operation (wrong key, wrong guardian)."""


class PolicyError(InvalidInputError):
    """A request that the configured security policy forbids."""


class UsageError(GuardfabError):
    """A local configuration or argument problem: a missing file, a name already in use."""


class TransportError(GuardfabError):
    """A peer or device (HGS, TPM, QEMU, etcd) was unreachable or failed."""
