"""The Merkle tree behind template disk digests: RFC 6962 vectors, region proofs, attacks."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardfab.errors import FormatError, InvalidInputError, VerificationError
from guardfab.formats import merkle

# Certificate Transparency's reference leaves and tree heads (RFC 6962 test data,
# as used by certificate-transparency-go/merkle and many ports).
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
# RFC 6962 audit paths for leaf 0 and leaf 5 of the 8-leaf tree (bottom-up order).
CT_PATHS = {
    0: [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    5: [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}


TOO_MANY = b",".join([b'"' + b"0" * 64 + b'"'] * (merkle.MAX_PROOF_HASHES + 1))


def reference_mth(leaves: list[bytes]) -> bytes:
    """RFC 6962 section 2.1 MTH, written as the RFC states it (recursive, no tricks)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return merkle.node_hash(reference_mth(leaves[:k]), reference_mth(leaves[k:]))


@pytest.mark.parametrize("size", range(len(CT_ROOTS)))
def test_tree_root_matches_rfc6962_reference_heads(size: int) -> None:
    leaves = [merkle.leaf_hash(data) for data in CT_LEAVES[:size]]
    assert merkle.tree_root(leaves).hex() == CT_ROOTS[size]


@pytest.mark.parametrize("index", sorted(CT_PATHS))
def test_single_chunk_proof_holds_the_rfc6962_audit_path(index: int) -> None:
    leaves = [merkle.leaf_hash(data) for data in CT_LEAVES]
    proof = merkle.prove_region(leaves, index, index + 1)
    # Our proof lists the same subtree roots, left to right instead of bottom-up.
    assert sorted(h.hex() for h in proof.hashes) == sorted(CT_PATHS[index])


@given(st.lists(st.binary(min_size=32, max_size=32), max_size=70))
def test_streaming_builder_equals_recursive_definition(leaves: list[bytes]) -> None:
    assert merkle.tree_root(leaves) == reference_mth(leaves)


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    left, right = merkle.leaf_hash(b"a"), merkle.leaf_hash(b"b")
    # A node is not the leaf hash of its children's concatenation (second preimage defence).
    assert merkle.node_hash(left, right) != merkle.leaf_hash(left + right)


def test_bound_root_changes_with_size_and_chunk_size() -> None:
    tree = merkle.tree_root([merkle.leaf_hash(b"x" * 16)])
    roots = {
        merkle.bind_root(tree, 16, 16),
        merkle.bind_root(tree, 17, 16),
        merkle.bind_root(tree, 16, 32),
        tree,
    }
    assert len(roots) == 4


@given(
    data=st.binary(max_size=300),
    chunk_size=st.integers(min_value=1, max_value=40),
)
def test_every_byte_string_has_its_own_digest(data: bytes, chunk_size: int) -> None:
    digest = merkle.digest_of_bytes(data, chunk_size)
    assert merkle.digest_of_bytes(data + b"\x00", chunk_size) != digest
    if data:
        assert merkle.digest_of_bytes(data[:-1], chunk_size) != digest
        flipped = bytes([data[0] ^ 1]) + data[1:]
        assert merkle.digest_of_bytes(flipped, chunk_size) != digest


def _all_ranges(count: int) -> list[tuple[int, int]]:
    return [(lo, hi) for lo in range(count) for hi in range(lo + 1, count + 1)]


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8, 13])
def test_every_region_proof_verifies_for_every_range(count: int) -> None:
    chunk_size = 4
    data = bytes(range(count * chunk_size - 1))  # last chunk short
    leaves = merkle.leaves_of(data, chunk_size)
    root = merkle.digest_of_bytes(data, chunk_size)
    for lo, hi in _all_ranges(count):
        proof = merkle.prove_region(leaves, lo, hi)
        assert len(proof.hashes) <= 2 * max(1, count.bit_length())
        merkle.check_region(proof, leaves[lo:hi], root=root, size=len(data), chunk_size=4)


