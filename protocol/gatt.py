"""GATT profile, advertisement, QR label and info characteristic (docs/protocol.md §3-§4).

The box is a GATT server with one primary powerbox service:

- write characteristic (phone to box; write and write without response): framed fragments (§5)
- notify characteristic (box to phone; notify): framed fragments (§5)
- info characteristic (read): `BoxInfo`, nothing secret

plus the standard Device Information Service (0x180A). There is no BLE pairing; security is end to
end, above GATT (EDHOC, docs/protocol.md §6).

The box advertises "PB" + the end of its box id and the powerbox service UUID, in one legacy
advertisement (31 bytes). The QR label on each user-box door tells the phone which box and outlet
it is looking at and the fingerprint of the box key it must find in the box certificate (DESIGN §7 S2).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass
from typing import Any

from protocol.encoding import Fields, decode, encode
from protocol.errors import ErrorCode, LocalProtocolError, MessageError

__all__ = [
    "ADVERTISING_FLAGS",
    "AD_TYPE_COMPLETE_LOCAL_NAME",
    "AD_TYPE_COMPLETE_UUID128_LIST",
    "AD_TYPE_FLAGS",
    "BOX_ID_MAX_LENGTH",
    "DEVICE_INFORMATION_SERVICE_UUID",
    "FINGERPRINT_LENGTH",
    "FIRMWARE_REVISION_UUID",
    "INFO_CHARACTERISTIC",
    "INFO_CHARACTERISTIC_UUID",
    "LEGACY_ADVERTISING_MAX",
    "MANUFACTURER_NAME_UUID",
    "MAX_INFO_SIZE",
    "MAX_OUTLET",
    "MODEL_NUMBER_UUID",
    "NOTIFY_CHARACTERISTIC",
    "NOTIFY_CHARACTERISTIC_UUID",
    "POWERBOX_CHARACTERISTICS",
    "QR_PREFIX",
    "SERIAL_NUMBER_UUID",
    "SERVICE_UUID",
    "SOFTWARE_REVISION_UUID",
    "WRITE_CHARACTERISTIC",
    "WRITE_CHARACTERISTIC_UUID",
    "Advertisement",
    "BoxInfo",
    "CharacteristicProperty",
    "CharacteristicSpec",
    "OutletAvailability",
    "QrLabel",
    "advertised_name",
    "advertising_data",
    "bluetooth_uuid",
    "box_key_fingerprint",
    "is_valid_box_id",
    "parse_advertising_data",
]

# --- GATT profile (docs/protocol.md §3) ---------------------------------------------------------
# Fixed random (version 4) UUIDs, chosen once; never change them, phones filter scans by SERVICE_UUID.
SERVICE_UUID = "148a0001-a210-41fe-bc54-1a86f97ada72"
WRITE_CHARACTERISTIC_UUID = "148a0002-a210-41fe-bc54-1a86f97ada72"
NOTIFY_CHARACTERISTIC_UUID = "148a0003-a210-41fe-bc54-1a86f97ada72"
INFO_CHARACTERISTIC_UUID = "148a0004-a210-41fe-bc54-1a86f97ada72"

_BLUETOOTH_BASE_UUID = uuid.UUID("00000000-0000-1000-8000-00805f9b34fb")


def bluetooth_uuid(short: int) -> str:
    """Expand a 16- or 32-bit SIG-assigned UUID onto the Base UUID (Core 5.4 Vol 3 Part B §2.5.1)."""
    if isinstance(short, bool) or not isinstance(short, int) or not 0 <= short <= 0xFFFFFFFF:
        raise LocalProtocolError(f"not a 16- or 32-bit UUID: {short!r}")
    return str(uuid.UUID(int=_BLUETOOTH_BASE_UUID.int | (short << 96)))


# Device Information Service and the characteristics the box exposes in it (Bluetooth Assigned Numbers).
DEVICE_INFORMATION_SERVICE_UUID = bluetooth_uuid(0x180A)
MODEL_NUMBER_UUID = bluetooth_uuid(0x2A24)
SERIAL_NUMBER_UUID = bluetooth_uuid(0x2A25)
FIRMWARE_REVISION_UUID = bluetooth_uuid(0x2A26)
SOFTWARE_REVISION_UUID = bluetooth_uuid(0x2A28)
MANUFACTURER_NAME_UUID = bluetooth_uuid(0x2A29)


class CharacteristicProperty(enum.IntFlag):
    """Characteristic properties bits (Core 5.4 Vol 3 Part G §3.3.1.1); bless uses the same values."""

    BROADCAST = 0x01
    READ = 0x02
    WRITE_WITHOUT_RESPONSE = 0x04
    WRITE = 0x08
    NOTIFY = 0x10
    INDICATE = 0x20


@dataclass(frozen=True, slots=True, kw_only=True)
class CharacteristicSpec:
    """One characteristic of the powerbox service: its UUID and properties."""

    uuid: str
    properties: CharacteristicProperty


WRITE_CHARACTERISTIC = CharacteristicSpec(
    uuid=WRITE_CHARACTERISTIC_UUID,
    # Both, so a phone can stream fragments without a round trip each (write without response)
    # and still get link-layer confirmation when it wants it.
    properties=CharacteristicProperty.WRITE | CharacteristicProperty.WRITE_WITHOUT_RESPONSE,
)
NOTIFY_CHARACTERISTIC = CharacteristicSpec(
    uuid=NOTIFY_CHARACTERISTIC_UUID, properties=CharacteristicProperty.NOTIFY
)
INFO_CHARACTERISTIC = CharacteristicSpec(
    uuid=INFO_CHARACTERISTIC_UUID, properties=CharacteristicProperty.READ
)
POWERBOX_CHARACTERISTICS = (WRITE_CHARACTERISTIC, NOTIFY_CHARACTERISTIC, INFO_CHARACTERISTIC)


# --- Advertisement (docs/protocol.md §3) --------------------------------------------------------
LEGACY_ADVERTISING_MAX = 31  # Core 5.4 Vol 6 Part B §2.3.1.1: AdvData of ADV_IND
AD_TYPE_FLAGS = 0x01  # Core Supplement Part A §1.3
AD_TYPE_INCOMPLETE_UUID16_LIST = 0x02
AD_TYPE_COMPLETE_UUID16_LIST = 0x03
AD_TYPE_INCOMPLETE_UUID32_LIST = 0x04
AD_TYPE_COMPLETE_UUID32_LIST = 0x05
AD_TYPE_INCOMPLETE_UUID128_LIST = 0x06
AD_TYPE_COMPLETE_UUID128_LIST = 0x07
AD_TYPE_SHORTENED_LOCAL_NAME = 0x08
AD_TYPE_COMPLETE_LOCAL_NAME = 0x09
ADVERTISING_FLAGS = 0x06  # LE General Discoverable | BR/EDR Not Supported

_NAME_PREFIX = "PB"
_NAME_SUFFIX_LENGTH = 6
_UUID_WIDTHS = {
    AD_TYPE_INCOMPLETE_UUID16_LIST: 2,
    AD_TYPE_COMPLETE_UUID16_LIST: 2,
    AD_TYPE_INCOMPLETE_UUID32_LIST: 4,
    AD_TYPE_COMPLETE_UUID32_LIST: 4,
    AD_TYPE_INCOMPLETE_UUID128_LIST: 16,
    AD_TYPE_COMPLETE_UUID128_LIST: 16,
}


def advertised_name(box_id: str) -> str:
    """Name to advertise: "PB" + the last 6 ASCII letters and digits of the box id, uppercased.

    ASCII only: `str.isalnum` accepts other scripts, and "ß".upper() is two characters long.
    """
    if not isinstance(box_id, str):
        raise LocalProtocolError(f"box id must be a str, not {type(box_id).__name__}")
    kept = "".join(ch for ch in box_id if ch.isascii() and ch.isalnum())
    return _NAME_PREFIX + kept[-_NAME_SUFFIX_LENGTH:].upper()


def advertising_data(box_id: str) -> bytes:
    """Legacy advertising data: Flags, the complete 128-bit service UUID list, the complete local name.

    3 + 18 + (2 + 8) = 31 bytes at most, exactly what a legacy advertisement holds.
    """
    name = advertised_name(box_id).encode("ascii")
    data = (
        _ad_structure(AD_TYPE_FLAGS, bytes([ADVERTISING_FLAGS]))
        # AD fields carry UUIDs little-endian (Core Supplement Part A §1.1).
        + _ad_structure(AD_TYPE_COMPLETE_UUID128_LIST, uuid.UUID(SERVICE_UUID).bytes[::-1])
        + _ad_structure(AD_TYPE_COMPLETE_LOCAL_NAME, name)
    )
    if len(data) > LEGACY_ADVERTISING_MAX:
        raise LocalProtocolError(f"advertising data of {len(data)} bytes exceeds {LEGACY_ADVERTISING_MAX}")
    return data


def _ad_structure(ad_type: int, value: bytes) -> bytes:
    return bytes([len(value) + 1, ad_type]) + value


@dataclass(frozen=True, slots=True, kw_only=True)
class Advertisement:
    """What `parse_advertising_data` could read from advertising or scan-response data."""

    name: str | None
    service_uuids: tuple[str, ...]
    flags: int | None = None

    @property
    def is_powerbox(self) -> bool:
        return SERVICE_UUID in self.service_uuids


def parse_advertising_data(data: bytes) -> Advertisement:
    """Read the AD structures (Core 5.4 Vol 3 Part C §11) we care about; never raises on any bytes.

    Advertisements come from anyone in radio range, so garbage is expected: unknown AD types are
    skipped, a truncated structure ends parsing, and what was read before it is returned. A complete
    local name wins over a shortened one. UUIDs come back as lowercase 128-bit strings.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"advertising data must be bytes, not {type(data).__name__}")
    raw = bytes(data)
    flags: int | None = None
    complete_name: str | None = None
    short_name: str | None = None
    uuids: list[str] = []
    offset = 0
    while offset < len(raw):
        length = raw[offset]
        if length == 0:  # significant part ends; the rest is zero padding
            break
        end = offset + 1 + length
        if end > len(raw):
            break
        ad_type, value = raw[offset + 1], raw[offset + 2 : end]
        offset = end
        if ad_type == AD_TYPE_FLAGS and value:
            flags = value[0]
        elif ad_type == AD_TYPE_COMPLETE_LOCAL_NAME:
            complete_name = value.decode("utf-8", errors="replace")
        elif ad_type == AD_TYPE_SHORTENED_LOCAL_NAME:
            short_name = value.decode("utf-8", errors="replace")
        elif ad_type in _UUID_WIDTHS:
            width = _UUID_WIDTHS[ad_type]
            for start in range(0, len(value) - width + 1, width):
                found = _uuid_from_ad(value[start : start + width])
                if found not in uuids:
                    uuids.append(found)
    name = complete_name if complete_name is not None else short_name
    return Advertisement(name=name, service_uuids=tuple(uuids), flags=flags)


