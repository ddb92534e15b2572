"""Statements for users, invoices for chosen sessions (stored once, printable), and the operator's
report of energy and revenue per box per day. All read from the journal and the settled sessions.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import journal, money
from ledger_server.context import ServerContext
from ledger_server.errors import ConflictError, MalformedRequestError, NotFoundError
from ledger_server.money import Balances
from ledger_server.schema import (
    invoice_lines,
    invoices,
    journal_transactions,
    journal_transfers,
    sessions,
    users,
)
from protocol.tokens import EndReason

SECONDS_PER_DAY = 86_400
MAX_INVOICE_SESSIONS = 200
MAX_REPORT_DAYS = 366


def day_of(time: int) -> str:
    return datetime.datetime.fromtimestamp(time, datetime.UTC).date().isoformat()


def format_time(time: int) -> str:
    return datetime.datetime.fromtimestamp(time, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_kwh(energy_wh: int) -> str:
    return f"{energy_wh // 1000}.{energy_wh % 1000:03d}"


def format_fen(amount_fen: int) -> str:
    sign = "-" if amount_fen < 0 else ""
    return f"{sign}¥{abs(amount_fen) // 100}.{abs(amount_fen) % 100:02d}"


@dataclass(frozen=True, slots=True, kw_only=True)
class StatementLine:
    time: int
    kind: str
    account: str  # available, frozen or arrears
    amount_fen: int  # + into the account, - out of it
    grant_id: bytes | None
    box_id: str | None
    session_id: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionLine:
    box_id: str
    session_id: bytes
    outlet: int
    start_time: int
    end_time: int | None
    energy_wh: int | None
    cost_fen: int | None
    end_reason: str | None
    invoiced: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Statement:
    user_id: int
    from_time: int
    to_time: int
    balances: Balances
    lines: tuple[StatementLine, ...]
    sessions: tuple[SessionLine, ...]


def _check_window(from_time: int, to_time: int) -> None:
    if not 0 <= from_time <= to_time:
        raise MalformedRequestError("the window must not end before it starts")


async def _sessions(
    connection: AsyncConnection, user_id: int, *, from_time: int, to_time: int
) -> tuple[SessionLine, ...]:
    rows = await connection.execute(
        select(sessions, invoice_lines.c.invoice_id)
        .outerjoin(
            invoice_lines,
            (invoice_lines.c.box_id == sessions.c.box_id)
            & (invoice_lines.c.session_id == sessions.c.session_id),
        )
        .where(sessions.c.user_id == user_id, sessions.c.start_time <= to_time)
        .where(or_(sessions.c.end_time.is_(None), sessions.c.end_time >= from_time))
        .order_by(sessions.c.start_time, sessions.c.box_id, sessions.c.session_id)
    )
    return tuple(
        SessionLine(
            box_id=row.box_id,
            session_id=row.session_id,
            outlet=row.outlet,
            start_time=row.start_time,
            end_time=row.end_time,
            energy_wh=row.energy_wh,
            cost_fen=row.cost_fen,
            end_reason=None if row.end_reason is None else EndReason(row.end_reason).name.lower(),
            invoiced=row.invoice_id is not None,
        )
        for row in rows
    )


async def statement(context: ServerContext, user_id: int, *, from_time: int, to_time: int) -> Statement:
    _check_window(from_time, to_time)
    mine = {
        journal.available_account(user_id): "available",
        journal.frozen_account(user_id): "frozen",
        journal.arrears_account(user_id): "arrears",
    }
    async with context.database.connect() as connection:
        rows = await connection.execute(
            select(
                journal_transactions.c.created_at,
                journal_transactions.c.kind,
                journal_transactions.c.grant_id,
                journal_transactions.c.box_id,
                journal_transactions.c.session_id,
                journal_transfers.c.source_account,
                journal_transfers.c.destination_account,
                journal_transfers.c.amount_fen,
            )
            .join(
                journal_transfers,
                journal_transfers.c.transaction_key == journal_transactions.c.transaction_key,
            )
            .where(
                or_(
                    journal_transfers.c.source_account.in_(mine),
                    journal_transfers.c.destination_account.in_(mine),
                ),
                journal_transactions.c.created_at.between(from_time, to_time),
            )
            .order_by(journal_transactions.c.created_at, journal_transfers.c.transfer_id)
        )
        lines = []
        for row in rows:
            for account, sign in ((row.source_account, -1), (row.destination_account, 1)):
                if account in mine:
                    lines.append(
                        StatementLine(
                            time=row.created_at,
                            kind=row.kind,
                            account=mine[account],
                            amount_fen=sign * row.amount_fen,
                            grant_id=row.grant_id,
                            box_id=row.box_id,
                            session_id=row.session_id,
                        )
                    )
        return Statement(
            user_id=user_id,
            from_time=from_time,
            to_time=to_time,
            balances=await money.read_balances(connection, user_id),
            lines=tuple(lines),
            sessions=await _sessions(connection, user_id, from_time=from_time, to_time=to_time),
        )


# --- invoices --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Invoice:
    number: str
    user_id: int
    created_at: int
    total_fen: int
    energy_wh: int
    sessions: tuple[SessionLine, ...]
    html: str


def render_invoice(
    *, number: str, created_at: int, holder: str, lines: Sequence[SessionLine], total_fen: int, energy_wh: int
) -> str:
    """A self-contained, printable HTML page (stored as issued: an invoice never changes)."""
    rows = "\n".join(
        "<tr>"
        f"<td>{html.escape(line.box_id)}</td><td>{line.outlet}</td>"
        f"<td>{html.escape(format_time(line.start_time))}</td>"
        f"<td>{html.escape(format_time(line.end_time or line.start_time))}</td>"
        f'<td class="n">{format_kwh(line.energy_wh or 0)}</td>'
        f'<td class="n">{html.escape(format_fen(line.cost_fen or 0))}</td>'
        "</tr>"
        for line in lines
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Invoice {html.escape(number)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; width: 100%; }}
th, td {{ border-bottom: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }}
td.n, th.n {{ text-align: right; }}
@media print {{ body {{ margin: 0; }} }}
</style></head>
<body>
<h1>Invoice {html.escape(number)}</h1>
<p>Issued {html.escape(day_of(created_at))} to {html.escape(holder)}</p>
<table>
<thead><tr><th>Box</th><th>Outlet</th><th>Start (UTC)</th><th>End (UTC)</th>
<th class="n">Energy (kWh)</th><th class="n">Cost</th></tr></thead>
<tbody>
{rows}
</tbody>
<tfoot><tr><th colspan="4">Total</th><th class="n">{format_kwh(energy_wh)}</th>
<th class="n">{html.escape(format_fen(total_fen))}</th></tr></tfoot>
</table>
</body></html>
"""


