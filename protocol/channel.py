"""The secure channel that carries every message after EDHOC (docs/protocol.md §6).

Each direction has its own AES-CCM-16-64-128 key and IV (RFC 9053 §4.2: 16-byte key, 8-byte tag,
13-byte nonce), taken from the EDHOC exporter (RFC 9528 §4.2.1) with private-use labels
(RFC 9528 §10.1: 32768 and up)::

    32768  phone->box key (16)    32769  phone->box IV (13)
    32770  box->phone key (16)    32771  box->phone IV (13)          context = h''

One record is one framed message (docs/protocol.md §5)::

    record = counter (CBOR uint) || ciphertext          ; ciphertext includes the 8-byte tag
    nonce  = IV XOR counter (left-padded to 13 bytes, big-endian)
    AAD    = CBOR ["powerbox channel v1", connection_id, direction, counter]
             ; direction 0 = phone->box, 1 = box->phone

Counters start at 0 and grow by exactly one per record. The link below (GATT writes and notifications
plus framing) is reliable and ordered, so the receiver accepts only the next counter: a replay, a
reorder or a gap can only be an attack (DESIGN §7 S3). After any `ChannelError` the channel is closed
and every later call raises CHANNEL_CLOSED; the connection must run EDHOC again.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TypeAlias

import cbor2
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from protocol.errors import ChannelError, ErrorCode, LocalProtocolError

__all__ = [
    "AAD_LABEL",
    "EXPORTER_LABEL_BOX_TO_PHONE_IV",
    "EXPORTER_LABEL_BOX_TO_PHONE_KEY",
    "EXPORTER_LABEL_PHONE_TO_BOX_IV",
    "EXPORTER_LABEL_PHONE_TO_BOX_KEY",
    "IV_LENGTH",
    "KEY_LENGTH",
    "MAX_COUNTER",
    "MAX_PLAINTEXT_SIZE",
    "MAX_RECORD_OVERHEAD",
    "TAG_LENGTH",
    "Direction",
    "Exporter",
    "Role",
    "SecureChannel",
]

Exporter: TypeAlias = Callable[[int, bytes, int], bytes]
"""EDHOC_Exporter(label, context, length) of a completed handshake (RFC 9528 §4.2.1)."""

EXPORTER_LABEL_PHONE_TO_BOX_KEY = 32768
EXPORTER_LABEL_PHONE_TO_BOX_IV = 32769
EXPORTER_LABEL_BOX_TO_PHONE_KEY = 32770
EXPORTER_LABEL_BOX_TO_PHONE_IV = 32771

KEY_LENGTH = 16  # AES-CCM-16-64-128, COSE alg 10 (RFC 9053 §4.2)
IV_LENGTH = 13  # = nonce length: 15 - L with L = 2
TAG_LENGTH = 8
MAX_COUNTER = 2**32 - 1
# CCM with a 13-byte nonce has a 2-byte length field (RFC 3610 §2.2).
MAX_PLAINTEXT_SIZE = 2**16 - 1
MAX_RECORD_OVERHEAD = 5 + TAG_LENGTH  # largest counter head (0x1a + 4 bytes) plus the tag

AAD_LABEL = "powerbox channel v1"


class Role(enum.Enum):
    """Which end of the connection this channel object is."""

    PHONE = "phone"
    BOX = "box"


class Direction(enum.IntEnum):
    """Direction of a record, bound into its AAD so a record can't be reflected back."""

    PHONE_TO_BOX = 0
    BOX_TO_PHONE = 1


