"""Event data decoded for people: one decoder per event type, hex for the rest.

Decoding is for display and never decides anything: facts are read in
:mod:`guardfab.tpm.logfacts`, and only from events whose digest was checked.
A decoder that meets data it cannot read raises
:class:`~guardfab.tpm.uefi.UndecodableError`; :func:`decode` then shows the
bytes as hex with a note, so odd firmware data never breaks a listing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from guardfab.errors import FormatError
from guardfab.tpm import uefi
from guardfab.tpm.events import EventType, alg_name, parse_spec_id

_T = EventType


class Decoded(NamedTuple):
    """Event data as JSON-ready fields plus a one-line summary for a table."""

    fields: dict[str, Any]
    summary: str


Decoder = Callable[[bytes, int], Decoded]

_TAGGED = struct.Struct("<II")
#: Tagged-event ids the Linux EFI stub uses in PCR 9 (drivers/firmware/efi/libstub).
_LINUX_TAGS = {0x8F3B22EC: "Linux initrd", 0x8F3B22ED: "Linux load options"}
#: PFP separator values: 0 normally, 1 when firmware met an error; BIOS-era logs used ~0.
_SEPARATOR_VALUES = {b"\0\0\0\0": "normal", b"\1\0\0\0": "error", b"\xff" * 4: "legacy"}


def _text(data: bytes, _uintn: int) -> Decoded:
    text = uefi.ascii_text(data)
    return Decoded({"text": text}, repr(text))


def _ipl(data: bytes, _uintn: int) -> Decoded:
    """EV_IPL: GRUB logs UTF-8 strings, systemd-boot logs the UTF-16 command line.

    Older systemd-boot logged one byte short (half of the UTF-16 NUL), so an odd
    trailing NUL is dropped before decoding.
    """
    looks_utf16 = len(data) >= 2 and data[1] == 0
    if looks_utf16:
        text = uefi.utf16(data[:-1] if len(data) % 2 and data[-1] == 0 else data)
    else:
        text = uefi.ascii_text(data)
    return Decoded({"text": text, "encoding": "utf-16" if looks_utf16 else "utf-8"}, repr(text))


def _crtm_version(data: bytes, uintn: int) -> Decoded:
    """EV_S_CRTM_VERSION: a UTF-16 version string, or a GUID (PFP allows both)."""
    try:
        text = uefi.utf16(data)
    except uefi.UndecodableError:
        if len(data) == 16:
            guid = uefi.guid_str(data)
            return Decoded({"guid": guid}, f"GUID {guid}")
        return _text(data, uintn)
    return Decoded({"text": text}, repr(text))


def _blob_or_text(data: bytes, uintn: int) -> Decoded:
    """EV_POST_CODE/EV_S_CRTM_CONTENTS: a firmware blob record, or a PFP string."""
    if len(data) == 16:
        return _blob(data, uintn)
    return _text(data, uintn)


def _blob(data: bytes, _uintn: int) -> Decoded:
    fields = uefi.firmware_blob(data)
    return Decoded(fields, f"base {fields['blob_base']} length {fields['blob_length']}")


def _blob2(data: bytes, _uintn: int) -> Decoded:
    fields = uefi.firmware_blob2(data)
    summary = f"{fields['description']!r} base {fields['blob_base']} length {fields['blob_length']}"
    return Decoded(fields, summary)


def _separator(data: bytes, _uintn: int) -> Decoded:
    kind = _SEPARATOR_VALUES.get(data)
    if kind is None:
        raise uefi.UndecodableError("separator value is not 00000000, ffffffff or 01000000")
    return Decoded({"value": data.hex(), "error": kind == "error"}, f"{data.hex()} ({kind})")


def _tagged(data: bytes, _uintn: int) -> Decoded:
    """EV_EVENT_TAG: TCG_PCClientTaggedEvent (the Linux EFI stub tags its PCR 9 events)."""
    if len(data) < _TAGGED.size:
        raise uefi.UndecodableError("tagged event shorter than its header")
    tag, size = _TAGGED.unpack_from(data)
    if size != len(data) - _TAGGED.size:
        raise uefi.UndecodableError("tagged event size does not match")
    body = data[_TAGGED.size :]
    try:
        shown: str = uefi.ascii_text(body)
    except uefi.UndecodableError:
        shown = body.hex()
    name = _LINUX_TAGS.get(tag, f"{tag:#010x}")
    return Decoded({"tag": f"{tag:#010x}", "tag_name": name, "data": shown}, f"{name}: {shown}")


def _image(data: bytes, uintn: int) -> Decoded:
    fields = uefi.image_load(data, uintn)
    return Decoded(fields, fields["device_path"] or f"image at {fields['image_location']}")


def _gpt(data: bytes, _uintn: int) -> Decoded:
    fields = uefi.gpt(data)
    names = ", ".join(p["name"] or "?" for p in fields["partitions"])
    return Decoded(fields, f"disk {fields['disk_guid']}: {names}")


def _handoff(data: bytes, uintn: int) -> Decoded:
    fields = uefi.handoff_tables(data, uintn)
    return Decoded(fields, ", ".join(fields["tables"]))


def _handoff2(data: bytes, uintn: int) -> Decoded:
    if not data or len(data) < 1 + data[0]:
        raise uefi.UndecodableError("handoff tables2 description overruns the event")
    description = uefi.ascii_text(data[1 : 1 + data[0]])
    fields = {"description": description, **uefi.handoff_tables(data[1 + data[0] :], uintn)}
    return Decoded(fields, f"{description!r}: {', '.join(fields['tables'])}")


# --------------------------------------------------------------------------- variables

_SIGNATURE_DBS = {"PK", "KEK", "db", "dbx", "dbt", "dbr"}


def _secure_boot(data: bytes) -> tuple[dict[str, Any], str]:
    enabled = data == b"\x01"
    return {"enabled": enabled}, "enabled" if enabled else "disabled"


def _signature_db(data: bytes) -> tuple[dict[str, Any], str]:
    lists = uefi.signature_lists(data)
    counts: dict[str, int] = {}
    for item in lists:
        counts[item["type"]] = counts.get(item["type"], 0) + item["entries"]
    summary = ", ".join(f"{count} {kind}" for kind, count in counts.items())
    return {"signature_lists": lists}, summary or "empty"


def _boot_order(data: bytes) -> tuple[dict[str, Any], str]:
    order = uefi.boot_order(data)
    return {"boot_order": order}, ",".join(order)


def _load_option(data: bytes) -> tuple[dict[str, Any], str]:
    option = uefi.load_option(data)
    return option, f"{option['description']!r} {option['device_path']}"


_VARIABLE_DECODERS: dict[str, Callable[[bytes], tuple[dict[str, Any], str]]] = {
    "SecureBoot": _secure_boot,
    "BootOrder": _boot_order,
    **dict.fromkeys(_SIGNATURE_DBS, _signature_db),
}


def _variable_contents(var: uefi.UefiVariable, event_type: int) -> tuple[dict[str, Any], str]:
    """Decode a variable's contents by what it is; unknown variables stay hex."""
    if event_type == _T.EV_EFI_VARIABLE_AUTHORITY:
        if var.name in _SIGNATURE_DBS:
            fields = uefi.signature_data(var.data)
            return fields, f"owner {fields['owner']}"
        return _authority_contents(var.data)
    decoder = _VARIABLE_DECODERS.get(var.name)
    if decoder is None and var.name.startswith("Boot") and len(var.name) == 8:
        decoder = _load_option
    if decoder is None:
        return {"data": var.data.hex()}, f"{len(var.data)} bytes"
    return decoder(var.data)


