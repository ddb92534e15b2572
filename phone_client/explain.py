"""Readable texts for error codes, as a phone shows them to its user (docs/protocol.md §9).

The code itself is always shown beside the text, so a user can read it out to support and a
technician can look it up. Codes this phone does not know (a newer box) get their range's meaning.
"""

from __future__ import annotations

from protocol.errors import ErrorCode

_TEXTS: dict[ErrorCode, str] = {
    ErrorCode.FRAME_MALFORMED: "the Bluetooth conversation got garbled; try again",
    ErrorCode.FRAME_TOO_LARGE: "the Bluetooth conversation got garbled; try again",
    ErrorCode.FRAME_OUT_OF_ORDER: "a Bluetooth message was lost; try again",
    ErrorCode.FRAME_TOO_MANY_CONNECTIONS: "the box is busy with other phones; try again in a moment",
    ErrorCode.EDHOC_MALFORMED: "the secure handshake failed; try again",
    ErrorCode.EDHOC_UNSUPPORTED_CIPHER_SUITE: "the box speaks another security version",
    ErrorCode.EDHOC_UNSUPPORTED_METHOD: "the box speaks another security version",
    ErrorCode.EDHOC_BAD_SIGNATURE: "the box could not prove who it is: do not use it",
    ErrorCode.EDHOC_BAD_CREDENTIAL: "the box did not show a proper certificate: do not use it",
    ErrorCode.EDHOC_UNEXPECTED_MESSAGE: "the box dropped this conversation; try again",
    ErrorCode.EDHOC_DECRYPTION_FAILED: "the secure handshake failed; try again",
    ErrorCode.EDHOC_PEER_ERROR: "the secure handshake failed; try again",
    ErrorCode.EDHOC_WRONG_BOX: "this is not the box on the label (wrong box or a fake): do not use it",
    ErrorCode.CHANNEL_MALFORMED: "the secure connection broke; try again",
    ErrorCode.CHANNEL_REPLAY: "the secure connection saw a replayed message and closed",
    ErrorCode.CHANNEL_FORGED: "the secure connection saw a tampered message and closed",
    ErrorCode.CHANNEL_CLOSED: "the connection to the box is closed",
    ErrorCode.CHANNEL_COUNTER_EXHAUSTED: "the connection ran out of message numbers; reconnect",
    ErrorCode.CHANNEL_OUT_OF_ORDER: "a message was lost on the secure connection; try again",
    ErrorCode.TOKEN_MALFORMED: "a signed token is damaged",
    ErrorCode.TOKEN_BAD_SIGNATURE: "a signature does not verify: forged or damaged",
    ErrorCode.TOKEN_UNKNOWN_KEY: "signed by a key nobody here trusts: not from your operator",
    ErrorCode.TOKEN_WRONG_TYPE: "a token of the wrong kind was used",
    ErrorCode.TOKEN_EXPIRED: "the box's certificate has expired; the box needs service",
    ErrorCode.TOKEN_NOT_YET_VALID: "the unlock token is not valid yet",
    ErrorCode.TOKEN_WRONG_AUDIENCE: "the update is for another box",
    ErrorCode.TOKEN_MISSING_CLAIM: "a signed token lacks a required field",
    ErrorCode.TOKEN_TOO_LARGE: "the grant is too large for the box",
    ErrorCode.TOKEN_DECRYPTION_FAILED: "a sealed ledger batch does not open",
    ErrorCode.GRANT_EXPIRED: "the grant (or token, or reservation) has expired or is outside its window",
    ErrorCode.GRANT_REVOKED: "the grant has been revoked by the operator",
    ErrorCode.GRANT_SPENT: "this grant was already used at this box; each grant pays for one session",
    ErrorCode.GRANT_WRONG_HOLDER: "the grant belongs to another phone",
    ErrorCode.GRANT_WRONG_BOX: "the grant is for another box",
    ErrorCode.GRANT_PRICE_ABOVE_LIMIT: "the box's price is above the most you accepted for this grant",
    ErrorCode.PHONE_REVOKED: "this phone's key has been revoked by the operator",
    ErrorCode.USER_REVOKED: "your account has been blocked by the operator",
    ErrorCode.OUTLET_UNKNOWN: "the box has no such outlet",
    ErrorCode.OUTLET_BUSY: "the outlet is in use",
    ErrorCode.OUTLET_RESERVED: "the outlet is reserved for someone else",
    ErrorCode.SESSION_UNKNOWN: "no running session with that id (it may have ended)",
    ErrorCode.SESSION_NOT_OWNER: "that session belongs to another phone",
    ErrorCode.METERING_DOOR_OPEN: "the metering-box door is open: no power until it is shut",
    ErrorCode.OUTLET_FAULT: "the outlet is faulty; try another outlet or call the operator",
    ErrorCode.GRANT_TOO_SMALL: "the grant is for zero fen",
    ErrorCode.STALE_VERSION: "the box already has this or a newer version",
    ErrorCode.MESSAGE_MALFORMED: "not understood (a malformed label or message)",
    ErrorCode.MESSAGE_UNEXPECTED: "a message in the wrong direction",
    ErrorCode.TOKEN_NOT_FOR_THIS_DOOR: "the reservation is for another box or outlet",
    ErrorCode.BOX_BUSY: "the box cannot do that now (sessions are running)",
    ErrorCode.LEDGER_UNKNOWN_BOX: "the server does not know that box",
    ErrorCode.INTERNAL: "an internal error",
    ErrorCode.API_UNAUTHENTICATED: "not logged in, or the login has expired: log in again",
    ErrorCode.API_FORBIDDEN: "not allowed for this account",
    ErrorCode.API_NOT_FOUND: "not found on the server",
    ErrorCode.API_MALFORMED: "the server did not accept the request",
    ErrorCode.API_TOO_LARGE: "the request is too large for the server",
    ErrorCode.API_CONFLICT: "conflicts with what the server holds",
    ErrorCode.API_RATE_LIMITED: "too many attempts; wait a little",
    ErrorCode.API_UNAVAILABLE: "the server cannot be reached; everything at the box still works offline",
    ErrorCode.AUTH_FAILED: "wrong number, password or code",
    ErrorCode.INSUFFICIENT_FUNDS: "your deposit is too small for that: top it up first",
    ErrorCode.ARREARS_OUTSTANDING: "you owe arrears: pay them before new grants",
    ErrorCode.PAYMENT_FAILED: "the payment did not go through",
    ErrorCode.DEVICE_UNKNOWN: "this phone's key is not registered: run `powerbox phone device register`",
}

_RANGES: tuple[tuple[int, str], ...] = (
    (100, "the Bluetooth conversation failed; try again"),
    (200, "the secure handshake with the box failed"),
    (300, "the secure connection to the box broke"),
    (400, "a signed token was refused"),
    (500, "the box refused the request"),
    (600, "the ledger was refused"),
    (700, "the box reports a hardware fault"),
    (800, "the server refused the request"),
)


def explain(code: int) -> str:
    """A sentence for the user; never empty."""
    try:
        return _TEXTS[ErrorCode(code)]
    except (ValueError, KeyError):
        pass
    for start, text in reversed(_RANGES):
        if start <= code < start + 100:
            return text
    return "an unknown error"


def code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return "UNKNOWN"
