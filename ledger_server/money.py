"""A user's money: balances, top-ups, withdrawals, and paying off arrears.

Provider calls happen outside database transactions and carry idempotency keys; the database then
records the payment under the same key, once. A client that retries a top-up with its key gets the
first answer back, whether or not the first attempt's response reached it.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import journal
from ledger_server.context import ServerContext
from ledger_server.errors import ConflictError, MalformedRequestError
from ledger_server.journal import JournalTransaction, PaymentKind, TransactionKind
from ledger_server.schema import accounts, payments, users

MAX_PAYMENT_FEN = 10_000_000
IDEMPOTENCY_KEY_LENGTH = 64


@dataclass(frozen=True, slots=True, kw_only=True)
class Balances:
    available_fen: int
    frozen_fen: int
    arrears_fen: int  # what the user owes, as a positive number


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentResult:
    payment_id: int
    kind: PaymentKind
    amount_fen: int
    provider_reference: str
    balances: Balances


def check_idempotency_key(key: str) -> str:
    if not 1 <= len(key) <= IDEMPOTENCY_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise MalformedRequestError(
            f"an idempotency key is 1 to {IDEMPOTENCY_KEY_LENGTH} printable ASCII characters"
        )
    return key


def check_amount(amount_fen: int, maximum: int = MAX_PAYMENT_FEN) -> int:
    if not 1 <= amount_fen <= maximum:
        raise MalformedRequestError(f"an amount is 1 to {maximum} fen")
    return amount_fen


async def read_balances(connection: AsyncConnection, user_id: int) -> Balances:
    rows = await connection.execute(
        select(accounts.c.account_id, accounts.c.balance_fen).where(accounts.c.user_id == user_id)
    )
    found = {account_id: balance for account_id, balance in rows}
    return Balances(
        available_fen=found.get(journal.available_account(user_id), 0),
        frozen_fen=found.get(journal.frozen_account(user_id), 0),
        arrears_fen=-found.get(journal.arrears_account(user_id), 0),
    )


async def balances(context: ServerContext, user_id: int) -> Balances:
    async with context.database.connect() as connection:
        return await read_balances(connection, user_id)


async def pay_arrears_from_deposit(context: ServerContext, connection: AsyncConnection, user_id: int) -> int:
    """Move what the user owes from their available deposit, as far as it goes; the rest still owed."""
    available, arrears = journal.available_account(user_id), journal.arrears_account(user_id)
    locked = await journal.locked_balances(connection, [available, arrears])
    paid = min(locked[available], -locked[arrears])
    if paid > 0:
        await journal.post(
            context.database,
            connection,
            [
                JournalTransaction(
                    key=f"arrears-paid:{user_id}:{secrets.token_hex(8)}",
                    kind=TransactionKind.ARREARS_PAID,
                    transfers=journal.transfers((available, arrears, paid)),
                    created_at=context.clock(),
                    user_id=user_id,
                )
            ],
        )
    return -locked[arrears] - paid


async def _existing_payment(connection: AsyncConnection, key: str) -> tuple[int, str, int, str] | None:
    row = (
        await connection.execute(
            select(
                payments.c.payment_id, payments.c.kind, payments.c.amount_fen, payments.c.provider_reference
            ).where(payments.c.idempotency_key == key)
        )
    ).first()
    return None if row is None else (row.payment_id, row.kind, row.amount_fen, row.provider_reference)


async def record_deposit(
    context: ServerContext,
    connection: AsyncConnection,
    *,
    user_id: int,
    kind: PaymentKind,
    amount_fen: int,
    key: str,
    reference: str,
) -> int:
    """Book money the provider collected for the user (once per key); pays arrears first."""
    existing = await _existing_payment(connection, key)
    if existing is not None:
        if existing[1:3] != (kind, amount_fen):
            raise ConflictError("this idempotency key was used for another payment")
        return existing[0]
    payment_id = (
        await connection.execute(
            payments.insert()
            .values(
                idempotency_key=key,
                user_id=user_id,
                kind=kind,
                amount_fen=amount_fen,
                provider_reference=reference,
                created_at=context.clock(),
            )
            .returning(payments.c.payment_id)
        )
    ).scalar_one()
    source = journal.EXTERNAL_ELECTRICITY if kind is PaymentKind.ACCOUNT_CHARGE else journal.EXTERNAL_PAYMENTS
    await journal.post(
        context.database,
        connection,
        [
            JournalTransaction(
                key=key,
                kind=TransactionKind.ACCOUNT_CHARGE
                if kind is PaymentKind.ACCOUNT_CHARGE
                else TransactionKind.DEPOSIT,
                transfers=journal.transfers((source, journal.available_account(user_id), amount_fen)),
                created_at=context.clock(),
                user_id=user_id,
            )
        ],
    )
    await pay_arrears_from_deposit(context, connection, user_id)
    return int(payment_id)


async def top_up(
    context: ServerContext, user_id: int, amount_fen: int, idempotency_key: str
) -> PaymentResult:
    check_amount(amount_fen)
    key = f"top-up:{user_id}:{check_idempotency_key(idempotency_key)}"
    async with context.database.connect() as connection:
        existing = await _existing_payment(connection, key)
    if existing is not None:
        if existing[1:3] != (PaymentKind.TOP_UP, amount_fen):
            raise ConflictError("this idempotency key was used for another payment")
        reference = existing[3]
    else:
        reference = await context.payments.collect_top_up(
            user_id=user_id, amount_fen=amount_fen, idempotency_key=key
        )

    async def work(connection: AsyncConnection) -> PaymentResult:
        payment_id = await record_deposit(
            context,
            connection,
            user_id=user_id,
            kind=PaymentKind.TOP_UP,
            amount_fen=amount_fen,
            key=key,
            reference=reference,
        )
        return PaymentResult(
            payment_id=payment_id,
            kind=PaymentKind.TOP_UP,
            amount_fen=amount_fen,
            provider_reference=reference,
            balances=await read_balances(connection, user_id),
        )

    return await context.database.transaction(work)


async def withdraw(
    context: ServerContext, user_id: int, amount_fen: int, idempotency_key: str
) -> PaymentResult:
    """Give back part of a deposit: booked first (so it cannot be spent twice), then paid out."""
    check_amount(amount_fen)
    key = f"withdrawal:{user_id}:{check_idempotency_key(idempotency_key)}"

    async def work(connection: AsyncConnection) -> int:
        existing = await _existing_payment(connection, key)
        if existing is not None:
            if existing[1:3] != (PaymentKind.WITHDRAWAL, amount_fen):
                raise ConflictError("this idempotency key was used for another payment")
            return existing[0]
        await journal.require_available(connection, user_id, amount_fen)
        payment_id = (
            await connection.execute(
                payments.insert()
                .values(
                    idempotency_key=key,
                    user_id=user_id,
                    kind=PaymentKind.WITHDRAWAL,
                    amount_fen=amount_fen,
                    provider_reference="pending",
                    created_at=context.clock(),
                )
                .returning(payments.c.payment_id)
            )
        ).scalar_one()
        await journal.post(
            context.database,
            connection,
            [
                JournalTransaction(
                    key=key,
                    kind=TransactionKind.WITHDRAWAL,
                    transfers=journal.transfers(
                        (journal.available_account(user_id), journal.EXTERNAL_PAYMENTS, amount_fen)
                    ),
                    created_at=context.clock(),
                    user_id=user_id,
                )
            ],
        )
        return int(payment_id)

    payment_id = await context.database.transaction(work)
    # Should the provider fail here, the withdrawal stays booked ("pending") and a retry with the same
    # key asks the provider again (it pays out once per key).
    reference = await context.payments.refund(user_id=user_id, amount_fen=amount_fen, idempotency_key=key)

    async def record_reference(connection: AsyncConnection) -> None:
        await connection.execute(
            payments.update().where(payments.c.payment_id == payment_id).values(provider_reference=reference)
        )

    await context.database.transaction(record_reference)
    return PaymentResult(
        payment_id=payment_id,
        kind=PaymentKind.WITHDRAWAL,
        amount_fen=amount_fen,
        provider_reference=reference,
        balances=await balances(context, user_id),
    )


async def user_kind_and_account(connection: AsyncConnection, user_id: int) -> tuple[str, str | None]:
    row = (
        await connection.execute(
            select(users.c.kind, users.c.electricity_account).where(users.c.user_id == user_id)
        )
    ).one()
    return row.kind, row.electricity_account
