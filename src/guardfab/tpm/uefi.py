"""UEFI structures found in event data: variables, load options, device paths, GPT.

Every function here reads untrusted bytes for display or, for
:func:`parse_variable`, for a fact whose digest was already checked. Each raises
:class:`UndecodableError` (never an IndexError or a UnicodeDecodeError) when the
bytes are not the structure they claim to be, so the caller can show them as
hex and move on: odd event data never makes a log invalid.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple


class UndecodableError(ValueError):
    """Event data that is not the structure its event type says; shown as hex."""


def guid_str(raw: bytes) -> str:
    """Return an EFI_GUID (mixed-endian, 16 bytes) in its registry form."""
    if len(raw) != 16:
        raise UndecodableError("a GUID needs 16 bytes")
    return str(uuid.UUID(bytes_le=raw))


def guid_bytes(text: str) -> bytes:
    """Return the 16-byte EFI_GUID encoding of a registry-form GUID."""
    return uuid.UUID(text).bytes_le


#: EFI_GLOBAL_VARIABLE: SecureBoot, PK, KEK, Boot####, BootOrder.
EFI_GLOBAL_VARIABLE = guid_bytes("8be4df61-93ca-11d2-aa0d-00e098032b8c")
#: EFI_IMAGE_SECURITY_DATABASE_GUID: db, dbx, dbt, dbr.
EFI_IMAGE_SECURITY_DATABASE = guid_bytes("d719b2cb-3d3a-4596-a3bc-dad00e67656f")

_SIGNATURE_TYPES = {
    guid_bytes("a5c059a1-94e4-4aa7-87b5-ab155c2bf072"): "x509",
    guid_bytes("c1c41626-504c-4092-aca9-41f936934328"): "sha256",
    guid_bytes("826ca512-cf10-4ac9-b187-be01496631bd"): "sha1",
    guid_bytes("3c5766e8-269c-4e34-aa14-ed776e85b3b6"): "rsa2048",
    guid_bytes("3bd2a492-96c0-4079-b420-fcf98ef103ed"): "x509_sha256",
    guid_bytes("7076876e-80c2-4ee6-aad2-28b349a6865b"): "x509_sha384",
    guid_bytes("446dbf63-2502-4cda-bcfa-2465d2b0fe9d"): "x509_sha512",
}

_HANDOFF_TABLES = {
    guid_bytes("8868e871-e4f1-11d3-bc22-0080c73c8881"): "ACPI 2.0",
    guid_bytes("eb9d2d30-2d88-11d3-9a16-0090273fc14d"): "ACPI 1.0",
    guid_bytes("eb9d2d31-2d88-11d3-9a16-0090273fc14d"): "SMBIOS",
    guid_bytes("f2fd1544-9794-4a2c-992e-e5bbcf20e394"): "SMBIOS3",
}

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_VAR_HEADER = struct.Struct("<16sQQ")
_SIG_LIST = struct.Struct("<16sIII")
_BLOB = struct.Struct("<QQ")
_DP_NODE = struct.Struct("<BBH")
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")

#: Bounds that keep decoding cheap even on hostile data.
MAX_DEVICE_PATH_NODES = 64
MAX_LISTED_ITEMS = 256


def _u(fmt: struct.Struct, data: bytes, offset: int) -> tuple[Any, ...]:
    """Unpack or raise UndecodableError, so callers never see struct.error."""
    try:
        return fmt.unpack_from(data, offset)
    except struct.error as exc:
        raise UndecodableError(f"too short for a {fmt.size}-byte field at {offset}") from exc


def utf16(raw: bytes) -> str:
    """Decode UTF-16LE text, dropping trailing NULs; reject unprintable text."""
    if len(raw) % 2:
        raise UndecodableError("odd length for UTF-16 text")
    try:
        text = raw.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise UndecodableError("not valid UTF-16") from exc
    text = text.rstrip("\0")
    if not text.isprintable():
        raise UndecodableError("UTF-16 text holds control characters")
    return text


def ascii_text(raw: bytes) -> str:
    """Decode a (possibly NUL-terminated) UTF-8/ASCII string; reject binary data."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UndecodableError("not valid UTF-8 text") from exc
    text = text.rstrip("\0")
    if not text.replace("\n", " ").replace("\t", " ").isprintable():
        raise UndecodableError("text holds control characters")
    return text