def _authority_contents(data: bytes) -> tuple[dict[str, Any], str]:
    """Shim's authority events: SbatLevel text, or a certificate (shown as hex)."""
    try:
        text = uefi.ascii_text(data)
    except uefi.UndecodableError:
        return {"data": data.hex()}, f"{len(data)} bytes"
    return {"text": text}, repr(text)


def _variable(event_type: int) -> Decoder:
    def decode_variable(data: bytes, _uintn: int) -> Decoded:
        var = uefi.parse_variable(data)
        fields: dict[str, Any] = {
            "variable_guid": uefi.guid_str(var.guid),
            "name": var.name,
            "data_length": len(var.data),
        }
        try:
            contents, summary = _variable_contents(var, event_type)
        except uefi.UndecodableError as exc:
            contents, summary = {"data": var.data.hex(), "note": str(exc)}, "undecoded contents"
        fields.update(contents)
        return Decoded(fields, f"{var.name}: {summary}")

    return decode_variable


# --------------------------------------------------------------------------- EV_NO_ACTION

_STARTUP_LOCALITY = b"StartupLocality\0"


def _no_action(data: bytes, _uintn: int) -> Decoded:
    """EV_NO_ACTION: the Spec ID header, StartupLocality and other informational events."""
    if data.startswith(b"Spec ID Event03\0"):
        try:
            spec = parse_spec_id(data)
        except FormatError as exc:
            raise uefi.UndecodableError(str(exc)) from exc
        banks = {alg_name(alg): size for alg, size in spec.digest_sizes}
        fields = {
            "signature": "Spec ID Event03",
            "platform_class": spec.platform_class,
            "spec_version": spec.version,
            "uintn_size": spec.uintn_size,
            "digest_sizes": banks,
            "vendor_info": spec.vendor_info.hex(),
        }
        return Decoded(fields, f"Spec ID Event03 {spec.version}, banks {', '.join(banks)}")
    if data.startswith(_STARTUP_LOCALITY) and len(data) == 17:
        return Decoded(
            {"signature": "StartupLocality", "locality": data[16]}, f"locality {data[16]}"
        )
    signature = data[:16].split(b"\0", 1)[0]
    try:
        name = uefi.ascii_text(signature) if len(signature) < 16 else ""
    except uefi.UndecodableError:
        name = ""
    if not name:
        raise uefi.UndecodableError("no known EV_NO_ACTION signature")
    return Decoded({"signature": name, "hex": data[len(name) + 1 :].hex()}, name)


