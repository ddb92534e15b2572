"""Stable numeric error codes and the exceptions that carry them.

The codes are part of the wire protocol (docs/protocol.md §9): they travel in `ErrorMessage`,
in ledger entries and in HTTP error bodies. The registry is append-only: never renumber, never
reuse a retired value. Ranges group the codes by layer so a log reader can tell where a
failure came from at a glance.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """docs/protocol.md §9. Append-only."""

    # 1xx: framing (GATT fragments)
    FRAME_MALFORMED = 100
    FRAME_TOO_LARGE = 101
    FRAME_OUT_OF_ORDER = 102
    FRAME_UNKNOWN_CONNECTION = 103
    FRAME_TOO_MANY_CONNECTIONS = 104

    # 2xx: EDHOC handshake
    EDHOC_MALFORMED = 200
    EDHOC_UNSUPPORTED_CIPHER_SUITE = 201
    EDHOC_UNSUPPORTED_METHOD = 202
    EDHOC_BAD_SIGNATURE = 203
    EDHOC_BAD_CREDENTIAL = 204
    EDHOC_UNEXPECTED_MESSAGE = 205
    EDHOC_DECRYPTION_FAILED = 206
    EDHOC_PEER_ERROR = 207
    EDHOC_WRONG_BOX = 208

    # 3xx: secure channel
    CHANNEL_MALFORMED = 300
    CHANNEL_REPLAY = 301
    CHANNEL_FORGED = 302
    CHANNEL_CLOSED = 303
    CHANNEL_COUNTER_EXHAUSTED = 304
    CHANNEL_OUT_OF_ORDER = 305

    # 4xx: signed objects (COSE, CWT, tokens)
    TOKEN_MALFORMED = 400
    TOKEN_BAD_SIGNATURE = 401
    TOKEN_UNKNOWN_KEY = 402
    TOKEN_WRONG_TYPE = 403
    TOKEN_EXPIRED = 404
    TOKEN_NOT_YET_VALID = 405
    TOKEN_WRONG_AUDIENCE = 406
    TOKEN_MISSING_CLAIM = 407
    TOKEN_TOO_LARGE = 408
    TOKEN_DECRYPTION_FAILED = 409

    # 5xx: grants and sessions (S1)
    GRANT_EXPIRED = 500
    GRANT_REVOKED = 501
    GRANT_SPENT = 502
    GRANT_WRONG_HOLDER = 503
    GRANT_WRONG_BOX = 504
    GRANT_PRICE_ABOVE_LIMIT = 505
    PHONE_REVOKED = 506
    USER_REVOKED = 507
    OUTLET_UNKNOWN = 508
    OUTLET_BUSY = 509
    OUTLET_RESERVED = 510
    SESSION_UNKNOWN = 511
    SESSION_NOT_OWNER = 512
    METERING_DOOR_OPEN = 513
    OUTLET_FAULT = 514
    GRANT_TOO_SMALL = 515
    STALE_VERSION = 516
    MESSAGE_MALFORMED = 517
    MESSAGE_UNEXPECTED = 518
    TOKEN_NOT_FOR_THIS_DOOR = 519
    BOX_BUSY = 520

    # 6xx: ledger
    LEDGER_BAD_SIGNATURE = 600
    LEDGER_CHAIN_BROKEN = 601
    LEDGER_FORK = 602
    LEDGER_GAP = 603
    LEDGER_UNKNOWN_BOX = 604
    LEDGER_COST_MISMATCH = 605
    LEDGER_CLOCK = 606
    LEDGER_DOUBLE_SPEND = 607
    LEDGER_UNKNOWN_GRANT = 608

    # 7xx: hardware and the box itself
    METER_TIMEOUT = 700
    METER_BAD_READING = 701
    BUS_FAULT = 702
    INTERNAL = 799

    # 8xx: settlement server HTTP API (docs/server-api.md)
    API_UNAUTHENTICATED = 800
    API_FORBIDDEN = 801
    API_NOT_FOUND = 802
    API_MALFORMED = 803
    API_TOO_LARGE = 804
    API_CONFLICT = 805
    API_RATE_LIMITED = 806
    API_UNAVAILABLE = 807
    AUTH_FAILED = 808
    INSUFFICIENT_FUNDS = 809
    ARREARS_OUTSTANDING = 810
    PAYMENT_FAILED = 811
    DEVICE_UNKNOWN = 812


class PowerboxError(Exception):
    """Base of every error raised by powerbox code; carries a wire code.

    The text is for the local log; the peer only ever learns `code` (pyca-style: one
    semantic failure, no oracle).
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, detail: str = "", *, code: ErrorCode | None = None) -> None:
        if code is not None:
            self.code = code
        super().__init__(detail or self.code.name)

    @property
    def detail(self) -> str:
        return str(self.args[0]) if self.args else self.code.name


class LocalProtocolError(PowerboxError):
    """Our own caller misused the API (h11's split: this is a bug on our side)."""


class RemoteProtocolError(PowerboxError):
    """The peer sent something we reject; `code` is what we tell it."""


class FramingError(RemoteProtocolError):
    code = ErrorCode.FRAME_MALFORMED


class EdhocError(RemoteProtocolError):
    code = ErrorCode.EDHOC_MALFORMED


class ChannelError(RemoteProtocolError):
    code = ErrorCode.CHANNEL_FORGED


class TokenError(RemoteProtocolError):
    code = ErrorCode.TOKEN_MALFORMED


class GrantError(RemoteProtocolError):
    code = ErrorCode.GRANT_EXPIRED


class MessageError(RemoteProtocolError):
    code = ErrorCode.MESSAGE_MALFORMED
