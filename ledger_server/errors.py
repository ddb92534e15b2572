"""The server's errors: each carries an `ErrorCode` and the HTTP status it is answered with.

Routes raise these; `app.py` turns every one into `{"error": {"code", "name", "detail"}}`. Foreign
exceptions (SQLAlchemy, asyncpg, sqlite3) are translated in `db.py` and never reach a route.
"""

from __future__ import annotations

from protocol.errors import ErrorCode, PowerboxError


class ServerError(PowerboxError):
    """A request the server refuses; `status` is the HTTP status it answers with."""

    code = ErrorCode.INTERNAL
    status = 500


class UnauthenticatedError(ServerError):
    code = ErrorCode.API_UNAUTHENTICATED
    status = 401


class AuthenticationFailedError(ServerError):
    """Wrong password or one-time code: one answer for every reason, so it is no oracle."""

    code = ErrorCode.AUTH_FAILED
    status = 401


class ForbiddenError(ServerError):
    code = ErrorCode.API_FORBIDDEN
    status = 403


class NotFoundError(ServerError):
    code = ErrorCode.API_NOT_FOUND
    status = 404


class MalformedRequestError(ServerError):
    code = ErrorCode.API_MALFORMED
    status = 400


class TooLargeError(ServerError):
    code = ErrorCode.API_TOO_LARGE
    status = 413


class ConflictError(ServerError):
    code = ErrorCode.API_CONFLICT
    status = 409


class RateLimitedError(ServerError):
    code = ErrorCode.API_RATE_LIMITED
    status = 429


class UnavailableError(ServerError):
    """The database or a provider is unreachable; the client may retry."""

    code = ErrorCode.API_UNAVAILABLE
    status = 503


class InsufficientFundsError(ServerError):
    code = ErrorCode.INSUFFICIENT_FUNDS
    status = 409


class ArrearsOutstandingError(ServerError):
    code = ErrorCode.ARREARS_OUTSTANDING
    status = 409


class PaymentFailedError(ServerError):
    code = ErrorCode.PAYMENT_FAILED
    status = 402


class LedgerRejectedError(ServerError):
    """A ledger batch refused as a whole (bad signature, unknown box, malformed entry); nothing stored."""

    code = ErrorCode.LEDGER_BAD_SIGNATURE
    status = 400
