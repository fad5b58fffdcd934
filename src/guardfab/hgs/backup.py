"""Back up a whole HGS into one encrypted file, and restore it into a fresh directory.

What a backup holds: ``hgs.json``, ``access.json``, every file under ``keys/``
(attestation signing key, nonce key, every KPS key), ``tokens/`` and ``tls/``,
and every store record -- policies, hosts, baselines, trusted signers, KPS
settings and generations, the audit log -- except the transient ones (used
nonces, pending activations, anything with a TTL).

The envelope is a standard JWE (RFC 7516, compact serialization) made by
joserfc, ``typ`` ``guardfab-hgs-backup+jwe``, content encrypted with A256GCM:

* under a passphrase: ``PBES2-HS512+A256KW`` (RFC 7518 section 4.8) with a
  random 128-bit salt and at least 600,000 PBKDF2 iterations. joserfc caps the
  count at 300,000 as a denial-of-service guard; guardfab registers the same
  joserfc algorithm with a stricter validator (600,000 to 10,000,000) in a
  registry of its own, so the algorithm is joserfc's and only the bound moves;
* under a key file: ``A256KW`` with a 256-bit key kept as an ``oct`` JWK.

The store is read as one snapshot: SQLite's in one read transaction, etcd's at
one revision however many pages it takes (:meth:`EtcdStore.snapshot`), so a
host's last record and the boot it names, or a KP generation and its audit
record, are copied as one transaction left them. The backup does not name the
backend it came from beyond the ``hgs.json`` it holds; it restores into either.

Restore writes a new directory complete or not at all (staged, then renamed).
Its store is SQLite by default (which is also how an HGS moves off etcd), or an
etcd prefix (``RestoreOptions.etcd``) that must be empty: the records go in with
"create only" transactions sized for the cluster's ``--max-txn-ops``, and if one
fails, every key created under the prefix since the restore began is deleted
again (:mod:`guardfab.hgs.backup_store`).

By default it makes a NEW private TLS CA and server certificate (for the names
of the backup or those given): a restore is as often a drill or a second site
as a takeover, and the backup's TLS key should not silently start answering
for the original. ``keep_tls`` restores the backup's TLS material instead, for
a takeover under the same name (hosts keep trusting the same CA).

A restored HGS holds the same KPS keys as the original: releasing from both
forks the generation history of a KP. Take the original out of service first.
"""

from __future__ import annotations

import datetime
import json
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwa import AESAlgKeyWrapping, PBES2HSAlgKeyEncryption
from joserfc.jwk import OctKey
from joserfc.registry import HeaderParameter

from guardfab.errors import FormatError, GuardfabError, NotAuthorizedError, UsageError
from guardfab.files import PRIVATE, PUBLIC, atomic_write
from guardfab.formats.encoding import (
    b64url_decode,
    b64url_encode,
    canonical_json,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_int,
    require_str,
)
from guardfab.hgs.backup_store import EtcdTarget, write_records
from guardfab.hgs.etcd_admin import open_settings_store
from guardfab.hgs.state import EtcdStoreSettings, HgsConfig, HgsState
from guardfab.hgs.tls import make_private_ca_and_server
from guardfab.store.audit import AuditLog
from guardfab.store.base import Store
from guardfab.store.errors import StoreError
from guardfab.store.etcd import EtcdStore
from guardfab.store.sqlite import SqliteStore

BACKUP_JWE_TYPE = "guardfab-hgs-backup+jwe"
BACKUP_CONTENT_TYPE = "guardfab.hgs-backup+json"
BACKUP_PAYLOAD_TYPE = "guardfab.hgs-backup"
BACKUP_VERSION = 1
PBES2_ALG = "PBES2-HS512+A256KW"
KEY_FILE_ALG = "A256KW"
CONTENT_ENC = "A256GCM"
#: PBKDF2 iterations written into new backups, and the range accepted on restore.
PBES2_COUNT = 600_000
MAX_PBES2_COUNT = 10_000_000
MIN_PASSPHRASE_CHARS = 12
#: A whole HGS with a long audit log; far beyond this is not a backup.
MAX_BACKUP_BYTES = 512 * 1024 * 1024
#: Store prefixes that are not state: consumed nonces and pending activations.
TRANSIENT_PREFIXES = ("nonces/", "activations/")
#: The state directory's parts a backup carries (directories are taken whole).
BACKED_UP_FILES = ("hgs.json", "access.json")
BACKED_UP_DIRS = ("keys", "tokens", "tls")
_TLS_FILES = ("tls/ca.pem", "tls/server.pem", "tls/server.key")
_PAYLOAD_FIELDS = {"type", "version", "created_at", "service_name", "files", "store"}


