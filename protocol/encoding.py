"""Strict CBOR helpers shared by every decoder in `protocol/`.

cbor2 is lenient in ways a protocol must not be: it ignores trailing bytes and turns some tags
into rich Python objects. Decoders here demand exactly one item and check every field's type,
so that anything malformed becomes a `RemoteProtocolError` with a specific code, never a stray
library exception (docs/protocol.md §2.1).
"""

from __future__ import annotations

import enum
import io
from typing import Any, TypeVar

import cbor2

from protocol.errors import ErrorCode, RemoteProtocolError

E = TypeVar("E", bound=enum.IntEnum)

# Deeply nested input could exhaust the C decoder's stack; nothing we define nests past 6.
MAX_NESTING = 16


def encode(value: object) -> bytes:
    """Deterministic CBOR (RFC 8949 §4.2, as cbor2's canonical mode implements it)."""
    return cbor2.dumps(value, canonical=True)


def decode(data: bytes, *, error: type[RemoteProtocolError], code: ErrorCode) -> Any:
    """Decode exactly one CBOR item or raise `error(code=code)`."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise error("not bytes", code=code)
    stream = io.BytesIO(bytes(data))
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises several unrelated types on garbage
        raise error(f"invalid CBOR: {exc.__class__.__name__}", code=code) from None
    if stream.tell() != len(data):
        raise error("trailing bytes after CBOR item", code=code)
    if _depth(value) > MAX_NESTING:
        raise error("CBOR nested too deeply", code=code)
    return value


def decode_sequence(data: bytes, *, error: type[RemoteProtocolError], code: ErrorCode) -> list[Any]:
    """Decode a CBOR sequence (RFC 8742): zero or more items back to back."""
    stream = io.BytesIO(bytes(data))
    decoder = cbor2.CBORDecoder(stream)
    items: list[Any] = []
    try:
        while stream.tell() < len(data):
            items.append(decoder.decode())
    except Exception as exc:
        raise error(f"invalid CBOR sequence: {exc.__class__.__name__}", code=code) from None
    if any(_depth(item) > MAX_NESTING for item in items):
        raise error("CBOR nested too deeply", code=code)
    return items


def _depth(value: object, level: int = 0) -> int:
    if level > MAX_NESTING:
        return level
    if isinstance(value, list | tuple):
        return max((_depth(item, level + 1) for item in value), default=level + 1)
    if isinstance(value, dict):
        return max(
            (max(_depth(k, level + 1), _depth(v, level + 1)) for k, v in value.items()),
            default=level + 1,
        )
    return level


class Fields:
    """Typed access to a decoded CBOR array or map, each failure a coded error.

    Used by every `decode` so the checks read as the CDDL does.
    """

    __slots__ = ("_code", "_error", "_what")

    def __init__(self, what: str, *, error: type[RemoteProtocolError], code: ErrorCode) -> None:
        self._what = what
        self._error = error
        self._code = code

    def fail(self, detail: str) -> RemoteProtocolError:
        return self._error(f"{self._what}: {detail}", code=self._code)

    def array(self, value: object, length: int | None = None, *, minimum: int | None = None) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail("expected an array")
        if length is not None and len(value) != length:
            raise self.fail(f"expected {length} items, got {len(value)}")
        if minimum is not None and len(value) < minimum:
            raise self.fail(f"expected at least {minimum} items")
        return value

    def map(self, value: object) -> dict[Any, Any]:
        if not isinstance(value, dict):
            raise self.fail("expected a map")
        return value

    def uint(self, value: object, name: str, *, maximum: int = 2**64 - 1) -> int:
        if type(value) is not int or value < 0 or value > maximum:
            raise self.fail(f"{name} must be an unsigned integer up to {maximum}")
        return value

    def int_(self, value: object, name: str) -> int:
        if type(value) is not int or not -(2**63) <= value < 2**63:
            raise self.fail(f"{name} must be an integer")
        return value

    def bytes_(self, value: object, name: str, *, size: int | None = None, max_size: int = 4096) -> bytes:
        if not isinstance(value, bytes):
            raise self.fail(f"{name} must be a byte string")
        if size is not None and len(value) != size:
            raise self.fail(f"{name} must be {size} bytes")
        if len(value) > max_size:
            raise self.fail(f"{name} longer than {max_size} bytes")
        return value

    def text(self, value: object, name: str, *, max_size: int = 256) -> str:
        if not isinstance(value, str) or len(value) > max_size:
            raise self.fail(f"{name} must be a text string up to {max_size} characters")
        return value

    def bool_(self, value: object, name: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"{name} must be a boolean")
        return value

    def enum(self, value: object, name: str, enum_type: type[E]) -> E:
        raw = self.uint(value, name)
        try:
            return enum_type(raw)
        except ValueError:
            raise self.fail(f"unknown {name} {raw}") from None