class SecureChannel:
    """Seal and open records for one connection after EDHOC (docs/protocol.md §6).

    `seal` never fails while the channel is open (apart from counter exhaustion); `open` raises
    `ChannelError` with CHANNEL_MALFORMED, CHANNEL_FORGED, CHANNEL_REPLAY, CHANNEL_OUT_OF_ORDER or
    CHANNEL_COUNTER_EXHAUSTED and closes the channel. Local misuse (wrong argument types, a plaintext
    CCM can't carry) raises `LocalProtocolError` and changes nothing, since nothing was sent or consumed.
    """

    __slots__ = (
        "_closed",
        "_connection_id",
        "_receive_aead",
        "_receive_counter",
        "_receive_direction",
        "_receive_iv",
        "_role",
        "_send_aead",
        "_send_counter",
        "_send_direction",
        "_send_iv",
    )

    def __init__(self, *, exporter: Exporter, role: Role, connection_id: int) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, not {role!r}")
        if isinstance(connection_id, bool) or not isinstance(connection_id, int):
            raise LocalProtocolError("connection id must be an int")
        if not 1 <= connection_id <= 0xFFFF:
            # Same range as the framing header (docs/protocol.md §5); 0 is reserved.
            raise LocalProtocolError(f"connection id must be 1..65535, got {connection_id}")

        p2b_key = _export(exporter, EXPORTER_LABEL_PHONE_TO_BOX_KEY, KEY_LENGTH)
        p2b_iv = _export(exporter, EXPORTER_LABEL_PHONE_TO_BOX_IV, IV_LENGTH)
        b2p_key = _export(exporter, EXPORTER_LABEL_BOX_TO_PHONE_KEY, KEY_LENGTH)
        b2p_iv = _export(exporter, EXPORTER_LABEL_BOX_TO_PHONE_IV, IV_LENGTH)

        self._role = role
        self._connection_id = connection_id
        if role is Role.PHONE:
            send_key, self._send_iv, self._send_direction = p2b_key, p2b_iv, Direction.PHONE_TO_BOX
            receive_key, self._receive_iv, self._receive_direction = b2p_key, b2p_iv, Direction.BOX_TO_PHONE
        else:
            send_key, self._send_iv, self._send_direction = b2p_key, b2p_iv, Direction.BOX_TO_PHONE
            receive_key, self._receive_iv, self._receive_direction = p2b_key, p2b_iv, Direction.PHONE_TO_BOX
        self._send_aead = AESCCM(send_key, tag_length=TAG_LENGTH)
        self._receive_aead = AESCCM(receive_key, tag_length=TAG_LENGTH)
        self._send_counter = 0
        self._receive_counter = 0
        self._closed = False

    @property
    def role(self) -> Role:
        return self._role

    @property
    def connection_id(self) -> int:
        return self._connection_id

    @property
    def is_closed(self) -> bool:
        """True after any channel error or `close()`; the connection needs a new EDHOC run."""
        return self._closed

    @property
    def next_send_counter(self) -> int:
        return self._send_counter

    @property
    def next_receive_counter(self) -> int:
        return self._receive_counter

    def close(self) -> None:
        """Stop using the keys (disconnect, or the layer above gave up on this connection)."""
        self._closed = True

    def seal(self, plaintext: bytes) -> bytes:
        """Encrypt one message into a record with the next send counter."""
        self._check_open()
        if not isinstance(plaintext, bytes | bytearray | memoryview):
            raise LocalProtocolError(f"plaintext must be bytes, not {type(plaintext).__name__}")
        if len(plaintext) > MAX_PLAINTEXT_SIZE:
            raise LocalProtocolError(f"plaintext of {len(plaintext)} bytes exceeds {MAX_PLAINTEXT_SIZE}")
        counter = self._send_counter
        if counter > MAX_COUNTER:
            # Reusing a nonce under CCM would leak plaintext XORs and allow forgeries.
            raise self._fail(ErrorCode.CHANNEL_COUNTER_EXHAUSTED, "send counter exhausted")
        self._send_counter = counter + 1
        ciphertext = self._send_aead.encrypt(
            _nonce(self._send_iv, counter),
            bytes(plaintext),
            _aad(self._connection_id, self._send_direction, counter),
        )
        return cbor2.dumps(counter) + ciphertext

    def open(self, record: bytes) -> bytes:
        """Authenticate and decrypt the next record from the peer, or raise `ChannelError` and close."""
        self._check_open()
        if not isinstance(record, bytes | bytearray | memoryview):
            raise self._fail(ErrorCode.CHANNEL_MALFORMED, "record is not bytes")
        data = bytes(record)
        expected = self._receive_counter
        if expected > MAX_COUNTER:
            raise self._fail(ErrorCode.CHANNEL_COUNTER_EXHAUSTED, "receive counter exhausted")
        parsed = _parse_counter(data)
        if parsed is None:
            raise self._fail(ErrorCode.CHANNEL_MALFORMED, "record does not start with a canonical counter")
        counter, head_length = parsed
        ciphertext = data[head_length:]
        if len(ciphertext) < TAG_LENGTH:
            raise self._fail(ErrorCode.CHANNEL_MALFORMED, f"{len(ciphertext)} bytes after the counter")
        # Authenticate before judging the counter, so REPLAY and OUT_OF_ORDER are only ever said of
        # records the peer really sent; a tampered counter is a forgery.
        try:
            plaintext = self._receive_aead.decrypt(
                _nonce(self._receive_iv, counter),
                ciphertext,
                _aad(self._connection_id, self._receive_direction, counter),
            )
        except InvalidTag:
            raise self._fail(ErrorCode.CHANNEL_FORGED, f"record {counter} failed authentication") from None
        if counter < expected:
            raise self._fail(ErrorCode.CHANNEL_REPLAY, f"counter {counter}, expected {expected}")
        if counter > expected:
            raise self._fail(ErrorCode.CHANNEL_OUT_OF_ORDER, f"counter {counter}, expected {expected}")
        self._receive_counter = expected + 1
        return plaintext

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelError("channel closed by an earlier error", code=ErrorCode.CHANNEL_CLOSED)

    def _fail(self, code: ErrorCode, detail: str) -> ChannelError:
        self._closed = True
        return ChannelError(detail, code=code)


def _export(exporter: Exporter, label: int, length: int) -> bytes:
    secret = exporter(label, b"", length)
    if not isinstance(secret, bytes) or len(secret) != length:
        raise LocalProtocolError(f"exporter label {label} did not return {length} bytes")
    return secret


def _nonce(iv: bytes, counter: int) -> bytes:
    return (int.from_bytes(iv, "big") ^ counter).to_bytes(IV_LENGTH, "big")


def _aad(connection_id: int, direction: Direction, counter: int) -> bytes:
    return cbor2.dumps([AAD_LABEL, connection_id, int(direction), counter])


def _parse_counter(data: bytes) -> tuple[int, int] | None:
    """Read a CBOR uint (RFC 8949 §3.1, major type 0) in its shortest form; (value, head length).

    Only the shortest form is accepted, so each record has exactly one encoding (no malleability),
    and only values up to MAX_COUNTER.
    """
    if not data:
        return None
    initial = data[0]
    if initial >> 5 != 0:
        return None
    info = initial & 0x1F
    if info < 24:
        return info, 1
    sizes = {24: 1, 25: 2, 26: 4}
    size = sizes.get(info)
    if size is None or len(data) < 1 + size:
        return None
    value = int.from_bytes(data[1 : 1 + size], "big")
    smallest = {1: 24, 2: 0x100, 4: 0x10000}[size]
    if value < smallest:
        return None
    return value, 1 + size