def _uuid_from_ad(little_endian: bytes) -> str:
    if len(little_endian) == 16:
        return str(uuid.UUID(bytes=little_endian[::-1]))
    return bluetooth_uuid(int.from_bytes(little_endian, "little"))


# --- Box ids, QR label and key fingerprint (docs/protocol.md §4) ----------------------------------
BOX_ID_MAX_LENGTH = 16
MAX_OUTLET = 99
FINGERPRINT_LENGTH = 16
QR_PREFIX = "PBX1"
# Uppercase, digits and '-' are all in the QR alphanumeric set (ISO/IEC 18004 §7.4.4), which packs
# 5.5 bits per character: the label stays a small, easily scanned code.
_BOX_ID_RE = re.compile(r"[A-Z0-9-]{1,16}")
_OUTLET_RE = re.compile(r"[1-9][0-9]?")
_FINGERPRINT_B32_LENGTH = 26  # ceil(128 / 5)
_FINGERPRINT_RE = re.compile(r"[A-Z2-7]{26}")
_QR_MAX_LENGTH = len(QR_PREFIX) + 3 + BOX_ID_MAX_LENGTH + 2 + _FINGERPRINT_B32_LENGTH


def _check_outlet(outlet: int) -> None:
    if isinstance(outlet, bool) or not isinstance(outlet, int) or not 1 <= outlet <= MAX_OUTLET:
        raise LocalProtocolError(f"outlet must be 1..{MAX_OUTLET}, got {outlet!r}")


