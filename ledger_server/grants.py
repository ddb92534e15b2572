"""Issuing what phones carry to boxes: balance grants (money frozen first), unlock tokens for
technicians, and reservations (DESIGN §2). Each is operator-signed with the active key."""

from __future__ import annotations

import contextlib
import enum
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import journal, money, registry
from ledger_server.auth import Principal, Role, UserKind, require_device
from ledger_server.context import ServerContext
from ledger_server.errors import (
    ArrearsOutstandingError,
    ConflictError,
    ForbiddenError,
    InsufficientFundsError,
    MalformedRequestError,
)
from ledger_server.journal import JournalTransaction, PaymentKind, TransactionKind
from ledger_server.schema import grants, reservations
from protocol import tokens
from protocol.errors import ErrorCode
from protocol.tokens import BalanceGrant, Door, Reservation, UnlockToken

MIN_GRANT_SECONDS = 60
MAX_SESSION_SECONDS = 31 * 86_400
MAX_UNLOCK_SECONDS = 8 * 3600
MAX_RESERVATION_SECONDS = 2 * 3600
RESERVATION_HORIZON_SECONDS = 86_400


class GrantState(enum.StrEnum):
    OPEN = "open"  # frozen, not yet used as far as the server knows
    SETTLED = "settled"  # a receipt charged it; the rest of the freeze went back
    RELEASED = "released"  # expired unused; the whole freeze went back


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantRequest:
    phone_key: bytes
    amount_fen: int
    box_id: str | None
    valid_seconds: int
    max_price_fen_per_kwh: int
    max_session_seconds: int
    idempotency_key: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantRecord:
    grant_id: bytes
    user_id: int
    box_id: str | None
    amount_fen: int
    max_price_fen_per_kwh: int
    max_session_seconds: int
    issued_at: int
    expires_at: int
    state: str
    charged_fen: int
    captured_fen: int
    excess_fen: int
    released_fen: int
    signed: bytes


def grant_record(row: Row[Any]) -> GrantRecord:
    return GrantRecord(
        grant_id=row.grant_id,
        user_id=row.user_id,
        box_id=row.box_id,
        amount_fen=row.amount_fen,
        max_price_fen_per_kwh=row.max_price_fen_per_kwh,
        max_session_seconds=row.max_session_seconds,
        issued_at=row.issued_at,
        expires_at=row.expires_at,
        state=row.state,
        charged_fen=row.charged_fen,
        captured_fen=row.captured_fen,
        excess_fen=row.excess_fen,
        released_fen=row.released_fen,
        signed=row.signed,
    )


def _check_grant_request(context: ServerContext, request: GrantRequest) -> None:
    money.check_amount(request.amount_fen, context.config.max_grant_fen)
    money.check_idempotency_key(request.idempotency_key)
    if not MIN_GRANT_SECONDS <= request.valid_seconds <= context.config.max_grant_seconds:
        raise MalformedRequestError(
            f"a grant is valid for {MIN_GRANT_SECONDS} to {context.config.max_grant_seconds} seconds"
        )
    if not 1 <= request.max_session_seconds <= MAX_SESSION_SECONDS:
        raise MalformedRequestError(f"a session lasts at most {MAX_SESSION_SECONDS} seconds")
    if not 0 <= request.max_price_fen_per_kwh <= registry.MAX_PRICE_FEN_PER_KWH:
        raise MalformedRequestError("price limit out of range")


async def _charge_electricity_account_if_short(
    context: ServerContext, user_id: int, request: GrantRequest
) -> None:
    """An account user pays from their electricity account: draw what the deposit lacks first."""
    async with context.database.connect() as connection:
        kind, account_number = await money.user_kind_and_account(connection, user_id)
        if kind != UserKind.ACCOUNT or account_number is None:
            return
        request_key = f"{user_id}:{request.idempotency_key}"
        if (
            await connection.execute(select(grants.c.grant_id).where(grants.c.request_key == request_key))
        ).first():
            return  # a retry of a grant already issued
        balances = await money.read_balances(connection, user_id)
    shortfall = request.amount_fen + balances.arrears_fen - balances.available_fen
    if shortfall <= 0:
        return
    key = f"account-charge:{user_id}:{request.idempotency_key}"
    reference = await context.payments.charge_electricity_account(
        account_number=account_number, amount_fen=shortfall, idempotency_key=key
    )

    async def work(connection: AsyncConnection) -> None:
        # A different amount under the same key: drawn already by an earlier try of this request.
        with contextlib.suppress(ConflictError):
            await money.record_deposit(
                context,
                connection,
                user_id=user_id,
                kind=PaymentKind.ACCOUNT_CHARGE,
                amount_fen=shortfall,
                key=key,
                reference=reference,
            )

    await context.database.transaction(work)


