"""Template disk signing and verification: the I/O around :mod:`guardfab.formats.template`.

The disk digest streams the file: each worker thread reads a chunk with
``os.preadv`` into its own reused buffer and hashes it (hashlib releases the GIL
for large buffers, so the threads really run in parallel), while the calling
thread folds the leaves into the Merkle tree in order. Memory is a few buffers
per worker and O(log n) tree state, whatever the disk's size; nothing maps or
loads the whole file.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardfab.errors import FormatError, UsageError, VerificationError
from guardfab.formats import jose, merkle
from guardfab.formats.encoding import load_json_document
from guardfab.formats.keyfiles import load_public_key
from guardfab.formats.template import (
    CATALOG_TYPE,
    MAX_CATALOG_BYTES,
    QUALIFIER_TYPE,
    DiskDigest,
    DiskSignatureStatement,
    DiskVersion,
    PublisherKey,
    VerifiedDiskSignature,
    VersionRule,
    VolumeIdQualifier,
    VolumeSignatureCatalog,
    check_chunk_size,
    verify_disk_signature,
)

#: Leaf chunk size of new signatures. 4 MiB keeps the tree tiny (512 leaves for
#: 2 GiB) and per-chunk overhead negligible; measured no slower than 1 MiB.
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
#: Each read fills this much of a worker's buffer before hashing it: small
#: enough to stay in the L2 cache between the copy and the hash (measured
#: fastest of 128 KiB..4 MiB), and independent of the chunk size.
READ_BLOCK = 512 * 1024

#: Called with the number of bytes just hashed, in disk order.
ProgressCallback = Callable[[int], None]


def default_workers() -> int:
    """One hashing thread per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class DiskMeasurement:
    """A disk's size, its digest and (if asked for) every leaf hash, for region proofs."""

    size: int
    digest: DiskDigest
    leaves: tuple[bytes, ...] = ()

    def prove_region(self, first_chunk: int, end_chunk: int) -> merkle.RegionProof:
        """The proof that lets chunks ``[first_chunk, end_chunk)`` be checked on their own.

        Raises:
            UsageError: the measurement was made without keeping its leaves.
        """
        if len(self.leaves) != merkle.chunk_count(self.size, self.digest.chunk_size):
            raise UsageError("region proofs need a measurement made with keep_leaves=True")
        return merkle.prove_region(self.leaves, first_chunk, end_chunk)


@contextlib.contextmanager
def _open_disk(path: Path) -> Iterator[tuple[int, int]]:
    """Open a disk image (regular file or block device) and yield (fd, size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UsageError(f"cannot open disk {path}: {exc.strerror}") from exc
    try:
        # lseek, not fstat: a block device's st_size is 0.
        size = os.lseek(fd, 0, os.SEEK_END)
        yield fd, size
    finally:
        os.close(fd)


def disk_size(path: Path) -> int:
    """The size of a disk image or block device, in bytes (for progress bars).

    Raises:
        UsageError: the disk cannot be opened.
    """
    with _open_disk(Path(path)) as (_, size):
        return size


def _hash_chunk(fd: int, offset: int, length: int, local: threading.local) -> bytes:
    """Hash one chunk as a Merkle leaf, reading it block by block into this thread's buffer."""
    buffer: memoryview | None = getattr(local, "buffer", None)
    if buffer is None:
        buffer = local.buffer = memoryview(bytearray(READ_BLOCK))
    digest = hashlib.sha256(merkle.LEAF_PREFIX)
    end = offset + length
    while offset < end:
        count = os.preadv(fd, [buffer[: min(READ_BLOCK, end - offset)]], offset)
        if count == 0:
            raise UsageError(
                "the disk became shorter while it was read",
                hint="do not modify a disk while it is being signed or verified",
            )
        digest.update(buffer[:count])
        offset += count
    return digest.digest()


