"""The double-entry money journal, integer fen.

Every movement of money is a journal transaction (named by an idempotency key, unique in the
database) made of transfers, each from one account to another. An account's balance is what came
in minus what went out, so the balances of all accounts always sum to zero: money is never created
or lost, only moved. Accounts:

    user:<id>:available   a user's deposit they may spend (never negative)
    user:<id>:frozen      held for the user's open grants (never negative)
    user:<id>:arrears     what the user owes beyond their grants (never positive)
    revenue:<box id>      what sessions at that box earned
    external:payments     the payment provider: top-ups in, withdrawals out
    external:electricity  electricity accounts that users pay from

`check_books` proves the invariants from the transfers themselves; the tests call it after every
scenario, and operators through `GET /v1/operator/books`.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server.db import Database
from ledger_server.errors import InsufficientFundsError
from ledger_server.schema import (
    accounts,
    grant_charges,
    grants,
    journal_transactions,
    journal_transfers,
    payments,
)

EXTERNAL_PAYMENTS = "external:payments"
EXTERNAL_ELECTRICITY = "external:electricity"


class AccountKind(enum.StrEnum):
    AVAILABLE = "available"
    FROZEN = "frozen"
    ARREARS = "arrears"
    REVENUE = "revenue"
    EXTERNAL = "external"


class PaymentKind(enum.StrEnum):
    """What the payment provider did, as recorded in `payments` (the provider's side of the books)."""

    TOP_UP = "top_up"
    ACCOUNT_CHARGE = "account_charge"
    WITHDRAWAL = "withdrawal"


class TransactionKind(enum.StrEnum):
    DEPOSIT = "deposit"  # top-up through the payment provider
    ACCOUNT_CHARGE = "account_charge"  # drawn from a user's electricity account
    FREEZE = "freeze"  # a grant was issued
    CHARGE = "charge"  # a session's receipt charged a grant (capture, excess as arrears, release)
    RELEASE = "release"  # an expired, unused grant gave its money back
    LATE_CHARGE = "late_charge"  # a receipt for a grant already released
    WITHDRAWAL = "withdrawal"  # refund of a deposit to the user
    ARREARS_PAID = "arrears_paid"


def available_account(user_id: int) -> str:
    return f"user:{user_id}:available"


def frozen_account(user_id: int) -> str:
    return f"user:{user_id}:frozen"


def arrears_account(user_id: int) -> str:
    return f"user:{user_id}:arrears"


def revenue_account(box_id: str) -> str:
    return f"revenue:{box_id}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    source: str
    destination: str
    amount_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalTransaction:
    key: str
    kind: TransactionKind
    transfers: tuple[Transfer, ...]
    created_at: int
    user_id: int | None = None
    grant_id: bytes | None = None
    box_id: str | None = None
    session_id: bytes | None = None


def transfers(*moves: tuple[str, str, int]) -> tuple[Transfer, ...]:
    """Transfers from (source, destination, amount) triples, leaving out the zero ones."""
    return tuple(Transfer(source=s, destination=d, amount_fen=a) for s, d, a in moves if a > 0)


async def create_user_accounts(connection: AsyncConnection, user_id: int) -> None:
    await connection.execute(
        accounts.insert(),
        [
            {"account_id": available_account(user_id), "kind": AccountKind.AVAILABLE, "user_id": user_id},
            {"account_id": frozen_account(user_id), "kind": AccountKind.FROZEN, "user_id": user_id},
            {"account_id": arrears_account(user_id), "kind": AccountKind.ARREARS, "user_id": user_id},
        ],
    )


async def create_revenue_account(connection: AsyncConnection, box_id: str) -> None:
    await connection.execute(
        accounts.insert().values(
            account_id=revenue_account(box_id), kind=AccountKind.REVENUE, box_id=box_id, balance_fen=0
        )
    )


async def create_external_accounts(database: Database, connection: AsyncConnection) -> None:
    await connection.execute(
        database.insert_ignoring_conflicts(accounts),
        [
            {"account_id": name, "kind": AccountKind.EXTERNAL, "balance_fen": 0}
            for name in (EXTERNAL_PAYMENTS, EXTERNAL_ELECTRICITY)
        ],
    )


async def locked_balances(connection: AsyncConnection, account_ids: Iterable[str]) -> dict[str, int]:
    """Balances of `account_ids`, row-locked until the transaction ends (so a check-then-debit holds)."""
    ordered = sorted(set(account_ids))  # one lock order everywhere: fewer deadlocks
    rows = await connection.execute(
        select(accounts.c.account_id, accounts.c.balance_fen)
        .where(accounts.c.account_id.in_(ordered))
        .order_by(accounts.c.account_id)
        .with_for_update()
    )
    return {account_id: balance for account_id, balance in rows}


_TRANSACTION_COLUMNS = (
    "transaction_key",
    "kind",
    "user_id",
    "grant_id",
    "box_id",
    "session_id",
    "created_at",
)
_TRANSFER_COLUMNS = ("transaction_key", "source_account", "destination_account", "amount_fen")
_APPLY_DELTA = "UPDATE accounts SET balance_fen = balance_fen + ? WHERE account_id = ?"


async def record(
    database: Database, connection: AsyncConnection, batch: Sequence[JournalTransaction]
) -> dict[str, int]:
    """Write `batch` to the journal; return how much each account's balance must move (the caller
    moves them with `move_balances`, last in its transaction). A key already posted fails the whole
    database transaction (a unique violation): the same money never moves twice."""
    batch = [transaction for transaction in batch if transaction.transfers]
    deltas: dict[str, int] = defaultdict(int)
    if not batch:
        return deltas
    await database.insert_many(
        connection,
        journal_transactions,
        _TRANSACTION_COLUMNS,
        [(t.key, str(t.kind), t.user_id, t.grant_id, t.box_id, t.session_id, t.created_at) for t in batch],
    )
    rows = []
    for transaction in batch:
        for transfer in transaction.transfers:
            rows.append((transaction.key, transfer.source, transfer.destination, transfer.amount_fen))
            deltas[transfer.source] -= transfer.amount_fen
            deltas[transfer.destination] += transfer.amount_fen
    await database.insert_many(connection, journal_transfers, _TRANSFER_COLUMNS, rows)
    return deltas


async def move_balances(database: Database, connection: AsyncConnection, deltas: Mapping[str, int]) -> None:
    """Apply balance changes. Account rows are the most shared rows there are (every settlement of a
    user's grants touches them), so this comes last in a transaction, in one lock order everywhere."""
    await database.execute_many(
        connection, _APPLY_DELTA, [(delta, account) for account, delta in sorted(deltas.items()) if delta]
    )


async def post(database: Database, connection: AsyncConnection, batch: Sequence[JournalTransaction]) -> None:
    """Record `batch` and move the balances at once (for transactions that do little else)."""
    await move_balances(database, connection, await record(database, connection, batch))


async def require_available(connection: AsyncConnection, user_id: int, amount_fen: int) -> None:
    """Raise InsufficientFundsError unless the user's available balance covers `amount_fen`; the
    balance stays row-locked until the transaction ends, so the debit that follows cannot overdraw."""
    balances = await locked_balances(connection, [available_account(user_id)])
    if balances.get(available_account(user_id), 0) < amount_fen:
        raise InsufficientFundsError(f"available balance below {amount_fen} fen")


@dataclass(frozen=True, slots=True, kw_only=True)
class BooksReport:
    """What `check_books` found: `problems` is empty when every invariant holds."""

    accounts: int
    transactions: int
    transfers: int
    total_fen: int
    problems: tuple[str, ...] = field(default=())

    @property
    def balanced(self) -> bool:
        return not self.problems


async def check_books(connection: AsyncConnection) -> BooksReport:
    """Prove the journal from its transfers: cached balances, signs, grants, revenue, payments."""
    problems: list[str] = []
    flows: dict[str, int] = defaultdict(int)
    transfer_count = 0
    for source, destination, amount in await connection.execute(
        select(
            journal_transfers.c.source_account,
            journal_transfers.c.destination_account,
            journal_transfers.c.amount_fen,
        )
    ):
        transfer_count += 1
        flows[source] -= amount
        flows[destination] += amount
    account_rows = (
        await connection.execute(
            select(accounts.c.account_id, accounts.c.kind, accounts.c.user_id, accounts.c.balance_fen)
        )
    ).all()
    total = 0
    balances: dict[str, int] = {}
    for account_id, kind, _user_id, balance in account_rows:
        balances[account_id] = balance
        total += balance
        if flows.get(account_id, 0) != balance:
            problems.append(f"{account_id}: cached {balance} fen, transfers say {flows.get(account_id, 0)}")
        if kind in (AccountKind.AVAILABLE, AccountKind.FROZEN) and balance < 0:
            problems.append(f"{account_id} is negative: {balance} fen")
        if kind == AccountKind.ARREARS and balance > 0:
            problems.append(f"{account_id} is positive: {balance} fen")
    for account_id in set(flows) - set(balances):
        problems.append(f"transfers touch unknown account {account_id}")
    if total != 0:
        problems.append(f"balances sum to {total} fen, not 0")

    transaction_count = (
        await connection.execute(select(func.count()).select_from(journal_transactions))
    ).scalar_one()
    empty = (
        await connection.execute(
            select(func.count())
            .select_from(journal_transactions)
            .where(
                ~select(journal_transfers.c.transfer_id)
                .where(journal_transfers.c.transaction_key == journal_transactions.c.transaction_key)
                .exists()
            )
        )
    ).scalar_one()
    if empty:
        problems.append(f"{empty} journal transactions without transfers")

    problems.extend(await _check_grants(connection, balances))
    problems.extend(await _check_revenue(connection, balances))
    problems.extend(await _check_payments(connection, balances))
    return BooksReport(
        accounts=len(account_rows),
        transactions=transaction_count,
        transfers=transfer_count,
        total_fen=total,
        problems=tuple(problems),
    )


async def _check_grants(connection: AsyncConnection, balances: dict[str, int]) -> list[str]:
    problems = []
    charges: dict[bytes, tuple[int, int, int]] = {}
    for grant_id, charged, captured, excess in await connection.execute(
        select(
            grant_charges.c.grant_id,
            func.sum(grant_charges.c.charge_fen),
            func.sum(grant_charges.c.captured_fen),
            func.sum(grant_charges.c.excess_fen),
        ).group_by(grant_charges.c.grant_id)
    ):
        charges[grant_id] = (int(charged), int(captured), int(excess))
    frozen_by_user: dict[int, int] = defaultdict(int)
    for row in await connection.execute(select(grants)):
        name = row.grant_id.hex()
        charged, captured, excess = charges.get(row.grant_id, (0, 0, 0))
        if (row.charged_fen, row.captured_fen, row.excess_fen) != (charged, captured, excess):
            problems.append(f"grant {name}: totals disagree with its charges")
        if row.captured_fen + row.excess_fen != row.charged_fen:
            problems.append(f"grant {name}: captured + excess != charged")
        if row.captured_fen > row.amount_fen:
            problems.append(f"grant {name}: captured {row.captured_fen} above its amount {row.amount_fen}")
        if row.state == "open":
            if row.captured_fen or row.released_fen:
                problems.append(f"grant {name}: open but already settled in part")
            frozen_by_user[row.user_id] += row.amount_fen
        elif row.captured_fen + row.released_fen != row.amount_fen:
            problems.append(f"grant {name}: captured + released != amount")
    for account_id, balance in balances.items():
        if account_id.startswith("user:") and account_id.endswith(":frozen"):
            user_id = int(account_id.split(":")[1])
            if balance != frozen_by_user.get(user_id, 0):
                problems.append(
                    f"{account_id} holds {balance} fen, open grants {frozen_by_user.get(user_id, 0)}"
                )
    return problems


async def _check_revenue(connection: AsyncConnection, balances: dict[str, int]) -> list[str]:
    by_box = {
        box_id: int(total)
        for box_id, total in await connection.execute(
            select(grant_charges.c.box_id, func.sum(grant_charges.c.charge_fen)).group_by(
                grant_charges.c.box_id
            )
        )
    }
    problems = []
    for account_id, balance in balances.items():
        if account_id.startswith("revenue:"):
            box_id = account_id.removeprefix("revenue:")
            if balance != by_box.get(box_id, 0):
                problems.append(
                    f"{account_id} holds {balance} fen, its sessions were charged {by_box.get(box_id, 0)}"
                )
    return problems


async def _check_payments(connection: AsyncConnection, balances: dict[str, int]) -> list[str]:
    expected = {EXTERNAL_PAYMENTS: 0, EXTERNAL_ELECTRICITY: 0}
    for kind, total in await connection.execute(
        select(payments.c.kind, func.sum(payments.c.amount_fen)).group_by(payments.c.kind)
    ):
        if kind == PaymentKind.TOP_UP:
            expected[EXTERNAL_PAYMENTS] -= int(total)
        elif kind == PaymentKind.WITHDRAWAL:
            expected[EXTERNAL_PAYMENTS] += int(total)
        elif kind == PaymentKind.ACCOUNT_CHARGE:
            expected[EXTERNAL_ELECTRICITY] -= int(total)
    return [
        f"{account_id} holds {balances.get(account_id, 0)} fen, the provider's record says {amount}"
        for account_id, amount in expected.items()
        if balances.get(account_id, 0) != amount
    ]
