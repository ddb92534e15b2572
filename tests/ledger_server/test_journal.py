"""The books check finds money made, lost or misplaced; the database refuses some of it outright."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import Executable, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import journal
from ledger_server.db import Database
from ledger_server.errors import ConflictError
from ledger_server.journal import JournalTransaction, TransactionKind
from ledger_server.schema import accounts, grant_charges, grants, journal_transactions, payments
from protocol import testing
from tests.ledger_server.harness import Api, BoxLedger

TAMPERINGS: list[tuple[Executable, str]] = [
    (update(accounts).where(accounts.c.account_id == "revenue:BOX-J").values(balance_fen=1), "cached"),
    (update(grants).values(charged_fen=grants.c.charged_fen + 1), "totals disagree"),
    (update(grant_charges).values(charge_fen=grant_charges.c.charge_fen + 7), "its sessions were charged"),
    (update(payments).values(amount_fen=999), "provider's record"),
    (update(grants).where(grants.c.state == "open").values(state="released"), "open grants"),
    (text("DELETE FROM journal_transfers WHERE amount_fen = 260"), "cached"),
]


@pytest.fixture
async def books_copy(sqlite_api: Api, sqlite_url: str, tmp_path: Path) -> str:
    """A copy of a server's database after a deposit, a settled session and an open grant."""
    api = sqlite_api
    user = await api.shared_user()
    phone = await api.user_device(user)
    await api.top_up(user, 1000)
    await api.set_tariff(120)
    key = testing.ed25519_key("journal box")
    await api.provision("BOX-J", key)
    ledger = BoxLedger(box_id="BOX-J", key=key)
    ledger.session((await api.grant(user, phone, 500)).grant, energy_wh=2000)
    await api.grant(user, phone, 200)
    await api.upload(await api.box_token("BOX-J", key), ledger.entries)
    copy = tmp_path / "copy.db"
    source = sqlite3.connect(sqlite_url.removeprefix("sqlite+aiosqlite:///"))
    try:
        source.execute("VACUUM INTO ?", (str(copy),))  # a consistent copy, WAL and all
    finally:
        source.close()
    return f"sqlite+aiosqlite:///{copy}"


@pytest.mark.parametrize(("tampering", "found"), TAMPERINGS)
async def test_the_books_check_finds_tampering(books_copy: str, tampering: Executable, found: str) -> None:
    database = Database(books_copy)
    try:
        async with database.connect() as connection:
            assert (await journal.check_books(connection)).balanced

        async def tamper(connection: AsyncConnection) -> None:
            await connection.execute(tampering)

        await database.transaction(tamper)
        async with database.connect() as connection:
            books = await journal.check_books(connection)
    finally:
        await database.close()
    assert not books.balanced
    assert any(found in problem for problem in books.problems), books.problems


async def test_the_same_money_never_moves_twice_nor_below_zero(books_copy: str) -> None:
    database = Database(books_copy)
    try:

        async def post(connection: AsyncConnection, key: str, amount: int) -> None:
            await journal.post(
                database,
                connection,
                [
                    JournalTransaction(
                        key=key,
                        kind=TransactionKind.DEPOSIT,
                        transfers=journal.transfers(("user:1:available", journal.EXTERNAL_PAYMENTS, amount)),
                        created_at=0,
                    )
                ],
            )

        async def repeat(connection: AsyncConnection) -> None:
            existing = (
                await connection.execute(select(journal_transactions.c.transaction_key).limit(1))
            ).scalar_one()
            await post(connection, existing, 1)

        async def overdraw(connection: AsyncConnection) -> None:
            await post(connection, "overdraw", 10**6)

        for work in (repeat, overdraw):
            with pytest.raises(ConflictError):
                await database.transaction(work)
        async with database.connect() as connection:
            assert (await journal.check_books(connection)).balanced
    finally:
        await database.close()
