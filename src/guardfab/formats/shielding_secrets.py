"""The sealed half of a shielding data file: what only the VM's guardians may read.

The secrets are canonical JSON sealed in a JWE General JSON document (RFC 7516:
A256GCM, the content key wrapped once per guardian); the signed envelope around
them is :mod:`guardfab.formats.shielding_data`. Every class validates itself on
construction, so a loaded object and a freshly built one obey the same limits,
and no ``repr`` -- hence no log line, traceback or error message -- ever shows a
secret value.
"""

from __future__ import annotations

import enum
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from guardfab.errors import FormatError, VerificationError
from guardfab.formats import jose
from guardfab.formats.encoding import (
    b64url_decode,
    b64url_encode,
    canonical_json,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_str,
)

SECRETS_TYPE = "guardfab.shielding-secrets"
SECRETS_VERSION = 1

#: The answer file and the other files together: 384 KiB. The Windows PDK keeps
#: such files small (they ride into the VM's first boot); guardfab takes the figure
#: from issue 2 -- the local reference overview gives no number.
MAX_SECRET_FILES_BYTES = 384 * 1024
#: Other files: a handful of scripts or configuration snippets, not a payload store.
MAX_FILES = 32
MAX_USERNAME_CHARS = 256
MAX_PASSWORD_CHARS = 1024
#: An X.509 chain or OpenSSH certificate and its key are a few KB each.
MAX_HOST_CERTIFICATE_BYTES = 16 * 1024
MAX_HOST_KEY_BYTES = 16 * 1024
#: The plaintext JSON: everything above, base64-encoded, plus field names.
MAX_SECRETS_BYTES = 640 * 1024

#: A plain file name, safe on Linux and Windows guests alike: no paths, no dot files.
_FILE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_WHAT = "shielding secrets"


class AnswerFileKind(enum.StrEnum):
    """What the answer file is, so a host knows how to hand it to the guest."""

    UNATTEND = "unattend"  # Windows unattend.xml
    CLOUD_INIT = "cloud-init"  # cloud-init user-data (NoCloud seed)
    NONE = "none"  # no answer file: e.g. shielding an existing VM


class HostCertificateKind(enum.StrEnum):
    """Which remote-access protocol the host certificate authenticates the VM for."""

    RDP = "rdp"  # X.509 certificate + PKCS#8 key, PEM
    SSH = "ssh"  # OpenSSH host certificate + OpenSSH private key


def _check_text(value: Any, *, what: str, max_chars: int) -> str:
    """Return ``value`` if it is 1..max_chars printable characters.

    Control characters are refused because a stray CR or newline from a file
    would silently become part of a password; the message never quotes the value.
    """
    if not isinstance(value, str) or not 0 < len(value) <= max_chars:
        raise FormatError(f"{what} must be 1 to {max_chars} characters")
    if not value.isprintable():
        raise FormatError(f"{what} must not contain control characters or newlines")
    return value


def _check_bytes(value: Any, *, what: str, max_bytes: int) -> bytes:
    if not isinstance(value, bytes) or not 0 < len(value) <= max_bytes:
        raise FormatError(f"{what} must be 1 to {max_bytes} bytes")
    return value


def parse_enum(enum_type: type[enum.StrEnum], value: Any, *, what: str) -> Any:
    """Return ``enum_type(value)``, or a FormatError naming the allowed values."""
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise FormatError(f"{what} must be one of: {allowed}") from None


@dataclass(frozen=True, repr=False)
class AdminCredentials:
    """The VM administrator's account: set at first boot, known to the tenant only."""

    username: str
    password: str

    def __post_init__(self) -> None:
        _check_text(self.username, what="administrator user name", max_chars=MAX_USERNAME_CHARS)
        if self.username.strip() != self.username:
            raise FormatError("administrator user name must not start or end with spaces")
        _check_text(self.password, what="administrator password", max_chars=MAX_PASSWORD_CHARS)

    def __repr__(self) -> str:
        return "AdminCredentials(<hidden>)"

    def to_dict(self) -> dict[str, Any]:
        """The plaintext JSON form."""
        return {"username": self.username, "password": self.password}

    @classmethod
    def from_dict(cls, value: Any) -> AdminCredentials:
        """Load the plaintext JSON form, rejecting unknown fields."""
        what = f"{_WHAT} admin"
        obj = require_dict(value, what=what)
        reject_unknown_fields(obj, {"username", "password"}, what=what)
        return cls(
            username=require_str(obj, "username", what=what, max_len=MAX_USERNAME_CHARS),
            password=require_str(obj, "password", what=what, max_len=MAX_PASSWORD_CHARS),
        )


