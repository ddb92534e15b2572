"""UUIDs the way BlueZ spells them: lowercase, 128-bit, with dashes."""

from __future__ import annotations

import re
import uuid as std_uuid

from bumble import core

_BASE_UUID_SUFFIX = "-0000-1000-8000-00805f9b34fb"
_SHORT_UUID = re.compile(r"^(0x)?([0-9a-fA-F]{4}|[0-9a-fA-F]{8})$")


def normalize(text: str) -> str:
    """A 16-, 32- or 128-bit UUID string as BlueZ prints it; ValueError if it is not one."""
    short = _SHORT_UUID.match(text)
    if short:
        return f"{int(short.group(2), 16):08x}{_BASE_UUID_SUFFIX}"
    try:
        return str(std_uuid.UUID(text))
    except ValueError:
        raise ValueError(f"not a UUID: {text!r}") from None


def from_bumble(value: core.UUID) -> str:
    """A bumble UUID (any size) in BlueZ's spelling."""
    return str(std_uuid.UUID(bytes=bytes(reversed(value.to_bytes(force_128=True)))))


def to_bumble(text: str) -> core.UUID:
    """A UUID string (any size) as a bumble UUID, 16-bit when it is on the Bluetooth base."""
    full = normalize(text)
    if full.endswith(_BASE_UUID_SUFFIX) and full.startswith("0000"):
        return core.UUID.from_16_bits(int(full[4:8], 16))
    return core.UUID(full)


def from_le_bytes(data: bytes) -> str:
    """A UUID from advertising data (2, 4 or 16 little-endian bytes)."""
    if len(data) in (2, 4):
        return f"{int.from_bytes(data, 'little'):08x}{_BASE_UUID_SUFFIX}"
    if len(data) == 16:
        return str(std_uuid.UUID(bytes=bytes(reversed(data))))
    raise ValueError(f"a UUID is 2, 4 or 16 bytes, not {len(data)}")


def to_le_bytes(text: str) -> bytes:
    """The shortest advertising-data form of a UUID string (2, 4 or 16 little-endian bytes)."""
    full = normalize(text)
    if full.endswith(_BASE_UUID_SUFFIX):
        value = int(full[:8], 16)
        return value.to_bytes(2 if value <= 0xFFFF else 4, "little")
    return bytes(reversed(std_uuid.UUID(full).bytes))
