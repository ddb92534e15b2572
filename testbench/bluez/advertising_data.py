"""Advertising data: built from an ``LEAdvertisement1`` object, parsed into ``Device1`` properties.

BlueZ puts the flags, service UUIDs, manufacturer and service data in the advertising PDU and the
local name in the scan response (src/advertising.c ``generate_scan_rsp``); both must fit the
31-byte legacy payload (Core Vol 3, Part C §11).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import Variant

from testbench.bluez import uuids

LEGACY_PAYLOAD_MAX = 31


class AdType(enum.IntEnum):
    """AD types (Bluetooth Assigned Numbers §2.3)."""

    FLAGS = 0x01
    INCOMPLETE_16_BIT_UUIDS = 0x02
    COMPLETE_16_BIT_UUIDS = 0x03
    INCOMPLETE_32_BIT_UUIDS = 0x04
    COMPLETE_32_BIT_UUIDS = 0x05
    INCOMPLETE_128_BIT_UUIDS = 0x06
    COMPLETE_128_BIT_UUIDS = 0x07
    SHORTENED_LOCAL_NAME = 0x08
    COMPLETE_LOCAL_NAME = 0x09
    TX_POWER_LEVEL = 0x0A
    SOLICIT_16_BIT_UUIDS = 0x14
    SOLICIT_128_BIT_UUIDS = 0x15
    SERVICE_DATA_16_BIT = 0x16
    APPEARANCE = 0x19
    SOLICIT_32_BIT_UUIDS = 0x1F
    SERVICE_DATA_32_BIT = 0x20
    SERVICE_DATA_128_BIT = 0x21
    MANUFACTURER_SPECIFIC_DATA = 0xFF


class AdFlag(enum.IntFlag):
    LE_LIMITED_DISCOVERABLE = 0x01
    LE_GENERAL_DISCOVERABLE = 0x02
    BR_EDR_NOT_SUPPORTED = 0x04


_UUID_LIST_TYPES = {
    2: AdType.COMPLETE_16_BIT_UUIDS,
    4: AdType.COMPLETE_32_BIT_UUIDS,
    16: AdType.COMPLETE_128_BIT_UUIDS,
}
_SOLICIT_TYPES = {
    2: AdType.SOLICIT_16_BIT_UUIDS,
    4: AdType.SOLICIT_32_BIT_UUIDS,
    16: AdType.SOLICIT_128_BIT_UUIDS,
}
_SERVICE_DATA_TYPES = {
    2: AdType.SERVICE_DATA_16_BIT,
    4: AdType.SERVICE_DATA_32_BIT,
    16: AdType.SERVICE_DATA_128_BIT,
}
_UUID_SIZE_BY_LIST_TYPE = {
    AdType.INCOMPLETE_16_BIT_UUIDS: 2,
    AdType.COMPLETE_16_BIT_UUIDS: 2,
    AdType.INCOMPLETE_32_BIT_UUIDS: 4,
    AdType.COMPLETE_32_BIT_UUIDS: 4,
    AdType.INCOMPLETE_128_BIT_UUIDS: 16,
    AdType.COMPLETE_128_BIT_UUIDS: 16,
}
_UUID_SIZE_BY_SERVICE_DATA_TYPE = {
    AdType.SERVICE_DATA_16_BIT: 2,
    AdType.SERVICE_DATA_32_BIT: 4,
    AdType.SERVICE_DATA_128_BIT: 16,
}


class AdvertisementType(enum.Enum):
    BROADCAST = "broadcast"
    PERIPHERAL = "peripheral"


@dataclass(frozen=True, slots=True, kw_only=True)
class AdvertisementSpec:
    """What an application asked to advertise (the ``LEAdvertisement1`` properties we honour)."""

    type: AdvertisementType = AdvertisementType.BROADCAST
    service_uuids: tuple[str, ...] = ()
    solicit_uuids: tuple[str, ...] = ()
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_data: Mapping[str, bytes] = field(default_factory=dict)
    extra_data: Mapping[int, bytes] = field(default_factory=dict)
    local_name: str | None = None
    include_local_name: bool = False
    appearance: int | None = None
    include_tx_power: bool = False
    tx_power: int = 0
    discoverable: bool | None = None
    timeout_s: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class AdvertisingPayload:
    """The two legacy payloads a controller sends: the advertisement and the scan response."""

    advertising_data: bytes
    scan_response_data: bytes
    connectable: bool


class AdvertisementError(ValueError):
    """The application's advertisement cannot be parsed or does not fit."""