def iter_leaves(
    fd: int,
    *,
    size: int,
    chunk_size: int,
    first_chunk: int = 0,
    end_chunk: int | None = None,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> Iterator[bytes]:
    """Yield the leaf hashes of chunks ``[first_chunk, end_chunk)`` in order, hashed in parallel.

    At most two chunks per worker are in flight, so memory does not grow with
    the disk; the caller sees leaves in disk order whatever order threads finish.
    """
    count = merkle.chunk_count(size, chunk_size)
    end = count if end_chunk is None else end_chunk
    threads = workers or default_workers()
    local = threading.local()
    pending: deque[tuple[Future[bytes], int]] = deque()
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="guardfab-digest") as pool:
        try:
            index = first_chunk
            while pending or index < end:
                while index < end and len(pending) < 2 * threads:
                    offset = index * chunk_size
                    length = min(chunk_size, size - offset)
                    pending.append((pool.submit(_hash_chunk, fd, offset, length, local), length))
                    index += 1
                future, length = pending.popleft()
                leaf = future.result()
                if progress is not None:
                    progress(length)
                yield leaf
        finally:
            for future, _ in pending:
                future.cancel()


def measure_disk(
    path: Path,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
    keep_leaves: bool = False,
) -> DiskMeasurement:
    """Compute the Merkle digest of the disk at ``path`` without loading it.

    Raises:
        UsageError: the disk cannot be read or changed size while being read.
        FormatError: ``chunk_size`` is not allowed.
    """
    check_chunk_size(chunk_size)
    with _open_disk(Path(path)) as (fd, size):
        try:
            return _measure_fd(
                fd,
                size,
                chunk_size=chunk_size,
                workers=workers,
                progress=progress,
                keep_leaves=keep_leaves,
            )
        except OSError as exc:
            raise UsageError(f"cannot read disk {path}: {exc.strerror}") from exc


def _measure_fd(
    fd: int,
    size: int,
    *,
    chunk_size: int,
    workers: int | None,
    progress: ProgressCallback | None,
    keep_leaves: bool,
) -> DiskMeasurement:
    builder = merkle.TreeBuilder()
    kept: list[bytes] = []
    leaves = iter_leaves(fd, size=size, chunk_size=chunk_size, workers=workers, progress=progress)
    for leaf in leaves:
        builder.append(leaf)
        if keep_leaves:
            kept.append(leaf)
    root = merkle.bind_root(builder.root(), size, chunk_size)
    return DiskMeasurement(size, DiskDigest(root=root, chunk_size=chunk_size), tuple(kept))