@pytest.mark.parametrize("count", [2, 5, 8, 11])
def test_any_changed_region_chunk_or_proof_hash_is_caught(count: int) -> None:
    data = bytes(range(count * 8))
    leaves = merkle.leaves_of(data, 8)
    root = merkle.digest_of_bytes(data, 8)
    bad = merkle.leaf_hash(b"evil")
    for lo, hi in _all_ranges(count):
        proof = merkle.prove_region(leaves, lo, hi)
        region = leaves[lo:hi]
        for i in range(len(region)):
            tampered = [*region[:i], bad, *region[i + 1 :]]
            with pytest.raises(VerificationError):
                merkle.check_region(proof, tampered, root=root, size=len(data), chunk_size=8)
        for i in range(len(proof.hashes)):
            hashes = list(proof.hashes)
            hashes[i] = bad
            forged = merkle.RegionProof(lo, hi, tuple(hashes))
            with pytest.raises(VerificationError):
                merkle.check_region(forged, region, root=root, size=len(data), chunk_size=8)


SHAPE_ATTACKS = {
    "extra hash": lambda p: merkle.RegionProof(2, 4, (*p.hashes, p.hashes[0])),
    "missing hash": lambda p: merkle.RegionProof(2, 4, p.hashes[:-1]),
    "shifted range": lambda p: merkle.RegionProof(3, 5, p.hashes),
    "beyond the disk": lambda p: merkle.RegionProof(7, 9, p.hashes),
}


@pytest.mark.parametrize("attack", sorted(SHAPE_ATTACKS))
def test_region_proof_shape_attacks(attack: str) -> None:
    data = bytes(range(64))
    leaves = merkle.leaves_of(data, 8)
    root = merkle.digest_of_bytes(data, 8)
    proof = merkle.prove_region(leaves, 2, 4)
    merkle.check_region(proof, leaves[2:4], root=root, size=64, chunk_size=8)
    with pytest.raises(VerificationError):
        merkle.check_region(
            SHAPE_ATTACKS[attack](proof), leaves[2:4], root=root, size=64, chunk_size=8
        )


def test_region_proof_needs_exactly_its_leaves_and_size() -> None:
    data = bytes(range(64))
    leaves = merkle.leaves_of(data, 8)
    root = merkle.digest_of_bytes(data, 8)
    proof = merkle.prove_region(leaves, 2, 4)
    with pytest.raises(VerificationError, match="number of region chunks"):
        merkle.check_region(proof, leaves[2:3], root=root, size=64, chunk_size=8)
    # The same leaves and proof do not pass for a disk of another size.
    with pytest.raises(VerificationError):
        merkle.check_region(proof, leaves[2:4], root=root, size=63, chunk_size=8)


def test_prove_region_rejects_ranges_outside_the_leaves() -> None:
    leaves = merkle.leaves_of(b"abcdefgh", 2)
    for lo, hi in [(0, 0), (2, 1), (0, 5), (4, 5)]:
        with pytest.raises(FormatError):
            merkle.prove_region(leaves, lo, hi)


@given(
    count=st.integers(min_value=1, max_value=40),
    data=st.data(),
)
@settings(max_examples=50)
def test_region_proof_file_round_trip(count: int, data: st.DataObject) -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(count)]
    lo = data.draw(st.integers(min_value=0, max_value=count - 1))
    hi = data.draw(st.integers(min_value=lo + 1, max_value=count))
    proof = merkle.prove_region(leaves, lo, hi)
    assert merkle.RegionProof.from_bytes(proof.to_bytes()) == proof


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"[]", "expected a JSON object"),
        (b'{"first_chunk":0,"end_chunk":1,"hashes":[],"x":1}', "unknown field"),
        (b'{"first_chunk":1,"end_chunk":1,"hashes":[]}', "non-empty"),
        (b'{"first_chunk":-1,"end_chunk":1,"hashes":[]}', "non-negative"),
        (b'{"first_chunk":0,"end_chunk":1,"hashes":["00"]}', "64 hex"),
        (b'{"first_chunk":0,"end_chunk":1,"hashes":["' + b"A" * 64 + b'"]}', "lowercase"),
        (b'{"first_chunk":0,"end_chunk":1,"hashes":["' + b"g" * 64 + b'"]}', "64 hex"),
        (b'{"first_chunk":0,"end_chunk":1,"hashes":{}}', "list"),
        (b'{"first_chunk":0,"end_chunk":1,"hashes":[' + TOO_MANY + b"]}", "at most"),
        (b"{" * 100_000, "larger than"),
    ],
)
def test_region_proof_loader_rejects(document: bytes, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        merkle.RegionProof.from_bytes(document)


@given(st.binary(max_size=400))
def test_region_proof_loader_raises_only_invalid_input(data: bytes) -> None:
    with contextlib.suppress(InvalidInputError):
        merkle.RegionProof.from_bytes(data)