def spec_from_properties(properties: Mapping[str, Variant]) -> AdvertisementSpec:
    """Read ``LEAdvertisement1`` properties; AdvertisementError when one is malformed."""
    try:
        return _spec_from_properties(properties)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise AdvertisementError(str(error)) from error


def _value(properties: Mapping[str, Variant], name: str, signature: str) -> Any:
    variant = properties.get(name)
    if variant is None:
        return None
    if variant.signature != signature:
        raise AdvertisementError(f"{name} has type {variant.signature}, not {signature}")
    return variant.value


def _bytes_variant(variant: Any, what: str) -> bytes:
    if not isinstance(variant, Variant) or variant.signature != "ay":
        raise AdvertisementError(f"{what} must be a byte array variant")
    return bytes(variant.value)


def _spec_from_properties(properties: Mapping[str, Variant]) -> AdvertisementSpec:
    type_name = _value(properties, "Type", "s")
    advertisement_type = (
        AdvertisementType(type_name) if type_name is not None else AdvertisementType.BROADCAST
    )
    service_uuids = tuple(uuids.normalize(u) for u in _value(properties, "ServiceUUIDs", "as") or ())
    solicit_uuids = tuple(uuids.normalize(u) for u in _value(properties, "SolicitUUIDs", "as") or ())
    manufacturer_data = {
        int(company): _bytes_variant(data, "ManufacturerData")
        for company, data in (_value(properties, "ManufacturerData", "a{qv}") or {}).items()
    }
    service_data = {
        uuids.normalize(key): _bytes_variant(data, "ServiceData")
        for key, data in (_value(properties, "ServiceData", "a{sv}") or {}).items()
    }
    extra_data = {
        int(ad_type): _bytes_variant(data, "Data")
        for ad_type, data in (_value(properties, "Data", "a{yv}") or {}).items()
    }
    includes = set(_value(properties, "Includes", "as") or ())
    unknown_includes = includes - {"tx-power", "appearance", "local-name", "rsi"}
    if unknown_includes:
        raise AdvertisementError(f"unknown Includes: {sorted(unknown_includes)}")
    local_name = _value(properties, "LocalName", "s")
    appearance = _value(properties, "Appearance", "q")
    tx_power = _value(properties, "TxPower", "n")
    timeout = _value(properties, "Timeout", "q")
    return AdvertisementSpec(
        type=advertisement_type,
        service_uuids=service_uuids,
        solicit_uuids=solicit_uuids,
        manufacturer_data=manufacturer_data,
        service_data=service_data,
        extra_data=extra_data,
        local_name=local_name if local_name else None,
        include_local_name="local-name" in includes,
        appearance=appearance if appearance is not None else (0 if "appearance" in includes else None),
        include_tx_power="tx-power" in includes,
        tx_power=int(tx_power) if tx_power is not None else 0,
        discoverable=_value(properties, "Discoverable", "b"),
        timeout_s=int(timeout or 0),
    )


def _structure(ad_type: int, payload: bytes) -> bytes:
    if len(payload) > 254:
        raise AdvertisementError("an AD structure holds at most 254 bytes")
    return bytes([len(payload) + 1, ad_type]) + payload


def _grouped_uuids(values: Sequence[str], types: Mapping[int, AdType]) -> Iterator[bytes]:
    by_size: dict[int, list[bytes]] = {}
    for value in values:
        encoded = uuids.to_le_bytes(value)
        by_size.setdefault(len(encoded), []).append(encoded)
    for size in sorted(by_size):
        yield _structure(types[size], b"".join(by_size[size]))