async def create_invoice(
    context: ServerContext, user_id: int, wanted: Sequence[tuple[str, bytes]]
) -> Invoice:
    """An invoice for the user's chosen, settled sessions; a session goes on one invoice only."""
    if not 1 <= len(wanted) <= MAX_INVOICE_SESSIONS or len(set(wanted)) != len(wanted):
        raise MalformedRequestError(f"an invoice lists 1 to {MAX_INVOICE_SESSIONS} distinct sessions")
    now = context.clock()

    async def work(connection: AsyncConnection) -> Invoice:
        found = {
            (line.box_id, line.session_id): line
            for line in await _sessions(connection, user_id, from_time=0, to_time=2**62)
        }
        lines = []
        for key in wanted:
            line = found.get(key)
            if line is None or line.cost_fen is None:
                raise NotFoundError(f"no settled session {key[1].hex()} at {key[0]} of yours")
            if line.invoiced:
                raise ConflictError(f"session {key[1].hex()} is on an invoice already")
            lines.append(dataclasses.replace(line, invoiced=True))
        count = (
            await connection.execute(
                select(func.count()).select_from(invoices).where(invoices.c.user_id == user_id)
            )
        ).scalar_one()
        number = f"INV-{user_id:06d}-{count + 1:04d}"
        holder = (
            await connection.execute(select(users.c.login).where(users.c.user_id == user_id))
        ).scalar_one()
        total = sum(line.cost_fen or 0 for line in lines)
        energy = sum(line.energy_wh or 0 for line in lines)
        page = render_invoice(
            number=number, created_at=now, holder=holder, lines=lines, total_fen=total, energy_wh=energy
        )
        invoice_id = (
            await connection.execute(
                invoices.insert()
                .values(
                    number=number,
                    user_id=user_id,
                    created_at=now,
                    total_fen=total,
                    energy_wh=energy,
                    html=page,
                )
                .returning(invoices.c.invoice_id)
            )
        ).scalar_one()
        await connection.execute(
            invoice_lines.insert(),
            [
                {
                    "box_id": line.box_id,
                    "session_id": line.session_id,
                    "invoice_id": invoice_id,
                    "cost_fen": line.cost_fen,
                    "energy_wh": line.energy_wh,
                }
                for line in lines
            ],
        )
        return Invoice(
            number=number,
            user_id=user_id,
            created_at=now,
            total_fen=total,
            energy_wh=energy,
            sessions=tuple(lines),
            html=page,
        )

    return await context.database.transaction(work)


