"""The specialization disk's content: the answer file a guest applies at first boot.

The guest's init (``guest/init``) reads its second disk as UTF-8 ``key=value``
lines padded with NUL bytes. The runtime writes this content only into a
LUKS-encrypted image (:func:`guardfab.hypervisor.disk.create_encrypted_from_bytes`),
so the answer file -- the administrator's password hash, the tenant's file --
is never on the host's disks in clear. This module is pure.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from guardfab.errors import FormatError

_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: crypt(3) strings: $id$[params$]salt$hash with the crypt alphabet.
_CRYPT = re.compile(r"\$[A-Za-z0-9]+(?:\$[A-Za-z0-9./=,+-]+){1,3}")
#: The guest reads the whole disk into RAM: keep answer files small.
MAX_FILE_BYTES = 256 * 1024


@dataclass(frozen=True, repr=False)
class AnswerFile:
    """What the guest applies: its hostname, root's password hash, one file to serve.

    Its ``repr`` is redacted: the hash and file are the tenant's secrets.
    """

    hostname: str
    admin_password_hash: str | None = None
    file_name: str | None = None
    file_content: bytes = b""

    def __post_init__(self) -> None:
        if not _HOSTNAME.fullmatch(self.hostname):
            raise FormatError("hostname must be a DNS label (letters, digits, '-')")
        if self.admin_password_hash is not None and not _CRYPT.fullmatch(self.admin_password_hash):
            raise FormatError("admin password hash must be a crypt(3) string such as $y$...")
        if self.file_name is not None and not _FILE_NAME.fullmatch(self.file_name):
            raise FormatError("file name must be 1-64 letters, digits, '.', '_' or '-'")
        if len(self.file_content) > MAX_FILE_BYTES:
            raise FormatError(f"the served file is larger than {MAX_FILE_BYTES} bytes")

    def __repr__(self) -> str:
        return f"AnswerFile(hostname={self.hostname!r}, <secrets redacted>)"

    def to_bytes(self) -> bytes:
        """The disk content the guest parses (before padding)."""
        lines = [f"hostname={self.hostname}"]
        if self.admin_password_hash is not None:
            lines.append(f"admin_password_hash={self.admin_password_hash}")
        if self.file_name is not None:
            lines.append(f"file_name={self.file_name}")
            lines.append(f"file_b64={base64.b64encode(self.file_content).decode()}")
        return ("\n".join(lines) + "\n").encode()