def _check_count(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("p2c must be an integer")
    if not PBES2_COUNT <= value <= MAX_PBES2_COUNT:
        raise ValueError(f"p2c must be {PBES2_COUNT} to {MAX_PBES2_COUNT}")


class _StrictPbes2(PBES2HSAlgKeyEncryption):
    """joserfc's PBES2, validating the iteration count against guardfab's bounds."""

    more_header_registry = {  # noqa: RUF012 - joserfc's own class attribute, replaced whole
        "p2s": HeaderParameter("PBES2 Salt Input", "str", True),
        "p2c": HeaderParameter("PBES2 Count", _check_count, True),
    }


_PBES2 = _StrictPbes2(512, AESAlgKeyWrapping(256))


class _BackupRegistry(jwe.JWERegistry):
    """A registry of its own, so the stricter PBES2 never replaces joserfc's global one."""

    algorithms = {  # noqa: RUF012 - joserfc reads the class attribute
        "alg": {**jwe.JWERegistry.algorithms["alg"], _PBES2.name: _PBES2},
        "enc": jwe.JWERegistry.algorithms["enc"],
        "zip": jwe.JWERegistry.algorithms["zip"],
    }


def _registry(alg: str) -> jwe.JWERegistry:
    registry = _BackupRegistry(algorithms=[alg, CONTENT_ENC])
    registry.max_ciphertext_length = MAX_BACKUP_BYTES
    registry.max_protected_header_length = 4096
    return registry


@dataclass(frozen=True)
class BackupSecret:
    """What a backup is encrypted under: a passphrase or a 256-bit key (never printed)."""

    passphrase: str | None = field(default=None, repr=False)
    key: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_passphrase(cls, passphrase: str) -> BackupSecret:
        """A passphrase of at least 12 characters."""
        if len(passphrase) < MIN_PASSPHRASE_CHARS:
            raise UsageError(f"a backup passphrase has at least {MIN_PASSPHRASE_CHARS} characters")
        return cls(passphrase=passphrase)

    @classmethod
    def from_key_file(cls, data: bytes) -> BackupSecret:
        """A key file made by :func:`new_key_file` (an ``oct`` JWK of 256 bits)."""
        document = require_dict(load_json_document(data, what="backup key file"), what="key file")
        if document.get("kty") != "oct":
            raise FormatError("backup key file: not an 'oct' JWK")
        key = b64url_decode(require_str(document, "k", what="backup key file"), what="key")
        if len(key) != 32:
            raise FormatError("backup key file: the key must be 256 bits")
        return cls(key=key)

    def envelope(self) -> tuple[dict[str, Any], OctKey]:
        """The JWE protected header and the joserfc key for this secret."""
        header: dict[str, Any] = {"enc": CONTENT_ENC, "typ": BACKUP_JWE_TYPE}
        header["cty"] = BACKUP_CONTENT_TYPE
        if self.key is not None:
            return {**header, "alg": KEY_FILE_ALG}, OctKey.import_key(self.key)
        if self.passphrase is None:
            raise UsageError("a backup needs a passphrase or a key file")
        key = OctKey.import_key(self.passphrase.encode("utf-8"))
        return {**header, "alg": PBES2_ALG, "p2c": PBES2_COUNT}, key


def new_key_file() -> bytes:
    """The content of a new backup key file (keep it 0600, away from the backups)."""
    key = OctKey.generate_key(256)
    return json.dumps({"kty": "oct", "k": key.as_dict(private=True)["k"]}).encode() + b"\n"


@dataclass(frozen=True)
class Backup:
    """A decrypted backup: its files (relative path -> bytes and mode) and store records."""

    created_at: int
    service_name: str
    files: dict[str, tuple[bytes, int]] = field(repr=False)
    records: list[tuple[str, bytes]] = field(repr=False)
    #: The etcd revision the records were read at (not part of the file).
    revision: int | None = field(default=None, compare=False)

    def to_bytes(self) -> bytes:
        """The canonical JSON plaintext."""
        return canonical_json(
            {
                "type": BACKUP_PAYLOAD_TYPE,
                "version": BACKUP_VERSION,
                "created_at": self.created_at,
                "service_name": self.service_name,
                "files": {
                    path: {"data": b64url_encode(data), "mode": mode}
                    for path, (data, mode) in sorted(self.files.items())
                },
                "store": [{"key": k, "value": b64url_encode(v)} for k, v in self.records],
            }
        )


# --- export ---------------------------------------------------------------------------


def collect(directory: Path, *, now: float) -> Backup:
    """Read an HGS state directory into a :class:`Backup` (store first, then files).

    The store is read first: a KPS key added meanwhile then shows as an extra
    key file, never as a primary whose files are missing.
    """
    state = HgsState(directory)
    records, revision = _store_records(state)
    files: dict[str, tuple[bytes, int]] = {}
    for name in BACKED_UP_FILES:
        files[name] = _file(state.path(name))
    for top in BACKED_UP_DIRS:
        for path in sorted(state.path(top).rglob("*")):
            relative = path.relative_to(state.dir)
            if path.is_file() and not any(p.startswith(".") for p in relative.parts):
                files[relative.as_posix()] = _file(path)
    return Backup(int(now), state.config.service_name, files, records, revision)


def _file(path: Path) -> tuple[bytes, int]:
    mode = PRIVATE if path.stat().st_mode & 0o077 == 0 else PUBLIC
    return path.read_bytes(), mode


def _open_store(state: HgsState) -> Store:
    if state.config.store.get("backend") == "etcd":
        return open_settings_store(state.etcd_settings())
    return SqliteStore(state.store_path())


def _store_records(state: HgsState) -> tuple[list[tuple[str, bytes]], int | None]:
    """Every lasting record, from one snapshot; and the etcd revision it is of."""
    store = _open_store(state)
    try:
        # One snapshot: a host's last record and the boot it names (hosts/last/,
        # hosts/boot/) are copied as one attestation left them.
        if isinstance(store, EtcdStore):
            snapshot = store.snapshot("")
            entries, revision = snapshot.entries, snapshot.revision
        else:
            entries, revision = store.list(""), None
    except StoreError as exc:
        raise StoreError(f"export-state could not read the store: {exc}") from None
    finally:
        store.close()
    records = [
        (e.key, e.value)
        for e in entries
        if e.expires_at is None and not e.key.startswith(TRANSIENT_PREFIXES)
    ]
    return records, revision


def seal(backup: Backup, secret: BackupSecret) -> bytes:
    """Encrypt a backup into its JWE file."""
    header, key = secret.envelope()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # joserfc's short-oct-key warning: PBES2 stretches it
        token = jwe.encrypt_compact(
            header, backup.to_bytes(), key, registry=_registry(header["alg"])
        )
    return token.encode("ascii") + b"\n"


def export_state(directory: Path, secret: BackupSecret, *, now: float) -> bytes:
    """Back up the HGS in ``directory``; audit that a backup of its keys was taken."""
    backup = collect(directory, now=now)
    data = seal(backup, secret)
    store = _open_store(HgsState(directory))
    try:
        AuditLog(store).append(
            kind="hgs-export",
            actor="hgs-admin",
            subject=backup.service_name,
            outcome="success",
            details=_export_details(backup),
        )
    finally:
        store.close()
    return data


def _export_details(backup: Backup) -> dict[str, Any]:
    details: dict[str, Any] = {"files": len(backup.files), "records": len(backup.records)}
    if backup.revision is not None:
        details["etcd_revision"] = backup.revision
    return details


# --- import ---------------------------------------------------------------------------


def open_backup(data: bytes, secret: BackupSecret) -> Backup:
    """Decrypt and load a backup file.

    Raises:
        NotAuthorizedError: wrong passphrase or key file.
        FormatError: not a guardfab HGS backup, or a malformed one.
    """
    if len(data) > 2 * MAX_BACKUP_BYTES:
        raise FormatError("HGS backup: larger than any backup")
    header, key = secret.envelope()
    token = data.decode("ascii", "replace").strip()
    _check_header(token, header["alg"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            obj = jwe.decrypt_compact(token, key, registry=_registry(header["alg"]))
        except JoseError as exc:
            raise NotAuthorizedError(
                "HGS backup: it does not decrypt with this passphrase or key file",
                hint="use the passphrase or key file the backup was made with",
            ) from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise FormatError("HGS backup: not a backup file") from exc
    return _backup_from(obj.plaintext or b"")


def _check_header(token: str, alg: str) -> None:
    """Refuse, with a clear reason, a file that is not a backup for this kind of secret.

    Only a pre-check: the protected header is authenticated by the AEAD tag,
    which joserfc verifies before anything is decrypted.
    """
    what = "HGS backup"
    if token.count(".") != 4:
        raise FormatError(f"{what}: not a JWE compact serialization")
    protected = require_dict(
        load_json_document(b64url_decode(token.partition(".")[0], what=what), what=what), what=what
    )
    if protected.get("typ") != BACKUP_JWE_TYPE:
        raise FormatError(f"{what}: not a guardfab HGS backup")
    if protected.get("alg") != alg:
        raise UsageError(
            f"{what}: it is encrypted with {str(protected.get('alg'))[:32]}, not {alg}",
            hint="give --key-file for A256KW backups, --passphrase-file for PBES2 ones",
        )
    if alg == PBES2_ALG:
        try:
            _check_count(protected.get("p2c"))
        except ValueError as exc:
            raise FormatError(f"{what}: {exc}") from exc


def _backup_from(plaintext: bytes) -> Backup:
    what = "HGS backup"
    body = require_dict(
        load_json_document(plaintext, what=what, max_bytes=MAX_BACKUP_BYTES), what=what
    )
    reject_unknown_fields(body, _PAYLOAD_FIELDS, what=what)
    if body.get("type") != BACKUP_PAYLOAD_TYPE or body.get("version") != BACKUP_VERSION:
        raise FormatError(f"{what}: not a version {BACKUP_VERSION} HGS backup")
    files: dict[str, tuple[bytes, int]] = {}
    for path, entry in require_dict(body.get("files"), what=f"{what} files").items():
        item = require_dict(entry, what=f"{what} file")
        mode = require_int(item, "mode", what=what)
        if mode not in (PRIVATE, PUBLIC):
            raise FormatError(f"{what}: file {path[:64]!r} has an unexpected mode")
        data = b64url_decode(
            require_str(item, "data", what=what, max_len=MAX_BACKUP_BYTES), what=what
        )
        files[_safe_path(path)] = (data, mode)
    records = body.get("store")
    if not isinstance(records, list):
        raise FormatError(f"{what}: 'store' must be a list")
    loaded = [_record(r, what=what) for r in records]
    return Backup(
        require_int(body, "created_at", what=what),
        require_str(body, "service_name", what=what),
        files,
        loaded,
    )


def _record(value: Any, *, what: str) -> tuple[str, bytes]:
    record = require_dict(value, what=f"{what} record")
    key = require_str(record, "key", what=what, max_len=512)
    return key, b64url_decode(
        require_str(record, "value", what=what, max_len=2 * 1024 * 1024), what=what
    )


def _safe_path(path: str) -> str:
    """A relative path inside the backed-up parts of a state directory, or FormatError."""
    parts = path.split("/")
    ok = path in BACKED_UP_FILES or (
        len(parts) >= 2
        and parts[0] in BACKED_UP_DIRS
        and all(p and p not in (".", "..") and not p.startswith(".") for p in parts)
    )
    if not ok or "\\" in path or "\x00" in path:
        raise FormatError(f"HGS backup: file path {path[:64]!r} is not part of an HGS directory")
    return path


@dataclass(frozen=True)
class RestoreOptions:
    """How a backup becomes a new HGS directory."""

    keep_tls: bool = False
    server_names: tuple[str, ...] | None = None
    listen: str | None = None
    #: Restore the store into this (empty) etcd prefix instead of DIR/state.db.
    etcd: EtcdStoreSettings | None = None


def restore(backup: Backup, directory: Path, options: RestoreOptions, *, now: float) -> HgsConfig:
    """Write ``backup`` as a new, complete HGS directory; return its configuration.

    With ``options.etcd`` the store goes into that etcd prefix, which must be
    empty (checked before anything is written); relative paths in the settings
    are relative to ``directory``, as in ``hgs.json``.
    """
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise UsageError(
            f"{directory} exists and is not empty", hint="restore into a new directory"
        )
    config = _restored_config(backup, options)
    target = None
    if options.etcd is not None:
        target = EtcdTarget(_resolved(options.etcd, directory))
    staging = directory.parent / f".{directory.name}.restore"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_files(staging, backup, config, options, now=now)
        if target is None:
            _write_store(SqliteStore(staging / "state.db"), backup, now=now)
        else:
            _write_etcd(target, backup, now=now)
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if target is not None:
            target.close()
    return config


def _resolved(settings: EtcdStoreSettings, directory: Path) -> EtcdStoreSettings:
    def resolve(value: str | None) -> str | None:
        return None if value is None else str(directory / value)

    return replace(
        settings,
        ca_file=resolve(settings.ca_file),
        cert_file=resolve(settings.cert_file),
        key_file=resolve(settings.key_file),
        password_file=resolve(settings.password_file),
    )


def _restored_config(backup: Backup, options: RestoreOptions) -> HgsConfig:
    if "hgs.json" not in backup.files:
        raise FormatError("HGS backup: it has no hgs.json")
    config = HgsConfig.from_dict(load_json_document(backup.files["hgs.json"][0], what="hgs.json"))
    store = {"backend": "sqlite", "path": "state.db"}
    if options.etcd is not None:
        store = options.etcd.to_dict()
    config = replace(config, store=store)
    if options.listen is not None:
        config = replace(config, listen=options.listen)
    if options.server_names:
        config = replace(config, server_names=options.server_names)
    return config


def _write_files(
    root: Path, backup: Backup, config: HgsConfig, options: RestoreOptions, *, now: float
) -> None:
    root.mkdir(parents=True, mode=0o700)
    files = dict(backup.files)
    files["hgs.json"] = (json.dumps(config.to_dict(), indent=2).encode(), PUBLIC)
    if not options.keep_tls:
        when = datetime.datetime.fromtimestamp(now, datetime.UTC)
        tls = make_private_ca_and_server(config.service_name, list(config.server_names), now=when)
        files.update(
            {
                "tls/ca.pem": (tls.ca_pem, PUBLIC),
                "tls/server.pem": (tls.server_chain_pem, PUBLIC),
                "tls/server.key": (tls.server_key_pem, PRIVATE),
            }
        )
    missing = [name for name in _TLS_FILES if name not in files]
    if missing:
        raise FormatError(f"HGS backup: TLS files missing ({', '.join(missing)})")
    for relative, (data, mode) in sorted(files.items()):
        path = root / relative
        for parent in reversed(path.relative_to(root).parents[:-1]):
            (root / parent).mkdir(mode=0o700, exist_ok=True)
        atomic_write(path, data, mode=mode)


def _write_store(store: Store, backup: Backup, *, now: float) -> None:
    """Create the backup's records in a new store, then audit the restore."""
    try:
        write_records(store, backup.records)
        _audit_restore(store, backup, now=now)
    finally:
        store.close()


def _write_etcd(target: EtcdTarget, backup: Backup, *, now: float) -> None:
    """Create the records under the target prefix; on failure leave the prefix empty."""
    try:
        target.write(backup.records)
        _audit_restore(target.store, backup, now=now)
    except GuardfabError:
        target.undo()
        raise


def _audit_restore(store: Store, backup: Backup, *, now: float) -> None:
    AuditLog(store, clock=lambda: now).append(
        kind="hgs-restore",
        actor="hgs-admin",
        subject=backup.service_name,
        outcome="success",
        details={"backup_created_at": backup.created_at, "records": len(backup.records)},
    )


def import_state(
    data: bytes, secret: BackupSecret, directory: Path, options: RestoreOptions, *, now: float
) -> HgsConfig:
    """Decrypt a backup and restore it as a new HGS directory."""
    return restore(open_backup(data, secret), directory, options, now=now)