# --------------------------------------------------------------------------- variables


class UefiVariable(NamedTuple):
    """A UEFI_VARIABLE_DATA: vendor GUID (16 raw bytes), name and contents."""

    guid: bytes
    name: str
    data: bytes


def parse_variable(data: bytes) -> UefiVariable:
    """Parse UEFI_VARIABLE_DATA exactly: trailing bytes are refused, not ignored."""
    guid, name_chars, data_len = _u(_VAR_HEADER, data, 0)
    name_end = _VAR_HEADER.size + 2 * name_chars
    if name_end + data_len != len(data):
        raise UndecodableError(
            f"UEFI_VARIABLE_DATA lengths ({name_chars} chars, {data_len} bytes) "
            f"do not add up to the {len(data)}-byte event"
        )
    try:
        name = data[_VAR_HEADER.size : name_end].decode("utf-16-le")
    except UnicodeDecodeError as exc:
        raise UndecodableError("variable name is not UTF-16") from exc
    return UefiVariable(guid, name, data[name_end:])


VariableKey = tuple[bytes, str]


class KnownVariables:
    """Recognise a few variables, by (GUID, name), in UEFI_VARIABLE_DATA.

    A verifier reads the facts from a handful of variables in every log it has
    not seen before; matching their raw bytes (GUID and name length, name in
    UTF-16LE, lengths adding up) costs a fraction of :func:`parse_variable` and
    decodes nothing. :meth:`match` finds a key exactly when ``parse_variable``
    would return that GUID and name (strict UTF-16LE: one byte string per name).
    """

    __slots__ = ("_by_head",)

    def __init__(self, keys: Iterable[VariableKey]) -> None:
        #: GUID + UnicodeNameLength (the first 24 bytes) -> key and its encoded name.
        self._by_head: dict[bytes, tuple[VariableKey, bytes]] = {}
        for guid, name in keys:
            if len(guid) != 16 or not name:
                # An empty name would match data too short for its own header.
                raise ValueError("a variable key is a 16-byte GUID and a name")
            head = guid + len(name).to_bytes(8, "little")
            if head in self._by_head:
                raise ValueError(
                    f"variables {name!r} and {self._by_head[head][0][1]!r} share a head"
                )
            self._by_head[head] = ((guid, name), name.encode("utf-16-le"))

    def match(self, data: bytes) -> tuple[VariableKey, bytes] | None:
        """The key ``data`` names and the variable's contents, or None for any other data."""
        known = self._by_head.get(data[:24])
        if known is None:
            return None
        key, name = known
        name_end = _VAR_HEADER.size + len(name)
        if data[_VAR_HEADER.size : name_end] != name:
            return None
        if name_end + int.from_bytes(data[24:32], "little") != len(data):
            return None
        return key, data[name_end:]


def signature_lists(data: bytes) -> list[dict[str, Any]]:
    """Summarize EFI_SIGNATURE_LISTs (db, dbx, PK, KEK): type and entry count each."""
    lists: list[dict[str, Any]] = []
    offset = 0
    while offset < len(data) and len(lists) < MAX_LISTED_ITEMS:
        sig_type, list_size, header_size, sig_size = _u(_SIG_LIST, data, offset)
        body = list_size - _SIG_LIST.size - header_size
        if list_size > len(data) - offset or body < 0 or sig_size < 16 or body % sig_size:
            raise UndecodableError(f"bad EFI_SIGNATURE_LIST sizes at {offset}")
        first = offset + _SIG_LIST.size + header_size
        lists.append(
            {
                "type": _SIGNATURE_TYPES.get(sig_type, guid_str(sig_type)),
                "entries": body // sig_size,
                "first_owner": guid_str(data[first : first + 16]) if body else None,
            }
        )
        offset += list_size
    return lists