async def issue_grant(context: ServerContext, principal: Principal, request: GrantRequest) -> GrantRecord:
    """Freeze the amount, then sign a BalanceGrant bound to the caller's registered phone key."""
    user_id = principal.user_id
    _check_grant_request(context, request)
    await _charge_electricity_account_if_short(context, user_id, request)
    now = context.clock()
    request_key = f"{user_id}:{request.idempotency_key}"

    async def work(connection: AsyncConnection) -> GrantRecord:
        existing = (
            await connection.execute(select(grants).where(grants.c.request_key == request_key))
        ).first()
        if existing is not None:
            record = grant_record(existing)
            if (record.amount_fen, record.box_id, bytes(existing.phone_key)) != (
                request.amount_fen,
                request.box_id,
                request.phone_key,
            ):
                raise ConflictError("this idempotency key was used for another grant")
            return record
        await require_device(connection, principal, request.phone_key)
        if request.box_id is not None:
            await registry.require_box(connection, request.box_id)
        latest = await registry.latest_revocations(connection)
        if latest is not None:
            revocations = registry.decode_revocations(latest)
            if user_id in revocations.user_ids or request.phone_key in revocations.phone_keys:
                raise ForbiddenError("this user or phone is revoked", code=ErrorCode.USER_REVOKED)
        owed = await money.pay_arrears_from_deposit(context, connection, user_id)
        if owed > 0:
            raise ArrearsOutstandingError(f"{owed} fen of arrears to pay first (top up)")
        available = journal.available_account(user_id)
        balance = (await journal.locked_balances(connection, [available]))[available]
        if balance < request.amount_fen:
            raise InsufficientFundsError(f"{balance} fen available, {request.amount_fen} asked")
        grant = BalanceGrant(
            grant_id=secrets.token_bytes(tokens.ID_SIZE),
            user_id=user_id,
            box_id=request.box_id,
            phone_key=Ed25519PublicKey.from_public_bytes(request.phone_key),
            amount_fen=request.amount_fen,
            max_price_fen_per_kwh=request.max_price_fen_per_kwh,
            max_session_seconds=request.max_session_seconds,
            issued_at=now,
            expires_at=min(now + request.valid_seconds, tokens.MAX_TIME),
        )
        signed = grant.sign(context.keys.signer)
        await connection.execute(
            grants.insert().values(
                grant_id=grant.grant_id,
                request_key=request_key,
                user_id=user_id,
                phone_key=request.phone_key,
                box_id=grant.box_id,
                amount_fen=grant.amount_fen,
                max_price_fen_per_kwh=grant.max_price_fen_per_kwh,
                max_session_seconds=grant.max_session_seconds,
                issued_at=grant.issued_at,
                expires_at=grant.expires_at,
                signed=signed,
                state=GrantState.OPEN,
                charged_fen=0,
                captured_fen=0,
                excess_fen=0,
                released_fen=0,
            )
        )
        await journal.post(
            context.database,
            connection,
            [
                JournalTransaction(
                    key=f"freeze:{grant.grant_id.hex()}",
                    kind=TransactionKind.FREEZE,
                    transfers=journal.transfers(
                        (available, journal.frozen_account(user_id), grant.amount_fen)
                    ),
                    created_at=now,
                    user_id=user_id,
                    grant_id=grant.grant_id,
                )
            ],
        )
        row = (await connection.execute(select(grants).where(grants.c.grant_id == grant.grant_id))).one()
        return grant_record(row)

    return await context.database.transaction(work)


async def list_grants(context: ServerContext, user_id: int) -> list[GrantRecord]:
    async with context.database.connect() as connection:
        rows = await connection.execute(
            select(grants).where(grants.c.user_id == user_id).order_by(grants.c.issued_at, grants.c.grant_id)
        )
        return [grant_record(row) for row in rows]