def build_payload(
    spec: AdvertisementSpec, *, adapter_discoverable: bool, fallback_name: str | None
) -> AdvertisingPayload:
    """The advertising and scan response data for ``spec``; AdvertisementError if too long."""
    advertising = bytearray()
    if spec.type is AdvertisementType.PERIPHERAL or spec.discoverable:
        flags = AdFlag.BR_EDR_NOT_SUPPORTED
        if spec.discoverable or (spec.discoverable is None and adapter_discoverable):
            flags |= AdFlag.LE_GENERAL_DISCOVERABLE
        advertising += _structure(AdType.FLAGS, bytes([flags]))
    for structure in _grouped_uuids(spec.service_uuids, _UUID_LIST_TYPES):
        advertising += structure
    for structure in _grouped_uuids(spec.solicit_uuids, _SOLICIT_TYPES):
        advertising += structure
    for company, data in spec.manufacturer_data.items():
        advertising += _structure(AdType.MANUFACTURER_SPECIFIC_DATA, company.to_bytes(2, "little") + data)
    for service, data in spec.service_data.items():
        encoded = uuids.to_le_bytes(service)
        advertising += _structure(_SERVICE_DATA_TYPES[len(encoded)], encoded + data)
    if spec.appearance is not None:
        advertising += _structure(AdType.APPEARANCE, spec.appearance.to_bytes(2, "little"))
    if spec.include_tx_power:
        advertising += _structure(AdType.TX_POWER_LEVEL, spec.tx_power.to_bytes(1, "little", signed=True))
    for ad_type, data in spec.extra_data.items():
        advertising += _structure(ad_type, data)
    if len(advertising) > LEGACY_PAYLOAD_MAX:
        raise AdvertisementError(
            f"advertising data is {len(advertising)} bytes; a legacy advertisement holds {LEGACY_PAYLOAD_MAX}"
        )
    scan_response = b""
    name = spec.local_name or (fallback_name if spec.include_local_name else None)
    if name:
        encoded_name = name.encode()
        room = LEGACY_PAYLOAD_MAX - 2
        name_type = AdType.COMPLETE_LOCAL_NAME if len(encoded_name) <= room else AdType.SHORTENED_LOCAL_NAME
        scan_response = _structure(name_type, _truncate_utf8(encoded_name, room))
    return AdvertisingPayload(
        advertising_data=bytes(advertising),
        scan_response_data=scan_response,
        connectable=spec.type is AdvertisementType.PERIPHERAL,
    )


def _truncate_utf8(data: bytes, limit: int) -> bytes:
    return data[:limit].decode(errors="ignore").encode()


# ---------------------------------------------------------------------- received advertisements


@dataclass(frozen=True, slots=True, kw_only=True)
class AdvertisedFields:
    """What a scanner learned from one advertisement (plus its scan response)."""

    name: str | None = None
    service_uuids: tuple[str, ...] = ()
    manufacturer_data: Mapping[int, bytes] = field(default_factory=dict)
    service_data: Mapping[str, bytes] = field(default_factory=dict)
    flags: int | None = None
    tx_power: int | None = None
    appearance: int | None = None


def iter_structures(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(AD type, payload) pairs; stops quietly at a malformed structure, as scanners do."""
    offset = 0
    while offset < len(data):
        length = data[offset]
        if length == 0 or offset + 1 + length > len(data):
            return
        yield data[offset + 1], data[offset + 2 : offset + 1 + length]
        offset += 1 + length


def parse_advertising_data(data: bytes) -> AdvertisedFields:
    complete_name: str | None = None
    short_name: str | None = None
    service_uuids: list[str] = []
    manufacturer_data: dict[int, bytes] = {}
    service_data: dict[str, bytes] = {}
    flags: int | None = None
    tx_power: int | None = None
    appearance: int | None = None
    for ad_type, payload in iter_structures(data):
        if ad_type in _UUID_SIZE_BY_LIST_TYPE:
            size = _UUID_SIZE_BY_LIST_TYPE[AdType(ad_type)]
            for start in range(0, len(payload) - size + 1, size):
                service_uuids.append(uuids.from_le_bytes(payload[start : start + size]))
        elif ad_type in _UUID_SIZE_BY_SERVICE_DATA_TYPE:
            size = _UUID_SIZE_BY_SERVICE_DATA_TYPE[AdType(ad_type)]
            if len(payload) >= size:
                service_data[uuids.from_le_bytes(payload[:size])] = payload[size:]
        elif ad_type == AdType.COMPLETE_LOCAL_NAME:
            complete_name = payload.decode(errors="replace")
        elif ad_type == AdType.SHORTENED_LOCAL_NAME:
            short_name = payload.decode(errors="replace")
        elif ad_type == AdType.MANUFACTURER_SPECIFIC_DATA and len(payload) >= 2:
            manufacturer_data[int.from_bytes(payload[:2], "little")] = payload[2:]
        elif ad_type == AdType.FLAGS and payload:
            flags = payload[0]
        elif ad_type == AdType.TX_POWER_LEVEL and len(payload) == 1:
            tx_power = int.from_bytes(payload, "little", signed=True)
        elif ad_type == AdType.APPEARANCE and len(payload) == 2:
            appearance = int.from_bytes(payload, "little")
    return AdvertisedFields(
        name=complete_name if complete_name is not None else short_name,
        service_uuids=tuple(dict.fromkeys(service_uuids)),
        manufacturer_data=manufacturer_data,
        service_data=service_data,
        flags=flags,
        tx_power=tx_power,
        appearance=appearance,
    )
