"""The host signing key behind one small interface, chosen by URI (file or PKCS#11 token).

In host-key mode the host proves itself by signing the attestation binding with
the key the HGS registered. Where that key lives is the administrator's choice,
named by a URI in the host configuration, in the manner of securesystemslib's
signers:

* ``file:/etc/guardfab/host-signing.pem`` or a plain absolute path: a PEM key
  file, mode 0600 (the original backend).
* ``pkcs11:token=guardfab;object=host-signing;type=private?module-path=/usr/lib/
  softhsm/libsofthsm2.so&pin-source=file:/etc/guardfab/hsm.pin`` (RFC 7512): a
  private key that never leaves a PKCS#11 token (an HSM, a smart card, SoftHSM).

Both produce raw JOSE signatures (ES256/ES384 as ``r || s``, PS256 as RSASSA-PSS
with SHA-256 and a 32-byte salt), so the compact JWS is assembled here from its
standard parts and the HGS cannot tell the backends apart.

The token's user PIN is read from the ``pin-source`` file at each login and
never kept, logged, put in a message or passed on a command line; a
``pin-value`` in the URI is refused, since URIs end up in configuration files,
status output and process lists.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, unquote_to_bytes

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc.jwk import ECKey, RSAKey

from guardfab.errors import FormatError, TransportError, UsageError
from guardfab.formats import jose
from guardfab.formats.encoding import b64url_encode
from guardfab.host.keys import FileSigner

if TYPE_CHECKING:
    import pkcs11
    from pkcs11._pkcs11 import lib as pkcs11_lib

_MAX_URI_CHARS = 4096
_MAX_PIN_BYTES = 256
_PSS_SALT = 32
_EC_DIGESTS = {"ES256": (32, hashlib.sha256), "ES384": (48, hashlib.sha384)}

# RFC 7512 section 2.3: the characters a path or a query attribute value may hold.
_P_VALUE = re.compile(r"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=&]|%[0-9A-Fa-f]{2})*")
_Q_VALUE = re.compile(r"(?:[A-Za-z0-9\-._~:\[\]@!$'()*+,=/?|]|%[0-9A-Fa-f]{2})*")
_PATH_ATTRS = ("token", "manufacturer", "model", "serial", "object", "type", "id")
_QUERY_ATTRS = ("module-path", "pin-source")
_REFUSED_QUERY = {
    "pin-value": "a PIN in the URI is refused (it would be shown in files and process lists); "
    "put it in a file (mode 0600) and name it with pin-source=file:/PATH",
    "module-name": "give the module by its absolute path: module-path=/PATH/TO/MODULE.so",
}


class HostSigner(Protocol):
    """The host signing key: its public half, its key id, and raw JOSE signatures."""

    @property
    def public_key(self) -> jose.AsymmetricKey:
        """The public key the HGS registers (``hgs host add-key``)."""

    @property
    def alg(self) -> str:
        """The JOSE algorithm of :meth:`sign` (ES256, ES384 or PS256)."""

    @property
    def key_id(self) -> str:
        """The RFC 7638 thumbprint of the public key (the JWS ``kid``)."""

    @property
    def description(self) -> str:
        """Where the key lives, for messages (no secrets)."""

    def sign(self, signing_input: bytes) -> bytes:
        """The raw JOSE signature of ``signing_input`` (r || s for EC)."""


def public_jwk(signer: HostSigner) -> dict[str, Any]:
    """The signer's public JWK (exactly the RFC 7638 members)."""
    return jose.public_jwk(signer.public_key)