# --- unlock tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedToken:
    token_id: bytes
    signed: bytes
    not_before: int
    expires_at: int


async def issue_unlock_token(
    context: ServerContext,
    principal: Principal,
    *,
    box_id: str,
    door: Door,
    outlet: int,
    phone_key: bytes,
    valid_seconds: int,
) -> IssuedToken:
    """Lets a technician's phone open one door of one box for a while, without a session."""
    principal.require(Role.TECHNICIAN, Role.OPERATOR)
    if (door is Door.METERING_BOX) != (outlet == 0):
        raise MalformedRequestError("outlet is 0 exactly for the metering-box door")
    if not 60 <= valid_seconds <= MAX_UNLOCK_SECONDS:
        raise MalformedRequestError(f"an unlock token is valid for 60 to {MAX_UNLOCK_SECONDS} seconds")
    now = context.clock()

    async def work(connection: AsyncConnection) -> IssuedToken:
        await require_device(connection, principal, phone_key)
        await registry.require_box(connection, box_id)
        if outlet:
            await registry.require_outlet(connection, box_id, outlet)
        token = UnlockToken(
            token_id=secrets.token_bytes(tokens.ID_SIZE),
            holder_id=principal.staff_id,
            box_id=box_id,
            holder_key=Ed25519PublicKey.from_public_bytes(phone_key),
            door=door,
            outlet=outlet,
            not_before=now,
            expires_at=now + valid_seconds,
            issued_at=now,
        )
        return IssuedToken(
            token_id=token.token_id,
            signed=token.sign(context.keys.signer),
            not_before=token.not_before,
            expires_at=token.expires_at,
        )

    return await context.database.transaction(work, write=False)


# --- reservations ----------------------------------------------------------------------------------


async def reserve(
    context: ServerContext,
    principal: Principal,
    *,
    box_id: str,
    outlet: int,
    phone_key: bytes,
    starts_at: int,
    duration_seconds: int,
) -> IssuedToken:
    """Hold an outlet for the caller's phone; the box learns of it through the uplink."""
    user_id = principal.user_id
    now = context.clock()
    if not 60 <= duration_seconds <= MAX_RESERVATION_SECONDS:
        raise MalformedRequestError(f"a reservation lasts 60 to {MAX_RESERVATION_SECONDS} seconds")
    if not now - 60 <= starts_at <= now + RESERVATION_HORIZON_SECONDS:
        raise MalformedRequestError("a reservation starts within the next day")
    not_before, expires_at = max(starts_at, now), starts_at + duration_seconds

    async def work(connection: AsyncConnection) -> IssuedToken:
        await require_device(connection, principal, phone_key)
        await registry.require_box(connection, box_id, lock=True)  # serialises overlapping requests
        await registry.require_outlet(connection, box_id, outlet)
        overlapping = await connection.execute(
            select(reservations.c.reservation_id).where(
                reservations.c.box_id == box_id,
                reservations.c.outlet == outlet,
                reservations.c.not_before < expires_at,
                reservations.c.expires_at > not_before,
            )
        )
        if overlapping.first() is not None:
            raise ConflictError("the outlet is reserved then", code=ErrorCode.OUTLET_RESERVED)
        reservation = Reservation(
            reservation_id=secrets.token_bytes(tokens.ID_SIZE),
            user_id=user_id,
            box_id=box_id,
            outlet=outlet,
            phone_key=Ed25519PublicKey.from_public_bytes(phone_key),
            not_before=not_before,
            expires_at=expires_at,
            issued_at=now,
        )
        signed = reservation.sign(context.keys.signer)
        await connection.execute(
            reservations.insert().values(
                reservation_id=reservation.reservation_id,
                user_id=user_id,
                box_id=box_id,
                outlet=outlet,
                phone_key=phone_key,
                not_before=not_before,
                expires_at=expires_at,
                signed=signed,
            )
        )
        return IssuedToken(
            token_id=reservation.reservation_id, signed=signed, not_before=not_before, expires_at=expires_at
        )

    issued = await context.database.transaction(work)
    context.changes.notify()
    return issued