def is_valid_box_id(box_id: object) -> bool:
    """Box ids are 1..16 characters of A-Z, 0-9 and '-' so that they fit the QR alphanumeric set."""
    return isinstance(box_id, str) and _BOX_ID_RE.fullmatch(box_id) is not None


def box_key_fingerprint(public_key_raw: bytes) -> bytes:
    """SHA-256 of the raw 32-byte Ed25519 box public key (RFC 8032 §5.1.5), first 16 bytes.

    128 bits keeps the QR label small and is still far beyond a second-preimage search.
    """
    if not isinstance(public_key_raw, bytes | bytearray | memoryview) or len(public_key_raw) != 32:
        raise LocalProtocolError("an Ed25519 public key is 32 raw bytes")
    return hashlib.sha256(bytes(public_key_raw)).digest()[:FINGERPRINT_LENGTH]


@dataclass(frozen=True, slots=True, kw_only=True)
class QrLabel:
    """The QR code on a user-box door: `PBX1:<BOX_ID>:<OUTLET>:<FINGERPRINT, base32, no padding>`.

    Example: ``PBX1:SITE7-0042:3:MFRGGZDFMZTWQ2LKNNWG23TPOA``. Encoding is canonical: one label,
    one string (no leading zeros, no padding, uppercase only), so `decode(encode())` is exact.
    """

    box_id: str
    outlet: int
    fingerprint: bytes

    def __post_init__(self) -> None:
        if not is_valid_box_id(self.box_id):
            raise LocalProtocolError(f"box id must match [A-Z0-9-]{{1,16}}, got {self.box_id!r}")
        _check_outlet(self.outlet)
        if not isinstance(self.fingerprint, bytes) or len(self.fingerprint) != FINGERPRINT_LENGTH:
            raise LocalProtocolError(f"fingerprint must be {FINGERPRINT_LENGTH} bytes")

    def encode(self) -> str:
        fingerprint = base64.b32encode(self.fingerprint).decode("ascii").rstrip("=")
        return f"{QR_PREFIX}:{self.box_id}:{self.outlet}:{fingerprint}"

    @classmethod
    def decode(cls, text: str) -> QrLabel:
        """Parse a scanned label; anything else raises `MessageError` (MESSAGE_MALFORMED)."""
        if not isinstance(text, str):
            raise MessageError("QR label is not text")
        if len(text) > _QR_MAX_LENGTH:
            raise MessageError(f"QR label longer than {_QR_MAX_LENGTH} characters")
        parts = text.split(":")
        if len(parts) != 4:
            raise MessageError("QR label needs 4 ':'-separated fields")
        prefix, box_id, outlet, fingerprint = parts
        if prefix != QR_PREFIX:
            raise MessageError("not a powerbox label, or an unknown label version")
        if not is_valid_box_id(box_id):
            raise MessageError("QR label box id is not [A-Z0-9-]{1,16}")
        if _OUTLET_RE.fullmatch(outlet) is None:
            raise MessageError("QR label outlet is not 1..99 without leading zeros")
        if _FINGERPRINT_RE.fullmatch(fingerprint) is None:
            raise MessageError("QR label fingerprint is not 26 base32 characters")
        raw = base64.b32decode(fingerprint + "======")
        # 26 characters carry 130 bits; the 2 spare bits must be zero or two strings would mean one key.
        if base64.b32encode(raw).decode("ascii").rstrip("=") != fingerprint:
            raise MessageError("QR label fingerprint is not canonical base32")
        return cls(box_id=box_id, outlet=int(outlet), fingerprint=raw)

    def matches_key(self, public_key_raw: bytes) -> bool:
        """True when `public_key_raw` (from the operator-signed box certificate) is the labelled box's key."""
        return hmac.compare_digest(box_key_fingerprint(public_key_raw), self.fingerprint)