_DECODERS: dict[int, Decoder] = {
    _T.EV_NO_ACTION: _no_action,
    _T.EV_SEPARATOR: _separator,
    _T.EV_ACTION: _text,
    _T.EV_EFI_ACTION: _text,
    _T.EV_EFI_HCRTM_EVENT: _text,
    _T.EV_OMIT_BOOT_DEVICE_EVENTS: _text,
    _T.EV_PLATFORM_CONFIG_FLAGS: _text,
    _T.EV_NONHOST_INFO: _text,
    _T.EV_TABLE_OF_DEVICES: _text,
    _T.EV_IPL: _ipl,
    _T.EV_S_CRTM_VERSION: _crtm_version,
    _T.EV_POST_CODE: _blob_or_text,
    _T.EV_S_CRTM_CONTENTS: _blob_or_text,
    _T.EV_EFI_PLATFORM_FIRMWARE_BLOB: _blob,
    _T.EV_EFI_PLATFORM_FIRMWARE_BLOB2: _blob2,
    _T.EV_EVENT_TAG: _tagged,
    _T.EV_EFI_BOOT_SERVICES_APPLICATION: _image,
    _T.EV_EFI_BOOT_SERVICES_DRIVER: _image,
    _T.EV_EFI_RUNTIME_SERVICES_DRIVER: _image,
    _T.EV_EFI_GPT_EVENT: _gpt,
    _T.EV_EFI_HANDOFF_TABLES: _handoff,
    _T.EV_EFI_HANDOFF_TABLES2: _handoff2,
    **{
        kind: _variable(kind)
        for kind in (
            _T.EV_EFI_VARIABLE_DRIVER_CONFIG,
            _T.EV_EFI_VARIABLE_BOOT,
            _T.EV_EFI_VARIABLE_BOOT2,
            _T.EV_EFI_VARIABLE_AUTHORITY,
        )
    },
}


def decode(event_type: int, data: bytes, uintn_size: int = 8) -> Decoded:
    """Decode event data for a person; never raises on odd data.

    Args:
        event_type: the event's type (any 32-bit value).
        data: the event data, untrusted.
        uintn_size: bytes in a UEFI UINTN (from the Spec ID header; 8 on x86-64).
    """
    decoder = _DECODERS.get(event_type)
    if decoder is None:
        return Decoded({"hex": data.hex()}, f"{len(data)} bytes")
    try:
        return decoder(data, uintn_size)
    except (uefi.UndecodableError, struct.error) as exc:
        return Decoded(
            {"hex": data.hex(), "note": f"not decodable: {exc}"}, f"{len(data)} bytes (?)"
        )
