"""What the phone client raises: one family, each error with a wire code and where it came from.

Foreign errors (bleak, dbus, httpx, sqlite3, Pillow) are translated where they happen and never
leave `phone_client` (STYLE: httpcore's `map_exceptions`). `origin` tells the user who decided:
the box (its ErrorMessage or link error), the server (its HTTP error body), the radio, or this
phone itself. Readable texts for the codes are in `phone_client.explain`.
"""

from __future__ import annotations

import enum
from typing import ClassVar

from protocol.errors import ErrorCode, PowerboxError


class Origin(enum.Enum):
    PHONE = "phone"  # this phone found the problem (wallet, label, a check before asking)
    BOX = "box"  # the box refused, with its error code
    RADIO = "radio"  # the box could not be found or the Bluetooth link failed
    SERVER = "server"  # the settlement server refused or could not be reached


class PhoneError(PowerboxError):
    """Base of everything `phone_client` raises."""

    origin: ClassVar[Origin] = Origin.PHONE

    @property
    def wire_code(self) -> ErrorCode | None:
        """The protocol's code for this failure (docs/protocol.md §9), or None when it is this
        phone's own matter (no grant in the wallet, an unwritable file) and no code fits."""
        return self.code


class WalletError(PhoneError):
    """The wallet file cannot be opened, read or written, or is not a powerbox wallet."""

    code = ErrorCode.INTERNAL

    @property
    def wire_code(self) -> ErrorCode | None:
        return None


class LabelError(PhoneError):
    """The QR label (text or photo) is not a powerbox label."""

    code = ErrorCode.MESSAGE_MALFORMED


class PrerequisiteError(PhoneError):
    """The phone lacks what the request needs: a usable grant, a login, a server, a running session.

    `code` is given where a protocol code says it (every grant expired: GRANT_EXPIRED)."""

    def __init__(self, detail: str = "", *, code: ErrorCode | None = None) -> None:
        super().__init__(detail, code=code)
        self._has_code = code is not None

    @property
    def wire_code(self) -> ErrorCode | None:
        return self.code if self._has_code else None


class TokenRejectedError(PhoneError):
    """A signed object given to this phone does not verify or is not for it (a grant bound to
    another phone, an update signed by an unknown key); `code` says which check failed."""

    code = ErrorCode.TOKEN_MALFORMED


class ReceiptRejectedError(TokenRejectedError):
    """The box's signed receipt does not verify against its certificate (docs/protocol.md §8.1)."""


class BoxUnreachableError(PhoneError):
    """No box with this label answered, or the radio link failed."""

    origin = Origin.RADIO
    code = ErrorCode.CHANNEL_CLOSED

    @property
    def wire_code(self) -> ErrorCode | None:
        return None  # nobody refused anything: the box was not there, or the link broke


class BoxRefusedError(PhoneError):
    """The box refused a request or closed the connection; `code` is the box's error code (or the
    one this phone sent it, for a check the phone made during the handshake, e.g. S2)."""

    origin = Origin.BOX


class BoxNotTrustedError(PhoneError):
    """This phone refused the box: its certificate, QR fingerprint or handshake failed a check
    (S2, docs/protocol.md §7.3), or it sent something this phone rejects; nothing was sent to it."""


class ServerError(PhoneError):
    origin = Origin.SERVER


class ServerUnreachableError(ServerError):
    """No answer from the server (no network, DNS, refused, timed out, or it is down)."""

    code = ErrorCode.API_UNAVAILABLE


class ServerRefusedError(ServerError):
    """The server answered with an error body `{"error": {"code", "name", "detail"}}`."""

    def __init__(self, detail: str = "", *, code: ErrorCode | None = None, status: int = 0) -> None:
        super().__init__(detail, code=code)
        self.status = status


class ServerAnswerError(ServerError):
    """The server answered something this phone cannot read (another program, or a newer API)."""

    code = ErrorCode.INTERNAL
