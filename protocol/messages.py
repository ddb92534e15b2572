"""Application messages carried inside the secure channel (DESIGN §3 item 4, docs/protocol.md §6).

Each message is a CBOR array `[message_type, field, ...]` in the field order of its dataclass.
Requests from the phone carry a `request_id` that the box echoes in the answer (or error), so a
phone with several requests in flight can match them. One generic codec walks the dataclass
fields and their annotations, so the wire layout and the Python types cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Union, get_args, get_origin

from protocol import encoding
from protocol.errors import ErrorCode, MessageError
from protocol.tokens import Door, EndReason

MAX_BYTES_FIELD = 8000
MAX_TEXT_FIELD = 200
MAX_LIST_ITEMS = 64


class MessageType(enum.IntEnum):
    """docs/protocol.md §6.2. Append-only. 1-31 phone to box, 32-63 box to phone."""

    START_SESSION = 1
    TOP_UP = 2
    STOP_SESSION = 3
    OPEN_OUTLET_DOOR = 4
    OPEN_DOOR_WITH_TOKEN = 5
    PUSH_REVOCATION_LIST = 6
    PUSH_TARIFF_TABLE = 7
    PUSH_LEDGER_ACK = 8
    REQUEST_LEDGER_ENTRIES = 9
    LIST_SESSIONS = 10

    SESSION_STARTED = 32
    TOPPED_UP = 33
    METER_READING = 34
    SESSION_ENDED = 35
    DOOR_OPENED = 36
    UPDATE_ACCEPTED = 37
    LEDGER_ENTRIES = 38
    SESSION_LIST = 39
    ERROR = 40


class UpdateKind(enum.IntEnum):
    REVOCATION_LIST = 1
    TARIFF_TABLE = 2
    LEDGER_ACK = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    message_type: ClassVar[MessageType]

    def encode(self) -> bytes:
        return encoding.encode(
            [self.message_type, *(_to_cbor(getattr(self, f.name)) for f in _fields(type(self)))]
        )


# Phone to box


@dataclass(frozen=True, slots=True, kw_only=True)
class StartSession(Message):
    message_type: ClassVar[MessageType] = MessageType.START_SESSION
    request_id: int
    outlet: int
    grant: bytes  # a signed BalanceGrant
    reservation: bytes | None = None  # a signed Reservation, when the outlet is reserved for this phone


@dataclass(frozen=True, slots=True, kw_only=True)
class TopUp(Message):
    message_type: ClassVar[MessageType] = MessageType.TOP_UP
    request_id: int
    session_id: bytes
    grant: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class StopSession(Message):
    message_type: ClassVar[MessageType] = MessageType.STOP_SESSION
    request_id: int
    session_id: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenOutletDoor(Message):
    """The owner of a running or just-ended session opens its user-box door (to plug or unplug)."""

    message_type: ClassVar[MessageType] = MessageType.OPEN_OUTLET_DOOR
    request_id: int
    session_id: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenDoorWithToken(Message):
    """A technician's or user's UnlockToken opens the door it names."""

    message_type: ClassVar[MessageType] = MessageType.OPEN_DOOR_WITH_TOKEN
    request_id: int
    unlock_token: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PushRevocationList(Message):
    message_type: ClassVar[MessageType] = MessageType.PUSH_REVOCATION_LIST
    request_id: int
    revocation_list: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PushTariffTable(Message):
    message_type: ClassVar[MessageType] = MessageType.PUSH_TARIFF_TABLE
    request_id: int
    tariff_table: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PushLedgerAck(Message):
    message_type: ClassVar[MessageType] = MessageType.PUSH_LEDGER_ACK
    request_id: int
    ledger_ack: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestLedgerEntries(Message):
    """Ask for up to `max_entries` unacknowledged entries to carry, sealed to the operator."""

    message_type: ClassVar[MessageType] = MessageType.REQUEST_LEDGER_ENTRIES
    request_id: int
    max_entries: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ListSessions(Message):
    """Which sessions does the key of this connection own (after walking away and coming back)."""

    message_type: ClassVar[MessageType] = MessageType.LIST_SESSIONS
    request_id: int


# Box to phone


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionStarted(Message):
    message_type: ClassVar[MessageType] = MessageType.SESSION_STARTED
    request_id: int
    session_id: bytes
    outlet: int
    start_time: int
    start_register_wh: int
    tariff_version: int
    price_fen_per_kwh: int
    balance_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ToppedUp(Message):
    message_type: ClassVar[MessageType] = MessageType.TOPPED_UP
    request_id: int
    session_id: bytes
    balance_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class MeterReading(Message):
    """Live reading about once a second. Voltage in 0.1 V, current in mA, power in W."""

    message_type: ClassVar[MessageType] = MessageType.METER_READING
    session_id: bytes
    time: int
    energy_wh: int
    power_w: int
    voltage_dv: int
    current_ma: int
    cost_fen: int
    remaining_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionEnded(Message):
    """`receipt` is the box-signed SESSION_ENDED ledger entry: verifiable with the box certificate."""

    message_type: ClassVar[MessageType] = MessageType.SESSION_ENDED
    request_id: int  # the StopSession's id, or 0 when the box ended it
    session_id: bytes
    end_reason: EndReason
    receipt: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class DoorOpened(Message):
    message_type: ClassVar[MessageType] = MessageType.DOOR_OPENED
    request_id: int
    door: Door
    outlet: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateAccepted(Message):
    """The box now holds `version` (for an ack: the acknowledged sequence number)."""

    message_type: ClassVar[MessageType] = MessageType.UPDATE_ACCEPTED
    request_id: int
    kind: UpdateKind
    version: int


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerEntries(Message):
    """A batch for a phone to carry: the entries `first..last`, sealed to the operator (S9)."""

    message_type: ClassVar[MessageType] = MessageType.LEDGER_ENTRIES
    request_id: int
    box_id: str
    first_sequence: int
    last_sequence: int
    sealed_batch: bytes  # protocol.sealing: COSE_Encrypt of a CBOR array of signed entries


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionSummary:
    session_id: bytes
    outlet: int
    start_time: int
    energy_wh: int
    cost_fen: int
    remaining_fen: int
    running: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionList(Message):
    message_type: ClassVar[MessageType] = MessageType.SESSION_LIST
    request_id: int
    sessions: tuple[SessionSummary, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorMessage(Message):
    """Stable numeric code only: the peer learns what was refused, never the box's internals."""

    message_type: ClassVar[MessageType] = MessageType.ERROR
    request_id: int
    code: ErrorCode


