"""The chunked SHA-256 Merkle tree behind template disk digests.

Why a tree rather than one SHA-256 over the file: chunks hash independently, so
every core can work on the disk at once, and a region of the disk can later be
checked on its own against the signed root with a short proof.

The tree is RFC 6962's (section 2.1): leaf = SHA-256(0x00 || chunk), node =
SHA-256(0x01 || left || right), split at the largest power of two below the
leaf count, so a leaf can never be passed off as a node. The published root
also binds the disk size and chunk size (prefix 0x02), so the root alone
names exactly one byte string: truncating or appending is caught even before
the size field is compared.

Pure: hashes in, hashes out. Reading the disk is :mod:`guardfab.tenant.template`'s job.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from guardfab.errors import FormatError, VerificationError
from guardfab.formats.encoding import (
    canonical_json,
    load_json_document,
    reject_unknown_fields,
    require_dict,
    require_int,
)

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
ROOT_PREFIX = b"\x02"
HASH_SIZE = 32

#: A region proof has at most two sibling hashes per tree level; 2**64 leaves
#: would be 64 levels, so anything longer is not a proof.
MAX_PROOF_HASHES = 128
MAX_PROOF_BYTES = 64 * 1024
_MAX_U64 = 2**64 - 1

Buffer = bytes | bytearray | memoryview


def leaf_hash(chunk: Buffer) -> bytes:
    """Hash one chunk as a leaf (domain-separated from nodes)."""
    digest = hashlib.sha256(LEAF_PREFIX)
    digest.update(chunk)
    return digest.digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Hash two child hashes into their parent."""
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def bind_root(tree_root: bytes, size: int, chunk_size: int) -> bytes:
    """The published root: the tree root bound to the disk size and chunk size."""
    if not 0 <= size <= _MAX_U64 or not 0 < chunk_size <= _MAX_U64:
        raise FormatError("merkle: size and chunk size must fit in 64 bits")
    return hashlib.sha256(ROOT_PREFIX + struct.pack(">QQ", size, chunk_size) + tree_root).digest()


