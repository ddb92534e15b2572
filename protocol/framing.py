"""GATT framing: messages of any size over any ATT MTU, several phones on one box (docs/protocol.md §5).

Every GATT write (phone to box) and every notification (box to phone) is exactly one fragment::

    fragment = connection_id (u16 BE) || control (1 byte) || [length (u16 BE), FIRST only] || payload
    control  = FIRST (bit 7) | LAST (bit 6) | sequence number mod 64 (bits 0-5)

The sequence number is 0 on the FIRST fragment and grows by one per fragment. Connection id 0 is
reserved. The ATT payload of one write or notification is `att_mtu - 3` bytes (Bluetooth Core 5.4
Vol 3 Part F §3.4.5.3 / §3.4.7.1), so a FIRST fragment carries `att_mtu - 8` message bytes and every
later fragment `att_mtu - 6`.

The connection id exists because bless does not tell the box which central wrote and notifies every
subscriber (docs/DESIGN.md §3): the box tells phones apart by it, and a phone drops notifications that
carry someone else's id.

Sans-IO (h11 style): `fragment()` returns bytes to write, `Reassembler.receive()` takes one fragment
and returns an event. Nothing here blocks, sleeps or touches a radio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from protocol.errors import ErrorCode, LocalProtocolError

__all__ = [
    "ATT_MTU_MAX",
    "ATT_MTU_MIN",
    "ATT_OVERHEAD",
    "CONTINUATION_HEADER_SIZE",
    "FIRST_HEADER_SIZE",
    "MAX_CONNECTION_ID",
    "MAX_MESSAGE_SIZE",
    "FragmentEvent",
    "FrameRejected",
    "MessageReceived",
    "Reassembler",
    "fragment",
]

MAX_MESSAGE_SIZE = 8192
"""Largest message (after reassembly) either end sends or accepts by default."""

ATT_MTU_MIN = 23  # Bluetooth Core 5.4 Vol 3 Part F §3.2.8: ATT_MTU minimum for LE
ATT_MTU_MAX = 517  # the largest value a 512-byte attribute plus ATT header needs
ATT_OVERHEAD = 3  # ATT opcode (1) + attribute handle (2) in a Write / Handle Value Notification

MAX_CONNECTION_ID = 0xFFFF
CONTINUATION_HEADER_SIZE = 3  # connection id (2) + control (1)
FIRST_HEADER_SIZE = 5  # ... + total message length (2)

_FLAG_FIRST = 0x80
_FLAG_LAST = 0x40
_SEQUENCE_MASK = 0x3F
_SEQUENCE_MODULUS = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageReceived:
    """A complete message reassembled from one or more fragments of `connection_id`."""

    connection_id: int
    message: bytes

    def __post_init__(self) -> None:
        _check_connection_id(self.connection_id)


@dataclass(frozen=True, slots=True, kw_only=True)
class FrameRejected:
    """A fragment was refused; any partial message of that connection has been dropped.

    `connection_id` is None when the fragment was too short to carry one, or carried the reserved
    id 0. `code` is what the peer may be told (1xx, docs/protocol.md §9); `detail` is for the log.
    """

    connection_id: int | None
    code: ErrorCode
    detail: str

    def __post_init__(self) -> None:
        if self.connection_id is not None:
            _check_connection_id(self.connection_id)


FragmentEvent: TypeAlias = MessageReceived | FrameRejected


def fragment(connection_id: int, message: bytes, *, att_mtu: int) -> list[bytes]:
    """Split `message` into the GATT writes or notifications that carry it (docs/protocol.md §5).

    An empty message is one FIRST|LAST fragment declaring length 0. Raises `LocalProtocolError` for
    a reserved or out-of-range connection id, an ATT MTU outside 23..517 or a message larger than
    `MAX_MESSAGE_SIZE`: those are bugs in the caller, not something the peer did.
    """
    _check_connection_id(connection_id)
    if not isinstance(message, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"message must be bytes, not {type(message).__name__}")
    if not _is_int(att_mtu) or not ATT_MTU_MIN <= att_mtu <= ATT_MTU_MAX:
        raise LocalProtocolError(f"ATT MTU must be {ATT_MTU_MIN}..{ATT_MTU_MAX}, got {att_mtu!r}")
    data = bytes(message)
    if len(data) > MAX_MESSAGE_SIZE:
        raise LocalProtocolError(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_SIZE}")

    att_payload = att_mtu - ATT_OVERHEAD
    conn = connection_id.to_bytes(2, "big")
    first_room = att_payload - FIRST_HEADER_SIZE
    next_room = att_payload - CONTINUATION_HEADER_SIZE

    chunks = [data[:first_room]]
    chunks.extend(data[start : start + next_room] for start in range(first_room, len(data), next_room))

    fragments: list[bytes] = []
    for index, chunk in enumerate(chunks):
        control = index % _SEQUENCE_MODULUS
        if index == 0:
            control |= _FLAG_FIRST
        if index == len(chunks) - 1:
            control |= _FLAG_LAST
        header = conn + bytes([control])
        if index == 0:
            header += len(data).to_bytes(2, "big")
        fragments.append(header + chunk)
    return fragments


@dataclass(slots=True)
class _Partial:
    """A message in progress on one connection: what was declared and what has arrived."""

    declared_length: int
    next_sequence: int
    buffer: bytearray = field(default_factory=bytearray)


class Reassembler:
    """Turns fragments back into messages, one partial buffer per connection id (docs/protocol.md §5).

    Memory is bounded: at most `max_connections` partial messages, each at most `max_message_size`
    bytes. `receive` never raises on any input; a bad fragment yields `FrameRejected` and drops that
    connection's partial message, so a rejection never leaves half a message behind (DESIGN §7 S4).

    A phone passes `accept_only=<its connection id>`: fragments for other ids (other phones talking to
    the same box) are ignored silently, since every subscriber receives every notification.
    """

    __slots__ = ("_accept_only", "_max_connections", "_max_message_size", "_partials")

    def __init__(
        self,
        *,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_connections: int = 8,
        accept_only: int | None = None,
    ) -> None:
        # The length field is a u16, so nothing larger could ever be declared.
        if not _is_int(max_message_size) or not 0 <= max_message_size <= 0xFFFF:
            raise LocalProtocolError(f"max_message_size must be 0..65535, got {max_message_size!r}")
        if not _is_int(max_connections) or max_connections < 1:
            raise LocalProtocolError(f"max_connections must be at least 1, got {max_connections!r}")
        if accept_only is not None:
            _check_connection_id(accept_only)
        self._max_message_size = max_message_size
        self._max_connections = max_connections
        self._accept_only = accept_only
        self._partials: dict[int, _Partial] = {}

    @property
    def buffered_bytes(self) -> int:
        """Message bytes held in partial buffers right now (never above max_connections * max_size)."""
        return sum(len(partial.buffer) for partial in self._partials.values())

    @property
    def pending_connections(self) -> frozenset[int]:
        """Connection ids with a message in progress."""
        return frozenset(self._partials)

    def forget(self, connection_id: int) -> None:
        """Drop any partial message of `connection_id` (the phone disconnected or timed out)."""
        self._partials.pop(connection_id, None)

    def receive(self, fragment: bytes) -> FragmentEvent | None:
        """Feed one GATT write or notification; return a message, a rejection, or None (need more)."""
        # Checked, not converted: bytes(n) of an int would allocate n zero bytes.
        if not isinstance(fragment, bytes | bytearray | memoryview):
            return FrameRejected(connection_id=None, code=ErrorCode.FRAME_MALFORMED, detail="not bytes")
        data = bytes(fragment)
        if len(data) < 2:
            return FrameRejected(
                connection_id=None, code=ErrorCode.FRAME_MALFORMED, detail=f"{len(data)}-byte fragment"
            )
        connection_id = int.from_bytes(data[:2], "big")
        if self._accept_only is not None and connection_id != self._accept_only:
            return None
        if connection_id == 0:
            return FrameRejected(
                connection_id=None, code=ErrorCode.FRAME_MALFORMED, detail="reserved connection id 0"
            )
        if len(data) < CONTINUATION_HEADER_SIZE:
            return self._reject(connection_id, ErrorCode.FRAME_MALFORMED, "no control byte")

        control = data[2]
        sequence = control & _SEQUENCE_MASK
        is_last = bool(control & _FLAG_LAST)
        if control & _FLAG_FIRST:
            return self._receive_first(connection_id, data, sequence=sequence, is_last=is_last)
        return self._receive_continuation(connection_id, data, sequence=sequence, is_last=is_last)

    def _receive_first(
        self, connection_id: int, data: bytes, *, sequence: int, is_last: bool
    ) -> FragmentEvent | None:
        if connection_id in self._partials:
            # A new FIRST means the sender gave up on the old message, or an attacker is splicing:
            # either way neither message can be trusted to be what the sender meant.
            return self._reject(connection_id, ErrorCode.FRAME_OUT_OF_ORDER, "FIRST while a message is open")
        if len(data) < FIRST_HEADER_SIZE:
            return self._reject(connection_id, ErrorCode.FRAME_MALFORMED, "FIRST fragment without length")
        if sequence != 0:
            return self._reject(
                connection_id, ErrorCode.FRAME_OUT_OF_ORDER, f"FIRST with sequence {sequence}"
            )
        declared = int.from_bytes(data[3:5], "big")
        if declared > self._max_message_size:
            return self._reject(
                connection_id, ErrorCode.FRAME_TOO_LARGE, f"declared {declared} > {self._max_message_size}"
            )
        payload = data[FIRST_HEADER_SIZE:]
        if len(payload) > declared:
            return self._reject(
                connection_id, ErrorCode.FRAME_TOO_LARGE, f"{len(payload)} bytes for declared {declared}"
            )
        if is_last:
            if len(payload) != declared:
                return self._reject(
                    connection_id, ErrorCode.FRAME_MALFORMED, f"{len(payload)} of {declared} bytes"
                )
            return MessageReceived(connection_id=connection_id, message=payload)
        if len(self._partials) >= self._max_connections:
            # Only multi-fragment messages need a buffer, so single-fragment ones still get through.
            return self._reject(
                connection_id, ErrorCode.FRAME_TOO_MANY_CONNECTIONS, f"{len(self._partials)} messages open"
            )
        self._partials[connection_id] = _Partial(
            declared_length=declared, next_sequence=1, buffer=bytearray(payload)
        )
        return None

    def _receive_continuation(
        self, connection_id: int, data: bytes, *, sequence: int, is_last: bool
    ) -> FragmentEvent | None:
        partial = self._partials.get(connection_id)
        if partial is None:
            return self._reject(connection_id, ErrorCode.FRAME_OUT_OF_ORDER, "no message in progress")
        if sequence != partial.next_sequence:
            return self._reject(
                connection_id,
                ErrorCode.FRAME_OUT_OF_ORDER,
                f"sequence {sequence}, expected {partial.next_sequence}",
            )
        payload = data[CONTINUATION_HEADER_SIZE:]
        received = len(partial.buffer) + len(payload)
        if received > partial.declared_length:
            return self._reject(
                connection_id,
                ErrorCode.FRAME_TOO_LARGE,
                f"{received} bytes for declared {partial.declared_length}",
            )
        if is_last:
            del self._partials[connection_id]
            if received != partial.declared_length:
                return FrameRejected(
                    connection_id=connection_id,
                    code=ErrorCode.FRAME_MALFORMED,
                    detail=f"{received} of {partial.declared_length} bytes",
                )
            partial.buffer += payload
            return MessageReceived(connection_id=connection_id, message=bytes(partial.buffer))
        partial.buffer += payload
        partial.next_sequence = (partial.next_sequence + 1) % _SEQUENCE_MODULUS
        return None

    def _reject(self, connection_id: int, code: ErrorCode, detail: str) -> FrameRejected:
        self._partials.pop(connection_id, None)
        return FrameRejected(connection_id=connection_id, code=code, detail=detail)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_connection_id(connection_id: int) -> None:
    if not _is_int(connection_id):
        raise LocalProtocolError(f"connection id must be an int, not {type(connection_id).__name__}")
    if not 1 <= connection_id <= MAX_CONNECTION_ID:
        raise LocalProtocolError(f"connection id must be 1..{MAX_CONNECTION_ID}, got {connection_id}")