@dataclass(frozen=True, repr=False)
class AnswerFile:
    """An unattend.xml or cloud-init user-data file: opaque bytes for the guest."""

    kind: AnswerFileKind
    content: bytes

    def __post_init__(self) -> None:
        kind = parse_enum(AnswerFileKind, self.kind, what="answer file kind")
        object.__setattr__(self, "kind", kind)
        if kind is AnswerFileKind.NONE:
            raise FormatError("answer file kind must be 'unattend' or 'cloud-init'")
        _check_bytes(self.content, what="answer file", max_bytes=MAX_SECRET_FILES_BYTES)

    def __repr__(self) -> str:
        return f"AnswerFile(kind={self.kind.value!r}, <{len(self.content)} bytes hidden>)"

    def to_dict(self) -> dict[str, Any]:
        """The plaintext JSON form (content base64url)."""
        return {"kind": self.kind.value, "content": b64url_encode(self.content)}

    @classmethod
    def from_dict(cls, value: Any) -> AnswerFile:
        """Load the plaintext JSON form, rejecting unknown fields."""
        what = f"{_WHAT} answer_file"
        obj = require_dict(value, what=what)
        reject_unknown_fields(obj, {"kind", "content"}, what=what)
        content = require_str(obj, "content", what=what, max_len=MAX_SECRETS_BYTES)
        return cls(
            kind=parse_enum(AnswerFileKind, obj.get("kind"), what=f"{what} kind"),
            content=b64url_decode(content, what=f"{what} content"),
        )


@dataclass(frozen=True, repr=False)
class HostCertificate:
    """The certificate and private key the VM presents to RDP or SSH clients."""

    kind: HostCertificateKind
    certificate: bytes
    private_key: bytes

    def __post_init__(self) -> None:
        kind = parse_enum(HostCertificateKind, self.kind, what="host certificate kind")
        object.__setattr__(self, "kind", kind)
        _check_bytes(
            self.certificate, what="host certificate", max_bytes=MAX_HOST_CERTIFICATE_BYTES
        )
        _check_bytes(self.private_key, what="host private key", max_bytes=MAX_HOST_KEY_BYTES)

    def __repr__(self) -> str:
        return f"HostCertificate(kind={self.kind.value!r}, <hidden>)"

    def to_dict(self) -> dict[str, Any]:
        """The plaintext JSON form (certificate and key base64url)."""
        return {
            "kind": self.kind.value,
            "certificate": b64url_encode(self.certificate),
            "private_key": b64url_encode(self.private_key),
        }

    @classmethod
    def from_dict(cls, value: Any) -> HostCertificate:
        """Load the plaintext JSON form, rejecting unknown fields."""
        what = f"{_WHAT} host_certificate"
        obj = require_dict(value, what=what)
        reject_unknown_fields(obj, {"kind", "certificate", "private_key"}, what=what)
        cert = require_str(obj, "certificate", what=what, max_len=2 * MAX_HOST_CERTIFICATE_BYTES)
        key = require_str(obj, "private_key", what=what, max_len=2 * MAX_HOST_KEY_BYTES)
        return cls(
            kind=parse_enum(HostCertificateKind, obj.get("kind"), what=f"{what} kind"),
            certificate=b64url_decode(cert, what=f"{what} certificate"),
            private_key=b64url_decode(key, what=f"{what} private_key"),
        )


def check_file_name(name: Any) -> str:
    """Return ``name`` if it is a plain file name a guest can receive unchanged.

    No directories, no leading dot, no characters that mean something to a shell
    or to Windows: the host writes the file under this name inside the guest.
    """
    if not isinstance(name, str) or not _FILE_NAME_RE.fullmatch(name):
        raise FormatError(
            "file names must be 1 to 128 letters, digits, '.', '_' or '-' and start with"
            " a letter or digit",
            hint="rename the file; directories are not kept",
        )
    return name