# --- Info characteristic (docs/protocol.md §3) ----------------------------------------------------
MAX_INFO_SIZE = 512  # largest attribute value (Core 5.4 Vol 3 Part F §3.2.9)
_MAX_PROTOCOL_VERSIONS = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class OutletAvailability:
    """Whether `outlet` can start a session now (free, not reserved, not faulted)."""

    outlet: int
    available: bool

    def __post_init__(self) -> None:
        _check_outlet(self.outlet)
        if not isinstance(self.available, bool):
            raise LocalProtocolError("available must be a bool")


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxInfo:
    """Value of the info characteristic: public facts a phone reads before EDHOC.

    CBOR (docs/protocol.md §3)::

        box-info = [box_id: tstr, versions: [+ uint], outlets: [* [outlet: uint, available: bool]]]

    A decoder ignores array items after the third, so a later version can append fields and
    older phones still learn which protocol versions the box speaks.
    """

    box_id: str
    protocol_versions: tuple[int, ...]
    outlets: tuple[OutletAvailability, ...]

    def __post_init__(self) -> None:
        if not is_valid_box_id(self.box_id):
            raise LocalProtocolError(f"box id must match [A-Z0-9-]{{1,16}}, got {self.box_id!r}")
        versions = self.protocol_versions
        if not isinstance(versions, tuple) or not 1 <= len(versions) <= _MAX_PROTOCOL_VERSIONS:
            raise LocalProtocolError(f"protocol_versions must be a tuple of 1..{_MAX_PROTOCOL_VERSIONS}")
        for version in versions:
            if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= 0xFFFF:
                raise LocalProtocolError(f"protocol version must be 0..65535, got {version!r}")
        if len(set(versions)) != len(versions):
            raise LocalProtocolError("protocol versions repeat")
        if not isinstance(self.outlets, tuple) or not all(
            isinstance(item, OutletAvailability) for item in self.outlets
        ):
            raise LocalProtocolError("outlets must be a tuple of OutletAvailability")
        if len({item.outlet for item in self.outlets}) != len(self.outlets):
            raise LocalProtocolError("outlet numbers repeat")

    def encode(self) -> bytes:
        # Array form, not a map: the info is read on every connection and 99 outlets must fit 512 bytes.
        return encode(
            [
                self.box_id,
                list(self.protocol_versions),
                [[item.outlet, item.available] for item in self.outlets],
            ]
        )

    @classmethod
    def decode(cls, data: bytes) -> BoxInfo:
        """Parse the characteristic value; anything malformed raises `MessageError` (MESSAGE_MALFORMED)."""
        code = ErrorCode.MESSAGE_MALFORMED
        if isinstance(data, bytes | bytearray | memoryview) and len(data) > MAX_INFO_SIZE:
            raise MessageError(f"box info longer than {MAX_INFO_SIZE} bytes")
        value: Any = decode(data, error=MessageError, code=code)
        fields = Fields("box info", error=MessageError, code=code)
        items = fields.array(value, minimum=3)
        box_id = fields.text(items[0], "box id", max_size=BOX_ID_MAX_LENGTH)
        versions = tuple(
            fields.uint(version, "protocol version", maximum=0xFFFF) for version in fields.array(items[1])
        )
        outlets = []
        for entry in fields.array(items[2]):
            pair = fields.array(entry, 2)
            outlets.append(
                (fields.uint(pair[0], "outlet", maximum=MAX_OUTLET), fields.bool_(pair[1], "available"))
            )
        try:
            return cls(
                box_id=box_id,
                protocol_versions=versions,
                outlets=tuple(OutletAvailability(outlet=n, available=free) for n, free in outlets),
            )
        except LocalProtocolError as exc:
            # The same rules that guard construction judge what the peer sent.
            raise MessageError(f"box info: {exc.detail}") from None