PhoneMessage = (
    StartSession
    | TopUp
    | StopSession
    | OpenOutletDoor
    | OpenDoorWithToken
    | PushRevocationList
    | PushTariffTable
    | PushLedgerAck
    | RequestLedgerEntries
    | ListSessions
)
BoxMessage = (
    SessionStarted
    | ToppedUp
    | MeterReading
    | SessionEnded
    | DoorOpened
    | UpdateAccepted
    | LedgerEntries
    | SessionList
    | ErrorMessage
)

MESSAGE_CLASSES: dict[MessageType, type[Message]] = {
    cls.message_type: cls for cls in (*get_args(PhoneMessage), *get_args(BoxMessage))
}


def decode_message(data: bytes) -> Message:
    """Decode any message; anything malformed raises MessageError(MESSAGE_MALFORMED)."""
    raw = encoding.decode(data, error=MessageError, code=ErrorCode.MESSAGE_MALFORMED)
    fields = _checker("message")
    items = fields.array(raw, minimum=1)
    message_type = fields.enum(items[0], "message type", MessageType)
    message: Message = _from_cbor(MESSAGE_CLASSES[message_type], items[1:])
    return message


def decode_phone_message(data: bytes) -> PhoneMessage:
    message = decode_message(data)
    if not isinstance(message, get_args(PhoneMessage)):
        raise MessageError("a box message sent by a phone", code=ErrorCode.MESSAGE_UNEXPECTED)
    return typing.cast(PhoneMessage, message)


def decode_box_message(data: bytes) -> BoxMessage:
    message = decode_message(data)
    if not isinstance(message, get_args(BoxMessage)):
        raise MessageError("a phone message sent by a box", code=ErrorCode.MESSAGE_UNEXPECTED)
    return typing.cast(BoxMessage, message)


# The generic codec.


def _checker(what: str) -> encoding.Fields:
    return encoding.Fields(what, error=MessageError, code=ErrorCode.MESSAGE_MALFORMED)


_FIELDS: dict[type[Any], tuple[dataclasses.Field[Any], ...]] = {}
_HINTS: dict[type[Any], dict[str, Any]] = {}


def _fields(cls: type[Any]) -> tuple[dataclasses.Field[Any], ...]:
    if cls not in _FIELDS:
        _FIELDS[cls] = tuple(f for f in dataclasses.fields(cls) if f.init)
    return _FIELDS[cls]


def _hints(cls: type[Any]) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _to_cbor(value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_to_cbor(getattr(value, f.name)) for f in _fields(type(value))]
    if isinstance(value, tuple):
        return [_to_cbor(item) for item in value]
    return value


def _from_cbor(cls: type[Any], items: list[Any]) -> Any:
    fields = _checker(cls.__name__)
    specs = _fields(cls)
    fields.array(items, len(specs))
    hints = _hints(cls)
    values = {
        spec.name: _convert(hints[spec.name], item, spec.name, fields)
        for spec, item in zip(specs, items, strict=True)
    }
    return cls(**values)


def _convert(annotation: Any, value: object, name: str, fields: encoding.Fields) -> object:
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        (inner,) = (option for option in options if option is not type(None))
        return _convert(inner, value, name, fields)
    if origin is tuple:
        inner = get_args(annotation)[0]
        items = fields.array(value)
        if len(items) > MAX_LIST_ITEMS:
            raise fields.fail(f"{name} has more than {MAX_LIST_ITEMS} items")
        return tuple(_convert(inner, item, name, fields) for item in items)
    if isinstance(annotation, type) and issubclass(annotation, enum.IntEnum):
        return fields.enum(value, name, annotation)
    if annotation is bool:
        return fields.bool_(value, name)
    if annotation is int:
        return fields.uint(value, name, maximum=2**63 - 1)
    if annotation is bytes:
        return fields.bytes_(value, name, max_size=MAX_BYTES_FIELD)
    if annotation is str:
        return fields.text(value, name, max_size=MAX_TEXT_FIELD)
    if dataclasses.is_dataclass(annotation):
        return _from_cbor(typing.cast(type[Any], annotation), fields.array(value))
    raise TypeError(f"no codec for {annotation!r}")  # a programming error in this module