def protect_disk(
    path: Path,
    private_key: jose.AsymmetricKey,
    *,
    name: str,
    version: DiskVersion,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[DiskSignatureStatement, bytes]:
    """Measure the disk and sign {digest, size, name, version}; return the statement and file.

    The statement is built (and its name and version checked) before the disk
    is read, so a bad argument fails at once rather than after minutes of hashing.

    Raises:
        FormatError: bad name, version or chunk size, or an empty disk.
        UsageError: the disk cannot be read.
    """
    jose.signing_alg_for(private_key)
    DiskSignatureStatement(
        name=name, disk_version=version, size=1, digest=DiskDigest(bytes(32), chunk_size)
    )
    measurement = measure_disk(path, chunk_size=chunk_size, workers=workers, progress=progress)
    if measurement.size == 0:
        raise FormatError(f"disk {path} is empty; there is nothing to sign")
    statement = DiskSignatureStatement(
        name=name, disk_version=version, size=measurement.size, digest=measurement.digest
    )
    return statement, statement.sign(private_key)


def verify_disk(
    path: Path,
    signature: bytes,
    publisher: PublisherKey,
    *,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> VerifiedDiskSignature:
    """Check that the disk at ``path`` is byte for byte what ``publisher`` signed.

    The signature is verified first (it is small, and its chunk size is needed);
    then the size is compared, so truncation or appending fails before any hashing.

    Raises:
        FormatError, VerificationError: bad signature file, wrong publisher, or
            a disk whose size or content differs from the signed one.
        UsageError: the disk cannot be read.
    """
    verified = verify_disk_signature(signature, publisher)
    expected = verified.statement
    with _open_disk(Path(path)) as (_, size):
        if size != expected.size:
            raise VerificationError(
                f"disk {path} is {size} bytes but the signature is for {expected.size} bytes",
                hint="the disk was truncated or extended after it was signed",
            )
    measurement = measure_disk(
        path, chunk_size=expected.digest.chunk_size, workers=workers, progress=progress
    )
    if measurement.size != expected.size or not hmac.compare_digest(
        measurement.digest.root, expected.digest.root
    ):
        raise VerificationError(
            f"disk {path}: content does not match the signed digest",
            hint="the disk was modified after it was signed, or this is another disk",
        )
    return verified


def check_disk_region(
    path: Path,
    signature: VerifiedDiskSignature,
    proof: merkle.RegionProof,
    *,
    workers: int | None = None,
) -> None:
    """Check only chunks ``[proof.first_chunk, proof.end_chunk)`` of a disk against its signature.

    Reads nothing outside the region, so a host that has fetched part of a disk
    can trust that part before the rest arrives.

    Raises:
        VerificationError: the region differs from what was signed, or is missing.
        UsageError: the disk cannot be read.
    """
    statement = signature.statement
    chunk_size = statement.digest.chunk_size
    if proof.end_chunk > merkle.chunk_count(statement.size, chunk_size):
        raise VerificationError("region proof: the region lies beyond the signed disk")
    with _open_disk(Path(path)) as (fd, size):
        region_end = min(proof.end_chunk * chunk_size, statement.size)
        if size < region_end:
            raise VerificationError(f"disk {path} is too short to hold the region")
        try:
            leaves = list(
                iter_leaves(
                    fd,
                    size=statement.size,
                    chunk_size=chunk_size,
                    first_chunk=proof.first_chunk,
                    end_chunk=proof.end_chunk,
                    workers=workers,
                )
            )
        except OSError as exc:
            raise UsageError(f"cannot read disk {path}: {exc.strerror}") from exc
    merkle.check_region(
        proof, leaves, root=statement.digest.root, size=statement.size, chunk_size=chunk_size
    )


@dataclass(frozen=True)
class TrustAnchor:
    """Whom a verification trusts: a publisher key, and optionally which templates of theirs."""

    publisher: PublisherKey
    qualifier: VolumeIdQualifier | None = None
    source: str = "public key"

    def verify(
        self,
        path: Path,
        signature: bytes,
        *,
        workers: int | None = None,
        progress: ProgressCallback | None = None,
    ) -> VerifiedDiskSignature:
        """Verify the disk against the publisher, then apply the qualifier if there is one.

        The qualifier is checked on the verified statement before the disk is
        hashed, so a wrong name or version fails without reading the disk.
        """
        if self.qualifier is not None:
            self.qualifier.check(verify_disk_signature(signature, self.publisher))
        return verify_disk(path, signature, self.publisher, workers=workers, progress=progress)


def load_trust_anchor(data: bytes, *, what: str) -> TrustAnchor:
    """Load a trusted publisher from a public key (PEM or JWK), a catalog or a qualifier.

    A catalog admits exactly its name and version (rule ``equals``); a qualifier
    admits what its rule says; a bare key admits anything that key signed.

    Raises:
        FormatError, VerificationError: the file is none of these, or a catalog's
            self-signature does not verify.
    """
    document = _json_object_or_none(data, what=what)
    if document is not None and "catalog" in document:
        catalog = VolumeSignatureCatalog.from_bytes(data)
        qualifier = catalog.qualifier(VersionRule.EQUALS)
        return TrustAnchor(catalog.publisher, qualifier, "volume signature catalog")
    if document is not None and document.get("type") == QUALIFIER_TYPE:
        qualifier = VolumeIdQualifier.from_dict(document)
        return TrustAnchor(qualifier.publisher, qualifier, "volume ID qualifier")
    if document is not None and document.get("type") == CATALOG_TYPE:
        raise FormatError(f"{what}: a catalog payload without its signature is not trusted")
    return TrustAnchor(PublisherKey.from_key(load_public_key(data, what=what)))


def _json_object_or_none(data: bytes, *, what: str) -> dict[str, Any] | None:
    if not data.lstrip().startswith(b"{"):
        return None
    document = load_json_document(data, what=what, max_bytes=MAX_CATALOG_BYTES)
    return document if isinstance(document, dict) else None