def detached_jws(signer: HostSigner, payload: bytes, *, typ: str) -> str:
    """A compact JWS over ``payload`` with the payload detached (RFC 7515 appendix F).

    The protected header holds ``alg`` (the signer's), ``typ`` and ``kid`` (the
    key's thumbprint); the signing input is ``b64url(header) '.' b64url(payload)``.
    """
    header = {"alg": signer.alg, "kid": signer.key_id, "typ": typ}
    protected = b64url_encode(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    signing_input = f"{protected}.{b64url_encode(payload)}".encode("ascii")
    return f"{protected}..{b64url_encode(signer.sign(signing_input))}"


# ---------------------------------------------------------------------- PKCS#11 URI


def _decode(value: str, pattern: re.Pattern[str], name: str, what: str) -> bytes:
    if not pattern.fullmatch(value):
        raise FormatError(f"{what}: the value of '{name}' has characters RFC 7512 does not allow")
    return unquote_to_bytes(value)


def _text(raw: bytes, name: str, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what}: '{name}' is not UTF-8") from None
    if not text or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise FormatError(f"{what}: '{name}' is empty or has control characters")
    return text


def _attributes(
    part: str, sep: str, allowed: tuple[str, ...], pattern: re.Pattern[str], what: str
) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for item in part.split(sep) if part else []:
        name, eq, value = item.partition("=")
        if name in _REFUSED_QUERY and sep == "&":
            raise FormatError(f"{what}: {_REFUSED_QUERY[name]}")
        if not eq or name not in allowed:
            raise FormatError(
                f"{what}: unsupported attribute {name!r} (allowed: {', '.join(allowed)})"
            )
        if name in found:
            raise FormatError(f"{what}: attribute {name!r} given twice")
        found[name] = _decode(value, pattern, name, what)
    return found


def _absolute(value: str, name: str, what: str) -> Path:
    if "\0" in value or not value.startswith("/"):
        raise FormatError(f"{what}: {name} must be an absolute path")
    return Path(value)


def _pin_source(value: str, what: str) -> Path:
    if value.startswith("file://"):
        value = value[len("file://") :]
        if not value.startswith("/"):
            raise FormatError(f"{what}: pin-source must be a local file (file:/PATH)")
    elif value.startswith("file:"):
        value = value[len("file:") :]
    return _absolute(value, "pin-source", what)


@dataclass(frozen=True)
class Pkcs11Uri:
    """A private key on a PKCS#11 token (RFC 7512), with its module and PIN file.

    Attributes:
        token: the token label (``token=``).
        module_path: the PKCS#11 module (``module-path=``), an absolute path.
        pin_source: the file holding the user PIN (``pin-source=``).
        object: the key's label (``object=``); this or ``id`` is needed.
        id: the key's CKA_ID (``id=``, percent-encoded bytes).
        manufacturer, model, serial: further token attributes, to choose among tokens.
    """

    token: str
    module_path: Path
    pin_source: Path
    object: str | None = None
    id: bytes | None = None
    manufacturer: str | None = None
    model: str | None = None
    serial: str | None = None

    @classmethod
    def parse(cls, text: str, *, what: str = "PKCS#11 URI") -> Pkcs11Uri:
        """Strictly parse ``pkcs11:PATH?QUERY``; refuse anything this backend would ignore.

        Raises:
            FormatError: not a PKCS#11 URI of the supported shape (the message says why,
                and never repeats a ``pin-value``).
        """
        if (
            not isinstance(text, str)
            or not text.startswith("pkcs11:")
            or len(text) > _MAX_URI_CHARS
        ):
            raise FormatError(f"{what}: expected a pkcs11: URI")
        path, _, query = text[len("pkcs11:") :].partition("?")
        if "#" in query:
            raise FormatError(f"{what}: no fragment in the URI")
        attrs = _attributes(path, ";", _PATH_ATTRS, _P_VALUE, what)
        params = _attributes(query, "&", _QUERY_ATTRS, _Q_VALUE, what)
        if attrs.get("type", b"private") != b"private":
            raise FormatError(f"{what}: type must be 'private' (the signing key)")
        for needed in ("token", "module-path", "pin-source"):
            if needed not in attrs and needed not in params:
                raise FormatError(f"{what}: '{needed}' is needed")
        if "object" not in attrs and "id" not in attrs:
            raise FormatError(f"{what}: name the key with object= (its label) or id=")
        texts = {n: _text(v, n, what) for n, v in attrs.items() if n not in ("id", "type")}
        return cls(
            token=texts["token"],
            module_path=_absolute(
                _text(params["module-path"], "module-path", what), "module-path", what
            ),
            pin_source=_pin_source(_text(params["pin-source"], "pin-source", what), what),
            object=texts.get("object"),
            id=attrs.get("id") or None,
            manufacturer=texts.get("manufacturer"),
            model=texts.get("model"),
            serial=texts.get("serial"),
        )

    def __str__(self) -> str:
        """The canonical URI text (what the configuration file holds)."""
        safe_p, safe_q = ":[]@!$'()*+,=&", ":[]@!$'()*+,=/?|"
        parts = [f"token={quote(self.token, safe=safe_p)}"]
        for name in ("manufacturer", "model", "serial", "object"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={quote(value, safe=safe_p)}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{b:02X}" for b in self.id))
        parts.append("type=private")
        query = (
            f"module-path={quote(str(self.module_path), safe=safe_q)}"
            f"&pin-source={quote('file:' + str(self.pin_source), safe=safe_q)}"
        )
        return f"pkcs11:{';'.join(parts)}?{query}"

    @property
    def key_name(self) -> str:
        """The key as a person names it: ``token 'T' object 'O'``."""
        name = f"'{self.object}'" if self.object is not None else f"id {self.id!r}"
        return f"PKCS#11 token '{self.token}' object {name}"


SignerRef = Path | Pkcs11Uri


def parse_signer_ref(value: Any, what: str) -> SignerRef:
    """``pkcs11:...`` → :class:`Pkcs11Uri`; ``file:/PATH`` or ``/PATH`` → an absolute path."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise FormatError(f"{what}: expected a key path or a pkcs11: URI")
    if value.startswith("pkcs11:"):
        return Pkcs11Uri.parse(value, what=what)
    if value.startswith("file:"):
        value = value[len("file:") :]
    return _absolute(value, "the key file", what)


# ---------------------------------------------------------------------- PKCS#11 token


class TokenUnavailableError(TransportError):
    """The PKCS#11 module or token could not be used (retrying later may work)."""

    hint = "check that the token is present and that module-path names its PKCS#11 module"


class TokenLoginError(UsageError):
    """The token refused the PIN from the pin-source file."""


class TokenKeyNotFoundError(UsageError):
    """The token has no (or more than one) private key matching the URI."""


def read_pin(path: Path) -> str:
    """The PIN in ``path`` (first line); the file must not be readable by others.

    Raises:
        UsageError: the file is missing, world-readable, empty or too long.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(
            f"cannot read the PIN file {path} ({exc.strerror})",
            hint="write the token's user PIN to it (one line) and chmod 600 it",
        ) from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o007:
            raise UsageError(
                f"the PIN file {path} is not a private regular file",
                hint=f"chmod 600 {path} (or 640 with a group only the agent is in)",
            )
        data = handle.read(_MAX_PIN_BYTES + 1)
    pin = data.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
    if not pin or len(data) > _MAX_PIN_BYTES or not pin.isascii() or not pin.isprintable():
        raise UsageError(
            f"the PIN file {path} is empty, too long or not one line of text",
            hint="one line: the PIN",
        )
    return pin


def _library(path: Path) -> pkcs11_lib:
    """The loaded module (python-pkcs11 loads and initializes each path once per process)."""
    import pkcs11  # noqa: PLC0415 - only hosts with a token need the binding

    if not path.is_file():
        raise UsageError(
            f"the PKCS#11 module {path} does not exist",
            hint="install the token's module (apt-get install softhsm2 for SoftHSM) "
            "or fix module-path in the URI",
        )
    try:
        return pkcs11.lib(str(path))
    except pkcs11.PKCS11Error as exc:
        raise TokenUnavailableError(
            f"cannot load the PKCS#11 module {path} ({type(exc).__name__})"
        ) from None


def _find_token(uri: Pkcs11Uri) -> pkcs11.Token:
    import pkcs11  # noqa: PLC0415

    serial = None if uri.serial is None else uri.serial.encode()
    try:
        tokens = list(
            _library(uri.module_path).get_tokens(token_label=uri.token, token_serial=serial)
        )
    except pkcs11.PKCS11Error as exc:
        raise TokenUnavailableError(
            f"cannot list the tokens of {uri.module_path} ({type(exc).__name__})"
        ) from None
    tokens = [
        t for t in tokens
        if uri.manufacturer in (None, t.manufacturer_id) and uri.model in (None, t.model)
    ]  # fmt: skip
    if len(tokens) != 1:
        found = "no" if not tokens else "more than one"
        raise TokenKeyNotFoundError(
            f"{found} PKCS#11 token labelled '{uri.token}' in {uri.module_path}",
            hint="list the tokens (softhsm2-util --show-slots, or pkcs11-tool --module "
            f"{uri.module_path} --list-token-slots) and fix token= (or add serial=) in the URI",
        )
    token: pkcs11.Token = tokens[0]
    return token


@contextmanager
def _session(uri: Pkcs11Uri, *, rw: bool = False) -> Iterator[pkcs11.Session]:
    """A logged-in session on the URI's token (the PIN read now, and not kept)."""
    import pkcs11  # noqa: PLC0415

    token = _find_token(uri)
    try:
        session = token.open(rw=rw, user_pin=read_pin(uri.pin_source))
    except (pkcs11.PinIncorrect, pkcs11.PinInvalid, pkcs11.PinLenRange, pkcs11.PinLocked) as exc:
        reason = "is locked" if isinstance(exc, pkcs11.PinLocked) else "refused the PIN"
        raise TokenLoginError(
            f"PKCS#11 token '{uri.token}' {reason} (PIN file {uri.pin_source})",
            hint=f"put the token's user PIN in {uri.pin_source}; a locked PIN is reset "
            "by the token's security officer",
        ) from None
    except pkcs11.PKCS11Error as exc:
        raise TokenUnavailableError(
            f"cannot log in to PKCS#11 token '{uri.token}' ({type(exc).__name__})"
        ) from None
    try:
        yield session
    finally:
        session.close()


def _search(session: pkcs11.Session, uri: Pkcs11Uri, object_class: Any) -> list[Any]:
    from pkcs11 import Attribute  # noqa: PLC0415

    template: dict[Any, Any] = {Attribute.CLASS: object_class}
    if uri.object is not None:
        template[Attribute.LABEL] = uri.object
    if uri.id is not None:
        template[Attribute.ID] = uri.id
    return list(session.get_objects(template))


def _private_key(session: pkcs11.Session, uri: Pkcs11Uri) -> Any:
    from pkcs11 import ObjectClass  # noqa: PLC0415

    found = _search(session, uri, ObjectClass.PRIVATE_KEY)
    if len(found) != 1:
        what = "no private key" if not found else "more than one private key"
        raise TokenKeyNotFoundError(
            f"{what} matches {uri.key_name}",
            hint="list the keys (pkcs11-tool --module MODULE --token-label TOKEN --login "
            "--list-objects), fix object=/id= in the URI, or generate the key with "
            "'guardfab host keygen --pkcs11 URI'",
        )
    return found[0]


def _public_key(session: pkcs11.Session, uri: Pkcs11Uri, private: Any) -> jose.AsymmetricKey:
    """The public half: from the matching public key object (or the RSA private's attributes)."""
    from pkcs11 import Attribute, KeyType, ObjectClass  # noqa: PLC0415
    from pkcs11.util.ec import encode_ec_public_key  # noqa: PLC0415

    public = _search(session, uri, ObjectClass.PUBLIC_KEY)
    key_type = private[Attribute.KEY_TYPE]
    if key_type == KeyType.RSA:
        source = public[0] if len(public) == 1 else private
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(source[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(source[Attribute.MODULUS], "big"),
        )
        key: jose.AsymmetricKey = RSAKey.import_key(numbers.public_key())
    elif key_type == KeyType.EC and len(public) == 1:
        raw = serialization.load_der_public_key(encode_ec_public_key(public[0]))
        key = ECKey.import_key(raw)  # type: ignore[arg-type]
    else:
        raise TokenKeyNotFoundError(
            f"{uri.key_name}: an EC or RSA key with its public key object is needed",
            hint="generate the key pair on the token (both objects, same label and id)",
        )
    return jose.import_public_jwk(jose.public_jwk(key), what=uri.key_name)


def _token_sign(private: Any, alg: str, signing_input: bytes) -> bytes:
    from pkcs11 import MGF, Mechanism  # noqa: PLC0415

    if alg == "PS256":
        param = (Mechanism.SHA256, MGF.SHA256, _PSS_SALT)
        return bytes(
            private.sign(
                signing_input, mechanism=Mechanism.SHA256_RSA_PKCS_PSS, mechanism_param=param
            )
        )
    size, hasher = _EC_DIGESTS[alg]
    signature = bytes(private.sign(hasher(signing_input).digest(), mechanism=Mechanism.ECDSA))
    if len(signature) != 2 * size:
        raise TokenUnavailableError(f"the token returned a {len(signature)}-byte ECDSA signature")
    return signature


class Pkcs11Signer:
    """A private key on a PKCS#11 token; each signature opens and closes its own session.

    A session per signature (every few hours) keeps the agent working across a
    token that was removed and put back, and keeps no PIN in memory between them.
    """

    def __init__(self, uri: Pkcs11Uri) -> None:
        """Open the token, log in and find the key and its public half.

        Raises:
            TokenLoginError: the PIN was refused.
            TokenKeyNotFoundError: no such token or key.
            TokenUnavailableError: the module or token failed.
            UsageError: the module or PIN file is missing, or the PIN file is not private.
        """
        self.uri = uri
        self._lock = threading.Lock()
        with _session(uri) as session:
            self._public = _public_key(session, uri, _private_key(session, uri))
        self._alg = jose.signing_alg_for(self._public)

    @property
    def public_key(self) -> jose.AsymmetricKey:
        """The public half (read from the token)."""
        return self._public

    @property
    def alg(self) -> str:
        """ES256, ES384 or PS256."""
        return self._alg

    @property
    def key_id(self) -> str:
        """The RFC 7638 thumbprint."""
        return jose.thumbprint(self._public)

    @property
    def description(self) -> str:
        """``PKCS#11 token 'T' object 'O'``."""
        return self.uri.key_name

    def sign(self, signing_input: bytes) -> bytes:
        """Sign on the token: CKM_ECDSA over the SHA-256/384 digest, or CKM_SHA256_RSA_PKCS_PSS."""
        import pkcs11  # noqa: PLC0415

        with self._lock, _session(self.uri) as session:
            private = _private_key(session, self.uri)
            try:
                return _token_sign(private, self._alg, signing_input)
            except pkcs11.PKCS11Error as exc:
                raise TokenUnavailableError(
                    f"{self.uri.key_name} failed to sign ({type(exc).__name__})"
                ) from None


#: Key types ``guardfab host keygen --pkcs11`` generates on a token.
TOKEN_KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")


def generate_token_key(uri: Pkcs11Uri, key_type: str = "ec-p256") -> Pkcs11Signer:
    """Generate a non-extractable signing key pair on the token, labelled as the URI says.

    Raises:
        UsageError: a key with that label/id exists already, or an unknown key type.
        TokenUnavailableError, TokenLoginError: as for :class:`Pkcs11Signer`.
    """
    import pkcs11  # noqa: PLC0415
    from pkcs11 import Attribute, KeyType  # noqa: PLC0415
    from pkcs11.util.ec import encode_named_curve_parameters  # noqa: PLC0415

    if key_type not in TOKEN_KEY_TYPES or uri.object is None:
        raise UsageError(f"keygen needs object= in the URI and a key type in {TOKEN_KEY_TYPES}")
    with _session(uri, rw=True) as session:
        if _search(session, uri, pkcs11.ObjectClass.PRIVATE_KEY):
            raise UsageError(f"{uri.key_name} exists already", hint="choose another object= label")
        key_id = uri.id or secrets.token_bytes(8)
        private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True}
        common: dict[Any, Any] = {"store": True, "label": uri.object, "id": key_id}
        try:
            if key_type.startswith("rsa-"):
                session.generate_keypair(
                    KeyType.RSA, int(key_type[4:]), private_template=private, **common
                )
            else:
                curve = {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[key_type]
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)},
                    local=True,
                )
                params.generate_keypair(private_template=private, **common)
        except pkcs11.PKCS11Error as exc:
            raise TokenUnavailableError(
                f"{uri.key_name}: key generation failed ({type(exc).__name__})"
            ) from None
    return Pkcs11Signer(uri)


def open_signer(ref: SignerRef) -> HostSigner:
    """The signer for a configured key: a PEM file or a PKCS#11 token key."""
    if isinstance(ref, Pkcs11Uri):
        return Pkcs11Signer(ref)
    return FileSigner.open(ref)