async def get_invoice(context: ServerContext, user_id: int, number: str) -> Invoice:
    async with context.database.connect() as connection:
        row = (
            await connection.execute(
                select(invoices).where(invoices.c.number == number, invoices.c.user_id == user_id)
            )
        ).first()
        if row is None:
            raise NotFoundError(f"no invoice {number} of yours")
        keys = {
            (line.box_id, line.session_id)
            for line in await connection.execute(
                select(invoice_lines.c.box_id, invoice_lines.c.session_id).where(
                    invoice_lines.c.invoice_id == row.invoice_id
                )
            )
        }
        lines = [
            line
            for line in await _sessions(connection, user_id, from_time=0, to_time=2**62)
            if (line.box_id, line.session_id) in keys
        ]
    return Invoice(
        number=row.number,
        user_id=row.user_id,
        created_at=row.created_at,
        total_fen=row.total_fen,
        energy_wh=row.energy_wh,
        sessions=tuple(lines),
        html=row.html,
    )


async def list_invoices(context: ServerContext, user_id: int) -> list[tuple[str, int, int]]:
    """(number, created at, total fen) of the user's invoices, oldest first."""
    async with context.database.connect() as connection:
        rows = await connection.execute(
            select(invoices.c.number, invoices.c.created_at, invoices.c.total_fen)
            .where(invoices.c.user_id == user_id)
            .order_by(invoices.c.invoice_id)
        )
        return [(row.number, row.created_at, row.total_fen) for row in rows]


# --- operator report -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DailyBoxFigures:
    box_id: str
    day: str  # ISO date, UTC
    sessions: int
    energy_wh: int
    revenue_fen: int


async def daily_report(context: ServerContext, *, from_time: int, to_time: int) -> list[DailyBoxFigures]:
    """Energy and revenue per box per UTC day, by the day each session ended."""
    _check_window(from_time, to_time)
    if to_time - from_time > MAX_REPORT_DAYS * SECONDS_PER_DAY:
        raise MalformedRequestError(f"a report covers at most {MAX_REPORT_DAYS} days")
    # `//`: SQLAlchemy 2 turns `/` into true division; `//` stays integer division on both backends
    day = sessions.c.end_time // SECONDS_PER_DAY
    async with context.database.connect() as connection:
        rows = await connection.execute(
            select(
                sessions.c.box_id,
                day.label("day"),
                func.count(),
                func.coalesce(func.sum(sessions.c.energy_wh), 0),
                func.coalesce(func.sum(sessions.c.cost_fen), 0),
            )
            .where(sessions.c.end_time.is_not(None), sessions.c.end_time.between(from_time, to_time))
            .group_by(sessions.c.box_id, day)
            .order_by(day, sessions.c.box_id)
        )
        return [
            DailyBoxFigures(
                box_id=box_id,
                day=day_of(int(day_number) * SECONDS_PER_DAY),
                sessions=int(count),
                energy_wh=int(energy),
                revenue_fen=int(revenue),
            )
            for box_id, day_number, count, energy, revenue in rows
        ]