def chunk_count(size: int, chunk_size: int) -> int:
    """How many leaves a disk of ``size`` bytes has (the last chunk may be short)."""
    return -(-size // chunk_size)


def _split(count: int) -> int:
    """The largest power of two strictly below ``count`` (RFC 6962's k), for count >= 2."""
    return 1 << ((count - 1).bit_length() - 1)


class TreeBuilder:
    """Builds an RFC 6962 tree root from leaves given in order, in O(log n) memory.

    It keeps the roots of the complete subtrees seen so far (one per set bit of
    the leaf count), which is why memory stays flat however large the disk is.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, bytes]] = []
        self.count = 0

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash."""
        height, value = 0, leaf
        while self._stack and self._stack[-1][0] == height:
            _, left = self._stack.pop()
            value = node_hash(left, value)
            height += 1
        self._stack.append((height, value))
        self.count += 1

    def root(self) -> bytes:
        """The tree root over the leaves so far (SHA-256 of nothing for no leaves)."""
        if not self._stack:
            return hashlib.sha256(b"").digest()
        value = self._stack[-1][1]
        for _, left in reversed(self._stack[:-1]):
            value = node_hash(left, value)
        return value


def tree_root(leaves: Iterable[bytes]) -> bytes:
    """The RFC 6962 Merkle tree hash of ``leaves``."""
    builder = TreeBuilder()
    for leaf in leaves:
        builder.append(leaf)
    return builder.root()


def leaves_of(data: Buffer, chunk_size: int) -> list[bytes]:
    """Leaf hashes of an in-memory byte string (for small inputs and tests)."""
    view = memoryview(data)
    return [leaf_hash(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)]


def digest_of_bytes(data: Buffer, chunk_size: int) -> bytes:
    """The bound root of an in-memory byte string: the reference the streaming reader matches."""
    return bind_root(tree_root(leaves_of(data, chunk_size)), len(data), chunk_size)


@dataclass(frozen=True)
class RegionProof:
    """The hashes that connect chunks ``[first_chunk, end_chunk)`` to the tree root.

    They are the roots of the subtrees lying wholly outside the region, in
    left-to-right order; with them and the region's own chunks a verifier
    recomputes the root without reading the rest of the disk.
    """

    first_chunk: int
    end_chunk: int
    hashes: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.first_chunk < self.end_chunk:
            raise FormatError("region proof: the chunk range must be non-empty")
        if len(self.hashes) > MAX_PROOF_HASHES:
            raise FormatError(f"region proof: more than {MAX_PROOF_HASHES} hashes")
        if any(len(value) != HASH_SIZE for value in self.hashes):
            raise FormatError("region proof: every hash must be 32 bytes")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "first_chunk": self.first_chunk,
            "end_chunk": self.end_chunk,
            "hashes": [value.hex() for value in self.hashes],
        }

    @classmethod
    def from_dict(cls, value: Any) -> RegionProof:
        """Load the JSON form, rejecting anything malformed."""
        what = "region proof"
        obj = require_dict(value, what=what)
        reject_unknown_fields(obj, {"first_chunk", "end_chunk", "hashes"}, what=what)
        hashes = obj.get("hashes")
        if not isinstance(hashes, list) or len(hashes) > MAX_PROOF_HASHES:
            raise FormatError(f"{what}: 'hashes' must be a list of at most {MAX_PROOF_HASHES}")
        return cls(
            first_chunk=require_int(obj, "first_chunk", what=what),
            end_chunk=require_int(obj, "end_chunk", what=what),
            hashes=tuple(_hex_hash(item, what=what) for item in hashes),
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RegionProof:
        """Load a proof file (bounded JSON)."""
        what = "region proof"
        return cls.from_dict(load_json_document(data, what=what, max_bytes=MAX_PROOF_BYTES))

    def to_bytes(self) -> bytes:
        """The canonical file form."""
        return canonical_json(self.to_dict()) + b"\n"


def _hex_hash(item: Any, *, what: str) -> bytes:
    if not isinstance(item, str) or len(item) != 2 * HASH_SIZE:
        raise FormatError(f"{what}: every hash must be 64 hex digits")
    try:
        value = bytes.fromhex(item)
    except ValueError as exc:
        raise FormatError(f"{what}: every hash must be 64 hex digits") from exc
    if value.hex() != item:
        raise FormatError(f"{what}: hashes must be lowercase hex")
    return value


def prove_region(leaves: Sequence[bytes], first_chunk: int, end_chunk: int) -> RegionProof:
    """Build the proof for chunks ``[first_chunk, end_chunk)`` from the full leaf list."""
    if not 0 <= first_chunk < end_chunk <= len(leaves):
        raise FormatError(f"region proof: chunks {first_chunk}..{end_chunk} are not in the disk")
    hashes: list[bytes] = []
    _collect(leaves, first_chunk, end_chunk, hashes)
    return RegionProof(first_chunk, end_chunk, tuple(hashes))


def _collect(leaves: Sequence[bytes], lo: int, hi: int, out: list[bytes]) -> None:
    count = len(leaves)
    if hi <= 0 or lo >= count:
        out.append(tree_root(leaves))
        return
    if lo <= 0 and hi >= count:
        return
    k = _split(count)
    _collect(leaves[:k], lo, hi, out)
    _collect(leaves[k:], lo - k, hi - k, out)


def root_from_region(
    proof: RegionProof, region_leaves: Sequence[bytes], *, size: int, chunk_size: int
) -> bytes:
    """Recompute the bound root from a region's leaves and its proof.

    Raises:
        VerificationError: the proof does not fit a disk of ``size`` bytes, or
            has the wrong number of leaves or hashes.
    """
    count = chunk_count(size, chunk_size)
    if proof.end_chunk > count:
        raise VerificationError(
            f"region proof: chunks {proof.first_chunk}..{proof.end_chunk} "
            f"lie beyond the disk's {count} chunks"
        )
    if len(region_leaves) != proof.end_chunk - proof.first_chunk:
        raise VerificationError("region proof: the number of region chunks does not match")
    leaves, hashes = iter(region_leaves), iter(proof.hashes)
    value = _rebuild(count, proof.first_chunk, proof.end_chunk, leaves, hashes)
    if next(hashes, None) is not None:
        raise VerificationError("region proof: it has more hashes than the tree needs")
    return bind_root(value, size, chunk_size)


def _rebuild(
    count: int, lo: int, hi: int, leaves: Iterator[bytes], hashes: Iterator[bytes]
) -> bytes:
    if hi <= 0 or lo >= count:
        value = next(hashes, None)
        if value is None:
            raise VerificationError("region proof: it has fewer hashes than the tree needs")
        return value
    if lo <= 0 and hi >= count:
        builder = TreeBuilder()
        for _ in range(count):
            builder.append(next(leaves))
        return builder.root()
    k = _split(count)
    left = _rebuild(k, lo, hi, leaves, hashes)
    return node_hash(left, _rebuild(count - k, lo - k, hi - k, leaves, hashes))


def check_region(
    proof: RegionProof,
    region_leaves: Sequence[bytes],
    *,
    root: bytes,
    size: int,
    chunk_size: int,
) -> None:
    """Check that a region's leaves belong to the disk whose bound root is ``root``.

    Raises:
        VerificationError: the region, the proof or both do not lead to ``root``.
    """
    computed = root_from_region(proof, region_leaves, size=size, chunk_size=chunk_size)
    if not hmac.compare_digest(computed, root):
        raise VerificationError(
            f"disk region chunks {proof.first_chunk}..{proof.end_chunk}: "
            "content does not match the signed digest",
            hint="the region was modified, or the proof is for another disk",
        )