def _frozen_files(files: Any) -> Mapping[str, bytes]:
    if not isinstance(files, Mapping):
        raise FormatError(f"{_WHAT}: files must be a mapping of name to bytes")
    if len(files) > MAX_FILES:
        raise FormatError(f"{_WHAT}: {len(files)} files is more than the limit of {MAX_FILES}")
    for name, content in files.items():
        check_file_name(name)
        if not isinstance(content, bytes):
            raise FormatError(f"{_WHAT}: file {name!r} must be bytes")
    return types.MappingProxyType(dict(sorted(files.items())))


@dataclass(frozen=True, repr=False)
class ShieldingSecrets:
    """Everything in a shielding data file that the fabric must never read.

    The answer file and the other files together stay within
    :data:`MAX_SECRET_FILES_BYTES`; files may be empty, the answer file may not.
    """

    admin: AdminCredentials
    answer_file: AnswerFile | None = None
    files: Mapping[str, bytes] = field(default_factory=dict)
    host_certificate: HostCertificate | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.admin, AdminCredentials):
            raise FormatError(f"{_WHAT}: administrator credentials are required")
        object.__setattr__(self, "files", _frozen_files(self.files))
        total = self.files_size
        if total > MAX_SECRET_FILES_BYTES:
            raise FormatError(
                f"{_WHAT}: the answer file and other files take {total} bytes, more than the"
                f" limit of {MAX_SECRET_FILES_BYTES} (384 KiB)",
                hint="move large content into the template disk or fetch it after first boot",
            )

    def __repr__(self) -> str:
        cert = self.host_certificate.kind.value if self.host_certificate else None
        return (
            f"ShieldingSecrets(admin=<hidden>, answer_file_kind={self.answer_file_kind.value!r},"
            f" files={len(self.files)}, files_size={self.files_size}, host_certificate={cert!r})"
        )

    @property
    def answer_file_kind(self) -> AnswerFileKind:
        """The kind of the answer file, or ``none``: the header repeats it in public."""
        return self.answer_file.kind if self.answer_file else AnswerFileKind.NONE

    @property
    def files_size(self) -> int:
        """Bytes counted against the 384 KiB limit: answer file plus other files."""
        answer = len(self.answer_file.content) if self.answer_file else 0
        return answer + sum(len(content) for content in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        """The plaintext JSON form; absent optional parts are left out, not null."""
        body: dict[str, Any] = {
            "type": SECRETS_TYPE,
            "version": SECRETS_VERSION,
            "admin": self.admin.to_dict(),
            "files": {name: b64url_encode(content) for name, content in self.files.items()},
        }
        if self.answer_file is not None:
            body["answer_file"] = self.answer_file.to_dict()
        if self.host_certificate is not None:
            body["host_certificate"] = self.host_certificate.to_dict()
        return body

    def to_bytes(self) -> bytes:
        """Canonical JSON: the plaintext that gets encrypted."""
        return canonical_json(self.to_dict())

    @classmethod
    def from_dict(cls, value: Any) -> ShieldingSecrets:
        """Load the plaintext JSON form, rejecting other versions and unknown fields."""
        obj = require_dict(value, what=_WHAT)
        reject_unknown_fields(
            obj,
            {"type", "version", "admin", "answer_file", "files", "host_certificate"},
            what=_WHAT,
        )
        if obj.get("type") != SECRETS_TYPE:
            raise FormatError(f"{_WHAT}: type must be {SECRETS_TYPE!r}")
        version = obj.get("version")
        if isinstance(version, bool) or version != SECRETS_VERSION:
            raise FormatError(f"{_WHAT}: version {version!r} is not supported (expected 1)")
        answer = obj.get("answer_file")
        cert = obj.get("host_certificate")
        return cls(
            admin=AdminCredentials.from_dict(obj.get("admin")),
            answer_file=None if answer is None else AnswerFile.from_dict(answer),
            files=_files_from_dict(obj.get("files")),
            host_certificate=None if cert is None else HostCertificate.from_dict(cert),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> ShieldingSecrets:
        """Parse decrypted plaintext (bounded JSON)."""
        return cls.from_dict(load_json_document(data, what=_WHAT, max_bytes=MAX_SECRETS_BYTES))


def _files_from_dict(value: Any) -> dict[str, bytes]:
    what = f"{_WHAT} files"
    obj = require_dict(value, what=what)
    if len(obj) > MAX_FILES:
        raise FormatError(f"{what}: more than {MAX_FILES} files")
    files = {}
    for name in obj:
        check_file_name(name)
        files[name] = b64url_decode(
            require_str(obj, name, what=what, max_len=MAX_SECRETS_BYTES), what=f"{what} {name}"
        )
    return files


#: A recipient of the sealed secrets: (JWE key id, public encryption key).
Recipient = tuple[str, jose.AsymmetricKey]
_JWE_FIELDS = {"protected", "iv", "ciphertext", "tag", "aad", "recipients"}
#: joserfc refuses a JWE General JSON document with more recipients than this.
MAX_RECIPIENTS = 16


def seal(
    secrets: ShieldingSecrets, recipients: Sequence[Recipient], *, aad: bytes
) -> dict[str, Any]:
    """Encrypt ``secrets`` once (A256GCM) and wrap the key for every recipient."""
    if not 0 < len(recipients) <= MAX_RECIPIENTS:
        raise FormatError(f"{_WHAT}: 1 to {MAX_RECIPIENTS} recipients are needed")
    return jose.encrypt_to_recipients(secrets.to_bytes(), list(recipients), aad=aad)


def check_sealed(value: Any, recipients: Sequence[Recipient], *, aad: bytes) -> dict[str, Any]:
    """Check a sealed JWE without any key: A256GCM only, bound to ``aad``, one wrapping each.

    Anyone (a fabric) can run this to learn that every expected recipient can
    open the secrets; decryption itself is :func:`unseal`.

    Raises:
        FormatError: not a JWE General JSON document of the shape :func:`seal` writes.
        VerificationError: bound to other data, or wrapped for other recipients.
    """
    what = f"{_WHAT} envelope"
    jwe = require_dict(value, what=what)
    reject_unknown_fields(jwe, _JWE_FIELDS, what=what)
    for member in ("protected", "iv", "ciphertext", "tag", "aad"):
        require_str(jwe, member, what=what, max_len=2 * MAX_SECRETS_BYTES)
    protected = load_json_document(
        b64url_decode(jwe["protected"], what=f"{what} protected header"),
        what=f"{what} protected header",
        max_bytes=1024,
    )
    if protected != {"enc": jose.CONTENT_ENC}:
        raise FormatError(f"{what}: the protected header must be exactly enc={jose.CONTENT_ENC}")
    if jwe["aad"] != b64url_encode(aad):
        raise VerificationError(f"{what}: the secrets are not bound to this header")
    _check_recipients(jwe.get("recipients"), recipients, what=what)
    return jwe


def _check_recipients(value: Any, recipients: Sequence[Recipient], *, what: str) -> None:
    if not isinstance(value, list) or len(value) > MAX_RECIPIENTS:
        raise FormatError(f"{what}: recipients must be a list of at most {MAX_RECIPIENTS}")
    expected = {kid: jose.wrapping_alg_for(key) for kid, key in recipients}
    found: list[str] = []
    for recipient in value:
        entry = require_dict(recipient, what=f"{what} recipient")
        reject_unknown_fields(entry, {"header", "encrypted_key"}, what=f"{what} recipient")
        require_str(entry, "encrypted_key", what=f"{what} recipient")
        params = require_dict(entry.get("header"), what=f"{what} recipient header")
        kid = require_str(params, "kid", what=f"{what} recipient header", max_len=64)
        if params.get("alg") != expected.get(kid):
            raise VerificationError(f"{what}: recipient {kid} is not an expected key wrapping")
        found.append(kid)
    if sorted(found) != sorted(expected):
        raise VerificationError(
            f"{what}: the secrets are not sealed for exactly the owner and the guardians listed",
            hint="a guardian named in the header could not open this file",
        )


def unseal(
    sealed: Mapping[str, Any], kid: str, private_key: jose.AsymmetricKey, *, aad: bytes
) -> ShieldingSecrets:
    """Decrypt sealed secrets as recipient ``kid`` and parse them.

    Raises:
        VerificationError: no wrapping for ``kid``, or a tag, key or AAD that fails.
        FormatError: the plaintext is not shielding secrets of this version.
    """
    plaintext = jose.decrypt_for_recipient(
        dict(sealed), kid, private_key, aad=aad, what=f"{_WHAT} envelope"
    )
    return ShieldingSecrets.from_bytes(plaintext)
