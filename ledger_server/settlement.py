"""Settlement: each contiguous ledger entry's effects, applied exactly once (DESIGN §6, S6, S7).

A box's entries 1..applied_sequence have been applied. Applying the next chunk happens in one
database transaction that first locks the box's ledger row, so two server processes (or a server
and the reconcile job) never apply the same entry twice; and every money movement carries a unique
journal key (`charge:<grant>:<box>:<session>`), so even a bug could not charge a receipt twice.

The rules, for a receipt (a SESSION_ENDED entry):
  * its cost is recomputed with `protocol.tariff` from energy and price, checked against the tariff
    table version it names, and charged at most what the box told the user and at most the grants;
  * the cost is split over its grants in order (`protocol.tariff.allocate_cost_fen`);
  * a grant still open is charged from its freeze and the rest of the freeze released: a grant is
    single use, so its first receipt settles it;
  * a grant already settled (used at a second box while both were offline) or already released
    (reported after it expired) is charged anyway; that money is owed: arrears, and an anomaly.
Open grants that expire unused are released by the batch job (`reconcile`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import anomalies, auth, journal, registry, verification
from ledger_server.anomalies import Anomaly, AnomalyKind
from ledger_server.context import ServerContext
from ledger_server.db import Database
from ledger_server.errors import ServerError
from ledger_server.grants import GrantState
from ledger_server.journal import BooksReport, JournalTransaction, TransactionKind
from ledger_server.schema import (
    box_ledgers,
    boxes,
    grant_charges,
    grants,
    ledger_entries,
    session_grants,
    sessions,
)
from protocol import tariff
from protocol.tokens import (
    ClockAdjustedBody,
    LedgerEntry,
    SessionReceipt,
    SessionStartedBody,
    SessionToppedUpBody,
    TariffTable,
    TimeQuality,
)

log = logging.getLogger(__name__)

CLOCK_AHEAD_TOLERANCE = 86_400  # a box more than a day ahead of the server is flagged
GRANT_ISSUE_TOLERANCE = 300  # a session may start a little "before" its grant (clock skew)


@dataclass(slots=True, kw_only=True)
class _Grant:
    """A grant row being settled (mutable while a chunk is worked out, then written back)."""

    grant_id: bytes
    user_id: int
    box_id: str | None
    phone_key: bytes
    amount_fen: int
    max_price_fen_per_kwh: int
    issued_at: int
    expires_at: int
    state: str
    charged_fen: int
    captured_fen: int
    excess_fen: int
    released_fen: int
    closed_at: int | None
    charges: int  # sessions charged to it so far
    changed: bool = False


@dataclass(slots=True, kw_only=True)
class _Session:
    session_id: bytes
    outlet: int
    user_id: int
    phone_key: bytes
    start_time: int
    start_register_wh: int
    tariff_version: int
    price_fen_per_kwh: int
    started_sequence: int
    grant_ids: list[bytes]
    is_new: bool
    end_time: int | None = None
    energy_wh: int | None = None
    claimed_cost_fen: int | None = None
    cost_fen: int | None = None
    end_reason: int | None = None
    ended_sequence: int | None = None
    ended_now: bool = False


@dataclass(slots=True, kw_only=True)
class _Effects:
    found: list[Anomaly] = field(default_factory=list)
    transactions: list[JournalTransaction] = field(default_factory=list)
    charges: list[tuple[bytes, str, bytes, int, int, int, int, int]] = field(default_factory=list)
    session_grants: list[tuple[str, bytes, bytes, int]] = field(default_factory=list)
    outlets: dict[int, tuple[bool, int]] = field(default_factory=dict)


class _ChunkSettler:
    """Works out, in memory, what one chunk of entries does; the caller writes it in one go."""

    def __init__(
        self,
        *,
        box_id: str,
        tariff_region: str,
        now: int,
        last_time: int,
        grants_by_id: dict[bytes, _Grant],
        sessions_by_id: dict[bytes, _Session],
        tariffs: Mapping[int, TariffTable | None],
    ) -> None:
        self.box_id = box_id
        self.tariff_region = tariff_region
        self.now = now
        self.last_time = last_time
        self.grants = grants_by_id
        self.sessions = sessions_by_id
        self.tariffs = tariffs
        self.effects = _Effects()

    def _flag(self, kind: AnomalyKind, key: str, detail: str, **where: Any) -> None:
        self.effects.found.append(
            Anomaly(kind=kind, dedup_key=f"{self.box_id}:{key}", detail=detail, box_id=self.box_id, **where)
        )

    def apply(self, sequence: int, entry: LedgerEntry) -> None:
        self._check_clock(sequence, entry)
        match entry.body:
            case SessionStartedBody() as body:
                self._started(sequence, entry, body)
            case SessionToppedUpBody() as body:
                self._topped_up(sequence, body)
            case SessionReceipt() as receipt:
                self._ended(sequence, entry, receipt)
            case ClockAdjustedBody() as body if body.new_time < body.previous_time:
                self._flag(
                    AnomalyKind.CLOCK, f"{sequence}:backwards", f"entry {sequence}: clock set backwards"
                )
            case _:
                pass

    def _check_clock(self, sequence: int, entry: LedgerEntry) -> None:
        if entry.time < self.last_time:
            self._flag(
                AnomalyKind.CLOCK,
                f"{sequence}:earlier",
                f"entry {sequence} is stamped {entry.time}, before the entry ahead of it ({self.last_time})",
                sequence=sequence,
            )
        if entry.time > self.now + CLOCK_AHEAD_TOLERANCE:
            self._flag(
                AnomalyKind.CLOCK,
                f"{sequence}:ahead",
                f"entry {sequence} is stamped {entry.time - self.now} s ahead of the server",
                sequence=sequence,
            )
        self.last_time = max(self.last_time, entry.time)

    def _started(self, sequence: int, entry: LedgerEntry, body: SessionStartedBody) -> None:
        if body.session_id in self.sessions:
            self._flag(
                AnomalyKind.FORK,
                f"{sequence}:session",
                f"entry {sequence} starts session {body.session_id.hex()} again",
                sequence=sequence,
            )
            return
        self.sessions[body.session_id] = _Session(
            session_id=body.session_id,
            outlet=body.outlet,
            user_id=body.user_id,
            phone_key=body.phone_key,
            start_time=body.start_time,
            start_register_wh=body.start_register_wh,
            tariff_version=body.tariff_version,
            price_fen_per_kwh=body.price_fen_per_kwh,
            started_sequence=sequence,
            grant_ids=[],
            is_new=True,
        )
        self._use_grant(sequence, body.session_id, body.grant_id, body.price_fen_per_kwh, body.start_time)
        grant = self.grants.get(body.grant_id)
        if grant is not None and (grant.user_id != body.user_id or grant.phone_key != body.phone_key):
            self._flag(
                AnomalyKind.UNKNOWN_GRANT,
                f"{sequence}:holder",
                f"entry {sequence}: grant {body.grant_id.hex()} belongs to another user or phone",
                sequence=sequence,
                grant_id=body.grant_id,
            )
        self.effects.outlets[body.outlet] = (False, entry.time)

    def _topped_up(self, sequence: int, body: SessionToppedUpBody) -> None:
        session = self.sessions.get(body.session_id)
        if session is None or session.end_time is not None:
            self._flag(
                AnomalyKind.FORK,
                f"{sequence}:top-up",
                f"entry {sequence} tops up session {body.session_id.hex()}, which is not running",
                sequence=sequence,
            )
            return
        self._use_grant(
            sequence, body.session_id, body.grant_id, session.price_fen_per_kwh, session.start_time
        )

    def _use_grant(
        self, sequence: int, session_id: bytes, grant_id: bytes, price: int, start_time: int
    ) -> None:
        session = self.sessions[session_id]
        if grant_id in session.grant_ids:
            return
        session.grant_ids.append(grant_id)
        self.effects.session_grants.append((self.box_id, session_id, grant_id, len(session.grant_ids)))
        grant = self.grants.get(grant_id)
        if grant is None:
            self._flag(
                AnomalyKind.UNKNOWN_GRANT,
                f"{sequence}:{grant_id.hex()}",
                f"entry {sequence} uses grant {grant_id.hex()}, which this server never issued",
                sequence=sequence,
                grant_id=grant_id,
            )
            return
        if grant.box_id is not None and grant.box_id != self.box_id:
            self._flag(
                AnomalyKind.UNKNOWN_GRANT,
                f"{sequence}:{grant_id.hex()}:box",
                f"entry {sequence} uses grant {grant_id.hex()}, issued for {grant.box_id}",
                sequence=sequence,
                grant_id=grant_id,
                user_id=grant.user_id,
            )
        if price > grant.max_price_fen_per_kwh:
            self._flag(
                AnomalyKind.COST_MISMATCH,
                f"{sequence}:{grant_id.hex()}:price",
                f"entry {sequence}: price {price} above the grant's limit {grant.max_price_fen_per_kwh}",
                sequence=sequence,
                grant_id=grant_id,
                user_id=grant.user_id,
            )
        if start_time + GRANT_ISSUE_TOLERANCE < grant.issued_at:
            self._flag(
                AnomalyKind.CLOCK,
                f"{sequence}:{grant_id.hex()}:before-issue",
                f"entry {sequence}: session started before grant {grant_id.hex()} was issued",
                sequence=sequence,
                grant_id=grant_id,
            )

    def _ended(self, sequence: int, entry: LedgerEntry, receipt: SessionReceipt) -> None:
        session = self.sessions.get(receipt.session_id)
        if session is None or session.end_time is not None:
            self._flag(
                AnomalyKind.FORK,
                f"{sequence}:receipt",
                f"entry {sequence} ends session {receipt.session_id.hex()}, which is not running",
                sequence=sequence,
            )
            return
        for grant_id in receipt.grant_ids:
            self._use_grant(
                sequence, receipt.session_id, grant_id, receipt.price_fen_per_kwh, receipt.start_time
            )
        if entry.time_quality is TimeQuality.UNKNOWN:
            self._flag(
                AnomalyKind.CLOCK,
                f"{sequence}:unsynced",
                f"receipt {sequence} was stamped by a clock never synced",
                sequence=sequence,
            )
        recomputed = tariff.session_cost_fen(receipt.energy_wh, receipt.price_fen_per_kwh)
        table = self.tariffs.get(receipt.tariff_version)
        if table is None or table.price_for(self.box_id, self.tariff_region) != receipt.price_fen_per_kwh:
            self._flag(
                AnomalyKind.COST_MISMATCH,
                f"{sequence}:tariff",
                f"receipt {sequence}: price {receipt.price_fen_per_kwh} is not tariff version "
                f"{receipt.tariff_version}'s price here",
                sequence=sequence,
            )
        ordered = list(dict.fromkeys(receipt.grant_ids))
        amounts = [self.grants[g].amount_fen if g in self.grants else 0 for g in ordered]
        expected_claim = min(recomputed, sum(amounts))
        if receipt.cost_fen != expected_claim:
            self._flag(
                AnomalyKind.COST_MISMATCH,
                f"{sequence}:cost",
                f"receipt {sequence} claims {receipt.cost_fen} fen; energy and price make {expected_claim}",
                sequence=sequence,
            )
        # Never more than the tariff, the grants, or what the box told the user.
        cost = min(expected_claim, receipt.cost_fen)
        for grant_id, charge in zip(ordered, tariff.allocate_cost_fen(cost, amounts), strict=True):
            grant = self.grants.get(grant_id)
            if grant is not None:
                self._charge(sequence, grant, receipt.session_id, charge)
        session.end_time = receipt.end_time
        session.energy_wh = receipt.energy_wh
        session.claimed_cost_fen = receipt.cost_fen
        session.cost_fen = cost
        session.end_reason = int(receipt.end_reason)
        session.ended_sequence = sequence
        session.ended_now = True
        self.effects.outlets[receipt.outlet] = (True, entry.time)

    def _charge(self, sequence: int, grant: _Grant, session_id: bytes, charge: int) -> None:
        user = grant.user_id
        frozen, available = journal.frozen_account(user), journal.available_account(user)
        arrears, revenue = journal.arrears_account(user), journal.revenue_account(self.box_id)
        if grant.charges:
            self._flag(
                AnomalyKind.DOUBLE_SPEND,
                f"{grant.grant_id.hex()}:{session_id.hex()}",
                f"grant {grant.grant_id.hex()} charged again, by session {session_id.hex()} at {self.box_id}"
                f" (entry {sequence}); {charge} fen become arrears",
                sequence=sequence,
                grant_id=grant.grant_id,
                user_id=user,
            )
        elif grant.state == GrantState.RELEASED:
            self._flag(
                AnomalyKind.LATE_RECEIPT,
                f"{grant.grant_id.hex()}:{session_id.hex()}",
                f"receipt {sequence} for grant {grant.grant_id.hex()}, released as unused;"
                f" {charge} fen become arrears",
                sequence=sequence,
                grant_id=grant.grant_id,
                user_id=user,
            )
        if grant.state == GrantState.OPEN:
            captured, excess = min(charge, grant.amount_fen), max(0, charge - grant.amount_fen)
            released = grant.amount_fen - captured
            moves = journal.transfers(
                (frozen, revenue, captured), (arrears, revenue, excess), (frozen, available, released)
            )
            grant.state, grant.closed_at = GrantState.SETTLED, self.now
        else:
            captured, excess, released = 0, charge, 0
            moves = journal.transfers((arrears, revenue, excess))
        grant.charges += 1
        grant.charged_fen += charge
        grant.captured_fen += captured
        grant.excess_fen += excess
        grant.released_fen += released
        grant.changed = True
        self.effects.charges.append(
            (grant.grant_id, self.box_id, session_id, user, charge, captured, excess, self.now)
        )
        self.effects.transactions.append(
            JournalTransaction(
                key=f"charge:{grant.grant_id.hex()}:{self.box_id}:{session_id.hex()}",
                kind=TransactionKind.CHARGE,
                transfers=moves,
                created_at=self.now,
                user_id=user,
                grant_id=grant.grant_id,
                box_id=self.box_id,
                session_id=session_id,
            )
        )


# --- reading and writing a chunk -------------------------------------------------------------------


def _referenced(entries: Sequence[tuple[int, LedgerEntry]]) -> tuple[set[bytes], set[bytes], set[int]]:
    grant_ids: set[bytes] = set()
    session_ids: set[bytes] = set()
    versions: set[int] = set()
    for _, entry in entries:
        match entry.body:
            case SessionStartedBody() as body:
                grant_ids.add(body.grant_id)
                session_ids.add(body.session_id)  # to notice a session id started a second time
                versions.add(body.tariff_version)
            case SessionToppedUpBody() as body:
                grant_ids.add(body.grant_id)
                session_ids.add(body.session_id)
            case SessionReceipt() as receipt:
                grant_ids.update(receipt.grant_ids)
                session_ids.add(receipt.session_id)
                versions.add(receipt.tariff_version)
            case _:
                pass
    return grant_ids, session_ids, versions


_GRANT_COLUMNS = (
    "grant_id",
    "user_id",
    "box_id",
    "phone_key",
    "amount_fen",
    "max_price_fen_per_kwh",
    "issued_at",
    "expires_at",
    "state",
    "charged_fen",
    "captured_fen",
    "excess_fen",
    "released_fen",
    "closed_at",
)


async def _load_grants(
    database: Database, connection: AsyncConnection, grant_ids: set[bytes]
) -> dict[bytes, _Grant]:
    """The grants a chunk touches, row-locked in one order (fewer deadlocks), with their charge counts."""
    if not grant_ids:
        return {}
    ordered = sorted(grant_ids)
    counts: dict[bytes, int] = dict(
        await database.fetch_in(
            connection,
            "SELECT grant_id, count(*) FROM grant_charges WHERE grant_id IN ({}) GROUP BY grant_id",
            ordered,
        )
    )
    rows = await database.fetch_in(
        connection,
        f"SELECT {', '.join(_GRANT_COLUMNS)} FROM grants WHERE grant_id IN ({{}}) ORDER BY grant_id",  # noqa: S608
        ordered,
        lock=True,
    )
    loaded = {}
    for row in rows:
        values = dict(zip(_GRANT_COLUMNS, row, strict=True))
        values["grant_id"], values["phone_key"] = bytes(values["grant_id"]), bytes(values["phone_key"])
        loaded[values["grant_id"]] = _Grant(**values, charges=int(counts.get(values["grant_id"], 0)))
    return loaded


_STORED_SESSION_COLUMNS = (
    "session_id",
    "outlet",
    "user_id",
    "phone_key",
    "start_time",
    "start_register_wh",
    "tariff_version",
    "price_fen_per_kwh",
    "started_sequence",
    "end_time",
    "energy_wh",
    "claimed_cost_fen",
    "cost_fen",
    "end_reason",
    "ended_sequence",
)


async def _load_sessions(
    database: Database, connection: AsyncConnection, box_id: str, session_ids: set[bytes]
) -> dict[bytes, _Session]:
    if not session_ids:
        return {}
    ordered = sorted(session_ids)
    rows = await database.fetch_in(
        connection,
        f"SELECT {', '.join(_STORED_SESSION_COLUMNS)} FROM sessions"  # noqa: S608
        " WHERE box_id = ? AND session_id IN ({})",
        ordered,
        before=(box_id,),
    )
    if not rows:
        return {}
    used: dict[bytes, list[bytes]] = defaultdict(list)
    for session_id, grant_id in await database.fetch_in(
        connection,
        "SELECT session_id, grant_id FROM session_grants"
        " WHERE box_id = ? AND session_id IN ({}) ORDER BY position",
        [bytes(row[0]) for row in rows],
        before=(box_id,),
    ):
        used[bytes(session_id)].append(bytes(grant_id))
    loaded = {}
    for row in rows:
        values = dict(zip(_STORED_SESSION_COLUMNS, row, strict=True))
        session_id = bytes(values["session_id"])
        values["session_id"], values["phone_key"] = session_id, bytes(values["phone_key"])
        loaded[session_id] = _Session(**values, grant_ids=used[session_id], is_new=False)
    return loaded


# The writes of a chunk go straight through the driver (`Database.execute_many`): several rows per
# ledger entry, where SQLAlchemy's per-row parameter handling would cost more than the database.
_SESSION_COLUMNS = (
    "box_id",
    "session_id",
    "outlet",
    "user_id",
    "phone_key",
    "start_time",
    "start_register_wh",
    "tariff_version",
    "price_fen_per_kwh",
    "started_sequence",
    "end_time",
    "energy_wh",
    "claimed_cost_fen",
    "cost_fen",
    "end_reason",
    "ended_sequence",
)
_SESSION_GRANT_COLUMNS = ("box_id", "session_id", "grant_id", "position")
_CHARGE_COLUMNS = (
    "grant_id",
    "box_id",
    "session_id",
    "user_id",
    "charge_fen",
    "captured_fen",
    "excess_fen",
    "created_at",
)
_END_SESSION = (
    "UPDATE sessions SET end_time = ?, energy_wh = ?, claimed_cost_fen = ?, cost_fen = ?, end_reason = ?,"
    " ended_sequence = ? WHERE box_id = ? AND session_id = ?"
)
_UPDATE_GRANT = (
    "UPDATE grants SET state = ?, charged_fen = ?, captured_fen = ?, excess_fen = ?, released_fen = ?,"
    " closed_at = ? WHERE grant_id = ?"
)
# Only a newer fact changes an outlet's last known availability.
_SET_OUTLET = (
    "UPDATE box_outlets SET available = ?, availability_at = ? WHERE box_id = ? AND number = ?"
    " AND (availability_at IS NULL OR availability_at <= ?)"
)


async def _write(
    context: ServerContext, connection: AsyncConnection, settler: _ChunkSettler
) -> dict[str, int]:
    """Write what the chunk did; return the balance changes, which the caller applies last."""
    database, box_id, effects = context.database, settler.box_id, settler.effects
    await database.insert_many(
        connection,
        sessions,
        _SESSION_COLUMNS,
        [
            (
                box_id,
                s.session_id,
                s.outlet,
                s.user_id,
                s.phone_key,
                s.start_time,
                s.start_register_wh,
                s.tariff_version,
                s.price_fen_per_kwh,
                s.started_sequence,
                s.end_time,
                s.energy_wh,
                s.claimed_cost_fen,
                s.cost_fen,
                s.end_reason,
                s.ended_sequence,
            )
            for s in settler.sessions.values()
            if s.is_new
        ],
    )
    await database.execute_many(
        connection,
        _END_SESSION,
        [
            (
                s.end_time,
                s.energy_wh,
                s.claimed_cost_fen,
                s.cost_fen,
                s.end_reason,
                s.ended_sequence,
                box_id,
                s.session_id,
            )
            for s in settler.sessions.values()
            if s.ended_now and not s.is_new
        ],
    )
    # Which grants a session uses matters while it runs (its grants are not released as unused);
    # a session that ended in this chunk has had every grant charged already.
    await database.insert_many(
        connection,
        session_grants,
        _SESSION_GRANT_COLUMNS,
        [row for row in effects.session_grants if settler.sessions[row[1]].end_time is None],
        ignore_conflicts=True,
    )
    await database.insert_many(connection, grant_charges, _CHARGE_COLUMNS, effects.charges)
    deltas = await journal.record(database, connection, effects.transactions)
    await database.execute_many(
        connection,
        _UPDATE_GRANT,
        [
            (g.state, g.charged_fen, g.captured_fen, g.excess_fen, g.released_fen, g.closed_at, g.grant_id)
            for g in settler.grants.values()
            if g.changed
        ],
    )
    await database.execute_many(
        connection,
        _SET_OUTLET,
        [
            (available, time, box_id, outlet, time)
            for outlet, (available, time) in sorted(effects.outlets.items())
        ],
    )
    await anomalies.record(database, connection, effects.found, settler.now)
    return deltas


async def _apply_chunk(
    context: ServerContext, connection: AsyncConnection, box_id: str, known: Mapping[int, LedgerEntry]
) -> int:
    state = (
        await connection.execute(select(box_ledgers).where(box_ledgers.c.box_id == box_id).with_for_update())
    ).one()
    upto = min(state.contiguous_sequence, state.applied_sequence + context.config.settle_chunk_entries)
    if upto <= state.applied_sequence:
        return 0
    wanted = range(state.applied_sequence + 1, upto + 1)
    missing = [sequence for sequence in wanted if sequence not in known]
    decoded = dict(known)
    if missing:
        rows = await connection.execute(
            select(ledger_entries.c.sequence, ledger_entries.c.signed).where(
                ledger_entries.c.box_id == box_id, ledger_entries.c.sequence.between(missing[0], missing[-1])
            )
        )
        # Verified when stored; decoding again is enough.
        decoded.update((sequence, LedgerEntry.decode_unverified(signed)) for sequence, signed in rows.all())
    entries = [(sequence, decoded[sequence]) for sequence in wanted]
    grant_ids, session_ids, versions = _referenced(entries)
    region = (
        await connection.execute(select(boxes.c.tariff_region).where(boxes.c.box_id == box_id))
    ).scalar_one()
    settler = _ChunkSettler(
        box_id=box_id,
        tariff_region=region,
        now=context.clock(),
        last_time=state.applied_time,
        grants_by_id=await _load_grants(context.database, connection, grant_ids),
        sessions_by_id=await _load_sessions(context.database, connection, box_id, session_ids),
        tariffs={version: await registry.tariff_version(connection, version) for version in sorted(versions)},
    )
    for sequence, entry in entries:
        settler.apply(sequence, entry)
    deltas = await _write(context, connection, settler)
    await connection.execute(
        update(box_ledgers)
        .where(box_ledgers.c.box_id == box_id)
        .values(applied_sequence=upto, applied_time=settler.last_time)
    )
    await journal.move_balances(context.database, connection, deltas)
    return len(entries)


async def _decode_ahead(
    context: ServerContext, box_id: str, known: Mapping[int, LedgerEntry], *, skip: int = 0
) -> dict[int, LedgerEntry]:
    """Decode a coming chunk's stored entries in the worker processes, outside any transaction (the
    batch job reads whole ledgers back; decoding them is its heaviest part). `skip`: start that many
    entries past the first unapplied one (to decode the chunk after the one being applied)."""
    if context.checkers is None:
        return {}
    chunk = context.config.settle_chunk_entries
    async with context.database.connect() as connection:
        state = (
            await connection.execute(
                select(box_ledgers.c.applied_sequence, box_ledgers.c.contiguous_sequence).where(
                    box_ledgers.c.box_id == box_id
                )
            )
        ).first()
        if state is None:
            return {}
        first = state.applied_sequence + 1 + skip
        last = min(state.contiguous_sequence, first + chunk - 1)
        wanted = [sequence for sequence in range(first, last + 1) if sequence not in known]
        if len(wanted) < context.config.process_batch_threshold:
            return {}
        rows = (
            await connection.execute(
                select(ledger_entries.c.sequence, ledger_entries.c.signed).where(
                    ledger_entries.c.box_id == box_id,
                    ledger_entries.c.sequence.between(wanted[0], wanted[-1]),
                )
            )
        ).all()
    workers = context.config.verify_processes
    parts = [part for part in (rows[start::workers] for start in range(workers)) if part]
    loop = asyncio.get_running_loop()
    try:
        decoded = await asyncio.gather(
            *(
                loop.run_in_executor(
                    context.checkers, verification.decode_stored, [bytes(row.signed) for row in part]
                )
                for part in parts
            )
        )
    except BrokenExecutor:
        log.exception("the decoding processes are gone; each chunk is decoded in its transaction instead")
        return {}
    return {
        row.sequence: entry
        for part, entries in zip(parts, decoded, strict=True)
        for row, entry in zip(part, entries, strict=True)
    }


async def settle_box(
    context: ServerContext,
    box_id: str,
    *,
    known: Mapping[int, LedgerEntry] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    decode_ahead: bool = False,
) -> int:
    """Apply every contiguous, not yet applied entry of the box, chunk by chunk; returns how many.

    `known`: entries already decoded by the caller (saves decoding them again from the database).
    `decode_ahead` (for the batch job, which reads whole ledgers back): decode each chunk in the
    worker processes, the next one while this one is applied.
    """
    known = known or {}
    total = 0

    async def nothing() -> dict[int, LedgerEntry]:
        return {}

    def ahead(skip: int) -> asyncio.Future[dict[int, LedgerEntry]]:
        return asyncio.ensure_future(
            _decode_ahead(context, box_id, known, skip=skip) if decode_ahead else nothing()
        )

    coming = ahead(0)
    try:
        while True:
            decoded = {**known, **await coming}
            coming = ahead(context.config.settle_chunk_entries)

            async def work(connection: AsyncConnection, decoded: Mapping[int, LedgerEntry] = decoded) -> int:
                return await _apply_chunk(context, connection, box_id, decoded)

            applied = await context.database.transaction(work)
            if not applied:
                return total
            total += applied
            if on_chunk is not None:
                on_chunk(applied)
    finally:
        coming.cancel()
        with contextlib.suppress(asyncio.CancelledError, ServerError):
            await coming


async def release_expired_grants(context: ServerContext, *, limit: int) -> int:
    """Release up to `limit` open grants that expired (plus the grace) with no session using them."""
    now = context.clock()
    cutoff = now - context.config.release_grace_seconds

    async def work(connection: AsyncConnection) -> int:
        used = (
            select(session_grants.c.grant_id).where(session_grants.c.grant_id == grants.c.grant_id).exists()
        )
        rows = (
            await connection.execute(
                select(grants.c.grant_id, grants.c.user_id, grants.c.amount_fen)
                .where(grants.c.state == GrantState.OPEN, grants.c.expires_at <= cutoff, ~used)
                .order_by(grants.c.grant_id)
                .limit(limit)
                .with_for_update(skip_locked=True)  # several reconcilers share the work
            )
        ).all()
        if not rows:
            return 0
        await journal.post(
            context.database,
            connection,
            [
                JournalTransaction(
                    key=f"release:{row.grant_id.hex()}",
                    kind=TransactionKind.RELEASE,
                    transfers=journal.transfers(
                        (
                            journal.frozen_account(row.user_id),
                            journal.available_account(row.user_id),
                            row.amount_fen,
                        )
                    ),
                    created_at=now,
                    user_id=row.user_id,
                    grant_id=row.grant_id,
                )
                for row in rows
            ],
        )
        await connection.execute(
            update(grants)
            .where(grants.c.grant_id == bindparam("target_grant"), grants.c.state == GrantState.OPEN)
            .values(state=GrantState.RELEASED, released_fen=grants.c.amount_fen, closed_at=now),
            [{"target_grant": row.grant_id} for row in rows],
        )
        return len(rows)

    return await context.database.transaction(work)


# --- the batch job ---------------------------------------------------------------------------------


class Stage(enum.StrEnum):
    SETTLE = "settle"
    RELEASE = "release"


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileSummary:
    entries_applied: int
    boxes_settled: int
    grants_released: int
    gaps: int
    books: BooksReport


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconcileWork:
    """What is left to do, so a progress bar knows its length."""

    entries_to_apply: int
    boxes: tuple[str, ...]
    grants_to_release: int


async def pending_work(context: ServerContext) -> ReconcileWork:
    cutoff = context.clock() - context.config.release_grace_seconds
    async with context.database.connect() as connection:
        rows = (
            await connection.execute(
                select(
                    box_ledgers.c.box_id, box_ledgers.c.contiguous_sequence - box_ledgers.c.applied_sequence
                )
                .where(box_ledgers.c.contiguous_sequence > box_ledgers.c.applied_sequence)
                .order_by(box_ledgers.c.box_id)
            )
        ).all()
        used = (
            select(session_grants.c.grant_id).where(session_grants.c.grant_id == grants.c.grant_id).exists()
        )
        expiring = (
            await connection.execute(
                select(func.count())
                .select_from(grants)
                .where(grants.c.state == GrantState.OPEN, grants.c.expires_at <= cutoff, ~used)
            )
        ).scalar_one()
    return ReconcileWork(
        entries_to_apply=sum(int(count) for _, count in rows),
        boxes=tuple(box_id for box_id, _ in rows),
        grants_to_release=int(expiring),
    )


async def record_gaps(context: ServerContext) -> int:
    """One GAP anomaly per box whose stored entries wait for missing ones."""
    now = context.clock()

    async def work(connection: AsyncConnection) -> int:
        rows = (
            await connection.execute(
                select(
                    box_ledgers.c.box_id,
                    box_ledgers.c.contiguous_sequence,
                    func.min(ledger_entries.c.sequence),
                )
                .join(ledger_entries, ledger_entries.c.box_id == box_ledgers.c.box_id)
                .where(ledger_entries.c.sequence > box_ledgers.c.contiguous_sequence)
                .group_by(box_ledgers.c.box_id, box_ledgers.c.contiguous_sequence)
            )
        ).all()
        await anomalies.record(
            context.database,
            connection,
            [
                Anomaly(
                    kind=AnomalyKind.GAP,
                    dedup_key=f"{box_id}:{contiguous + 1}",
                    detail=f"{box_id}: entries from {first_waiting} wait for"
                    f" {contiguous + 1}..{first_waiting - 1}",
                    box_id=box_id,
                    sequence=contiguous + 1,
                )
                for box_id, contiguous, first_waiting in rows
            ],
            now,
        )
        return len(rows)

    return await context.database.transaction(work)


async def reconcile(
    context: ServerContext,
    *,
    release_chunk: int = 200,
    on_progress: Callable[[Stage, int], None] | None = None,
) -> ReconcileSummary:
    """The batch job: settle every box's outstanding entries, release expired unused grants, list
    gaps, and prove the books. Each step is its own transaction: killed anywhere, run it again."""
    work = await pending_work(context)
    at_once = asyncio.Semaphore(4)  # boxes settle independently: overlap one's decoding with another's writes

    async def settle(box_id: str) -> int:
        async with at_once:
            return await settle_box(
                context,
                box_id,
                on_chunk=(lambda n: on_progress(Stage.SETTLE, n)) if on_progress else None,
                decode_ahead=True,
            )

    applied = sum(await asyncio.gather(*(settle(box_id) for box_id in work.boxes)))
    released = 0
    while True:
        count = await release_expired_grants(context, limit=release_chunk)
        if not count:
            break
        released += count
        if on_progress is not None:
            on_progress(Stage.RELEASE, count)
    gaps = await record_gaps(context)

    async def tidy(connection: AsyncConnection) -> None:
        await auth.forget_expired(context, connection)

    await context.database.transaction(tidy)
    async with context.database.connect() as connection:
        books = await journal.check_books(connection)
    if not books.balanced:
        log.error("the books do not balance: %s", "; ".join(books.problems))
    return ReconcileSummary(
        entries_applied=applied,
        boxes_settled=len(work.boxes),
        grants_released=released,
        gaps=gaps,
        books=books,
    )