def signature_data(data: bytes) -> dict[str, Any]:
    """Summarize an EFI_SIGNATURE_DATA (EV_EFI_VARIABLE_AUTHORITY): owner and size."""
    if len(data) < 16:
        raise UndecodableError("EFI_SIGNATURE_DATA needs a 16-byte owner")
    return {"owner": guid_str(data[:16]), "signature_bytes": len(data) - 16}


def boot_order(data: bytes) -> list[str]:
    """Decode BootOrder: a list of UINT16 option numbers."""
    if len(data) % 2:
        raise UndecodableError("BootOrder has an odd length")
    count = min(len(data) // 2, MAX_LISTED_ITEMS)
    return [f"Boot{_u(_U16, data, 2 * i)[0]:04X}" for i in range(count)]


def load_option(data: bytes) -> dict[str, Any]:
    """Decode an EFI_LOAD_OPTION (Boot####): description and device path."""
    attributes, path_len = _u(struct.Struct("<IH"), data, 0)
    end = 6
    while end + 1 < len(data) and data[end : end + 2] != b"\0\0":
        end += 2
    if end + 2 + path_len > len(data):
        raise UndecodableError("load option shorter than its device path")
    start = end + 2
    return {
        "active": bool(attributes & 1),
        "description": utf16(data[6:end]),
        "device_path": device_path(data[start : start + path_len]),
    }


# --------------------------------------------------------------------------- device paths


_PCI_ROOT_HIDS = {0x0A0341D0, 0x0A0841D0}  # EISA ids of PNP0A03 and PNP0A08


def _hard_drive(body: bytes) -> str:
    number = _u(_U32, body, 0)[0]
    if len(body) < 38:
        raise UndecodableError("hard drive node is too short")
    return f"HD({number},{guid_str(body[20:36]) if body[37] == 2 else 'MBR'})"


def _acpi(body: bytes) -> str:
    hid, uid = _u(struct.Struct("<II"), body, 0)
    return f"PciRoot({uid:#x})" if hid in _PCI_ROOT_HIDS else f"Acpi({hid:#x},{uid:#x})"


def _fv(kind: str) -> Callable[[bytes], str]:
    return lambda body: f"{kind}({guid_str(body[:16])})"


_DP_NODES: dict[tuple[int, int], Callable[[bytes], str]] = {
    (1, 1): lambda body: f"Pci({body[1]:#x},{body[0]:#x})",
    (2, 1): _acpi,
    (3, 2): lambda body: "Scsi({},{})".format(*_u(struct.Struct("<HH"), body, 0)),
    (3, 5): lambda body: f"USB({body[0]},{body[1]})",
    (3, 18): lambda body: "Sata({},{},{})".format(*_u(struct.Struct("<HHH"), body, 0)),
    (3, 23): lambda body: f"NVMe({_u(_U32, body, 0)[0]:#x})",
    (4, 1): _hard_drive,
    (4, 4): utf16,
    (4, 6): _fv("FvFile"),
    (4, 7): _fv("Fv"),
}


def _dp_node_text(node_type: int, subtype: int, body: bytes) -> str:
    """Render one device path node in UEFI text form; others as ``Node(type,subtype)``."""
    render = _DP_NODES.get((node_type, subtype))
    if render is None:
        return f"Node({node_type},{subtype})"
    try:
        return render(body)
    except IndexError as exc:
        raise UndecodableError(f"device path node ({node_type},{subtype}) is too short") from exc


def device_path(data: bytes) -> str:
    """Render an EFI_DEVICE_PATH as text: file paths in full, other nodes by kind."""
    parts: list[str] = []
    offset = 0
    while offset + _DP_NODE.size <= len(data) and len(parts) < MAX_DEVICE_PATH_NODES:
        node_type, subtype, length = _u(_DP_NODE, data, offset)
        if length < _DP_NODE.size or offset + length > len(data):
            raise UndecodableError(f"bad device path node length at {offset}")
        if node_type == 0x7F:
            break
        parts.append(_dp_node_text(node_type, subtype, data[offset + 4 : offset + length]))
        offset += length
    return "/".join(parts)


def image_load(data: bytes, uintn: int) -> dict[str, Any]:
    """Decode UEFI_IMAGE_LOAD_EVENT: where the image was and which file it came from."""
    size_fmt = _U64 if uintn == 8 else _U32
    location = _u(_U64, data, 0)[0]
    length = _u(size_fmt, data, 8)[0]
    path_len = _u(size_fmt, data, 8 + 2 * uintn)[0]
    start = 8 + 3 * uintn
    if start + path_len > len(data):
        raise UndecodableError("device path overruns the event")
    fields: dict[str, Any] = {
        "image_location": f"{location:#x}",
        "image_length": length,
        "device_path_length": path_len,
        "device_path": device_path(data[start : start + path_len]),
    }
    if start + path_len < len(data):
        fields["trailing_bytes"] = data[start + path_len :].hex()
    return fields


# --------------------------------------------------------------------------- blobs and tables


def firmware_blob(data: bytes) -> dict[str, Any]:
    """Decode UEFI_PLATFORM_FIRMWARE_BLOB: base and length of the measured region."""
    if len(data) != _BLOB.size:
        raise UndecodableError("a firmware blob record is 16 bytes")
    base, length = _BLOB.unpack(data)
    return {"blob_base": f"{base:#x}", "blob_length": f"{length:#x}"}


def firmware_blob2(data: bytes) -> dict[str, Any]:
    """Decode UEFI_PLATFORM_FIRMWARE_BLOB2: a description, base and length."""
    if not data or len(data) != 1 + data[0] + _BLOB.size:
        raise UndecodableError("firmware blob2 sizes do not add up")
    size = data[0]
    decoded = firmware_blob(data[1 + size :])
    return {"description": ascii_text(data[1 : 1 + size]), **decoded}


def handoff_tables(data: bytes, uintn: int) -> dict[str, Any]:
    """Decode UEFI_HANDOFF_TABLE_POINTERS: which configuration tables were measured."""
    count = _u(_U64 if uintn == 8 else _U32, data, 0)[0]
    if count > MAX_LISTED_ITEMS or uintn + count * 24 != len(data):
        raise UndecodableError("handoff table count does not match the event size")
    tables = []
    for i in range(count):
        raw = data[uintn + 24 * i : uintn + 24 * i + 16]
        tables.append(_HANDOFF_TABLES.get(raw, guid_str(raw)))
    return {"tables": tables}


def gpt(data: bytes) -> dict[str, Any]:
    """Summarize UEFI_GPT_DATA: the disk GUID and each partition's name and type."""
    fields = _u(_GPT_HEADER, data, 0)
    if fields[0] != b"EFI PART":
        raise UndecodableError("GPT header signature is not 'EFI PART'")
    entry_size = fields[12]
    # The event copies the 92-byte header whatever its HeaderSize field says.
    count = _u(_U64, data, _GPT_HEADER.size)[0]
    start = _GPT_HEADER.size + 8
    if entry_size < _GPT_ENTRY.size or count > MAX_LISTED_ITEMS:
        raise UndecodableError("GPT entry size or count out of range")
    if start + count * entry_size != len(data):
        raise UndecodableError("GPT partition count does not match the event size")
    partitions = []
    for i in range(count):
        type_guid, _unique, first, last, _attrs, name = _u(_GPT_ENTRY, data, start + i * entry_size)
        partitions.append(
            {"name": utf16(name), "type": guid_str(type_guid), "first_lba": first, "last_lba": last}
        )
    return {"disk_guid": guid_str(fields[9]), "partitions": partitions}
