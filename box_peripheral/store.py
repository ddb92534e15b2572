"""The box's persistent state on SQLite (aiosqlite): ledger, spent grants, sessions, clock, updates.

Every change that must survive a crash is one transaction: a session start writes its ledger
entry, its spent grant and its session row together, so after kill -9 or power loss either all
of it happened or none of it. WAL with synchronous=FULL makes a committed transaction durable.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from protocol import cose, tokens
from protocol.errors import ErrorCode, PowerboxError
from protocol.tokens import EntryBody, EntryKind, LedgerEntry, TimeQuality

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    sequence INTEGER PRIMARY KEY,
    entry_hash BLOB NOT NULL UNIQUE,
    kind INTEGER NOT NULL,
    signed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS spent_grants (
    grant_id BLOB PRIMARY KEY,
    session_id BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    session_id BLOB PRIMARY KEY,
    outlet INTEGER NOT NULL,
    owner_key BLOB NOT NULL,
    user_id INTEGER NOT NULL,
    grant_ids BLOB NOT NULL,          -- concatenated 8-byte ids, in order of use
    grant_amounts TEXT NOT NULL,      -- comma-separated fen, same order
    balance_fen INTEGER NOT NULL,
    max_end_time INTEGER NOT NULL,
    start_time INTEGER NOT NULL,
    start_register_wh INTEGER NOT NULL,
    last_register_wh INTEGER NOT NULL,
    last_reading_time INTEGER NOT NULL,
    last_load_time INTEGER NOT NULL,
    tariff_version INTEGER NOT NULL,
    price_fen_per_kwh INTEGER NOT NULL,
    end_time INTEGER,                 -- NULL while running
    end_reason INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS one_running_session_per_outlet ON sessions (outlet) WHERE end_time IS NULL;
-- the signed SESSION_ENDED entry of each ended session, kept after the ledger is pruned under an
-- ack so an owner who was away when the session ended still gets the receipt (ListSessions)
CREATE TABLE IF NOT EXISTS receipts (
    session_id BLOB PRIMARY KEY,
    signed BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    name TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""

CLOCK_HIGH_WATER = "clock_high_water"
LAST_SYNC = "last_operator_time"
REVOCATION_LIST = "revocation_list"
TARIFF_TABLE = "tariff_table"
LEDGER_ACK = "ledger_ack"


class StoreError(PowerboxError):
    code = ErrorCode.INTERNAL


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSession:
    session_id: bytes
    outlet: int
    owner_key: bytes
    user_id: int
    grant_ids: tuple[bytes, ...]
    grant_amounts_fen: tuple[int, ...]
    balance_fen: int
    max_end_time: int
    start_time: int
    start_register_wh: int
    last_register_wh: int
    last_reading_time: int
    last_load_time: int
    tariff_version: int
    price_fen_per_kwh: int
    end_time: int | None
    end_reason: tokens.EndReason | None

    @property
    def energy_wh(self) -> int:
        return self.last_register_wh - self.start_register_wh


# A constant column list, interpolated into constant queries only (never user input).
_SESSION_COLUMNS = (
    "session_id, outlet, owner_key, user_id, grant_ids, grant_amounts, balance_fen, max_end_time, start_time,"
    " start_register_wh, last_register_wh, last_reading_time, last_load_time, tariff_version,"
    " price_fen_per_kwh, end_time, end_reason"
)


def _session_from_row(row: Sequence[Any]) -> StoredSession:
    (
        sid,
        outlet,
        owner,
        user,
        grants,
        amounts,
        balance,
        max_end,
        start,
        reg0,
        reg,
        read_t,
        load_t,
        version,
        price,
        end,
        reason,
    ) = row
    return StoredSession(
        session_id=bytes(sid),
        outlet=int(outlet),
        owner_key=bytes(owner),
        user_id=int(user),
        grant_ids=tuple(grants[i : i + tokens.ID_SIZE] for i in range(0, len(grants), tokens.ID_SIZE)),
        grant_amounts_fen=tuple(int(a) for a in amounts.split(",")),
        balance_fen=int(balance),
        max_end_time=int(max_end),
        start_time=int(start),
        start_register_wh=int(reg0),
        last_register_wh=int(reg),
        last_reading_time=int(read_t),
        last_load_time=int(load_t),
        tariff_version=int(version),
        price_fen_per_kwh=int(price),
        end_time=None if end is None else int(end),
        end_reason=None if reason is None else tokens.EndReason(reason),
    )


class BoxStore:
    """One SQLite file; every method is one transaction."""

    def __init__(self, connection: aiosqlite.Connection, *, box_id: str, box_key: cose.SigningKey) -> None:
        self._db = connection
        self._box_id = box_id
        self._box_key = box_key

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, box_id: str, box_key: cose.SigningKey) -> AsyncIterator[BoxStore]:
        try:
            connection = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path.name}: {exc}") from None
        try:
            await connection.execute("PRAGMA journal_mode=WAL")
            await connection.execute("PRAGMA synchronous=FULL")
            await connection.executescript(SCHEMA)
            yield cls(connection, box_id=box_id, box_key=box_key)
        finally:
            await connection.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        await self._db.execute("COMMIT")

    # Ledger

    async def _append(
        self, db: aiosqlite.Connection, *, kind: EntryKind, body: EntryBody, time: int, quality: TimeQuality
    ) -> bytes:
        async with db.execute(
            "SELECT sequence, entry_hash FROM ledger ORDER BY sequence DESC LIMIT 1"
        ) as cursor:
            last = await cursor.fetchone()
        sequence, previous = (1, tokens.GENESIS_HASH) if last is None else (int(last[0]) + 1, bytes(last[1]))
        entry = LedgerEntry(
            box_id=self._box_id,
            sequence=sequence,
            previous_hash=previous,
            time=time,
            time_quality=quality,
            kind=kind,
            body=body,
        )
        signed = entry.sign(self._box_key)
        await db.execute(
            "INSERT INTO ledger (sequence, entry_hash, kind, signed) VALUES (?, ?, ?, ?)",
            (sequence, tokens.entry_hash(signed), int(kind), signed),
        )
        return signed

    async def append(self, *, kind: EntryKind, body: EntryBody, time: int, quality: TimeQuality) -> bytes:
        """Sign and commit one ledger entry; returns its signed bytes."""
        async with self._transaction() as db:
            return await self._append(db, kind=kind, body=body, time=time, quality=quality)

    async def entries(self, *, after: int = 0, limit: int = 1000) -> list[bytes]:
        async with self._db.execute(
            "SELECT signed FROM ledger WHERE sequence > ? ORDER BY sequence LIMIT ?", (after, limit)
        ) as cursor:
            return [bytes(row[0]) for row in await cursor.fetchall()]

    async def last_sequence(self) -> int:
        async with self._db.execute("SELECT COALESCE(MAX(sequence), 0) FROM ledger") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def entry_hash_at(self, sequence: int) -> bytes | None:
        async with self._db.execute(
            "SELECT entry_hash FROM ledger WHERE sequence = ?", (sequence,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else bytes(row[0])

    async def apply_ack(
        self, ack: tokens.LedgerAck, signed_ack: bytes, *, time: int, quality: TimeQuality
    ) -> bool:
        """Keep a newer ack that matches our chain, prune what it covers, log it. False if stale."""
        async with self._transaction() as db:
            current = await self._setting(db, LEDGER_ACK)
            if current is not None and tokens.LedgerAck.decode_unverified(current).sequence >= ack.sequence:
                return False
            async with db.execute(
                "SELECT entry_hash FROM ledger WHERE sequence = ?", (ack.sequence,)
            ) as cursor:
                row = await cursor.fetchone()
            if row is not None and bytes(row[0]) != ack.entry_hash:
                raise StoreError("ack does not match this box's chain", code=ErrorCode.LEDGER_FORK)
            if row is None and ack.sequence > await self._last_sequence(db):
                raise StoreError("ack for entries this box never wrote", code=ErrorCode.LEDGER_FORK)
            await self._put(db, LEDGER_ACK, signed_ack)
            # keep the newest covered entry: it anchors the chain for the next one
            await db.execute("DELETE FROM ledger WHERE sequence < ?", (ack.sequence,))
            await self._append(
                db,
                kind=EntryKind.ACK_RECEIVED,
                body=tokens.VersionBody(version=ack.sequence),
                time=time,
                quality=quality,
            )
            return True

    async def _last_sequence(self, db: aiosqlite.Connection) -> int:
        async with db.execute("SELECT COALESCE(MAX(sequence), 0) FROM ledger") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def acked_sequence(self) -> int:
        signed = await self.setting(LEDGER_ACK)
        return 0 if signed is None else tokens.LedgerAck.decode_unverified(signed).sequence

    # Settings: clock, revocation list, tariff table, ack

    async def _setting(self, db: aiosqlite.Connection, name: str) -> bytes | None:
        async with db.execute("SELECT value FROM settings WHERE name = ?", (name,)) as cursor:
            row = await cursor.fetchone()
        return None if row is None else bytes(row[0])

    async def _put(self, db: aiosqlite.Connection, name: str, value: bytes) -> None:
        await db.execute(
            "INSERT INTO settings (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    async def setting(self, name: str) -> bytes | None:
        return await self._setting(self._db, name)

    async def put_setting(self, name: str, value: bytes) -> None:
        async with self._transaction() as db:
            await self._put(db, name, value)

    async def replace_versioned(
        self, name: str, signed: bytes, *, kind: EntryKind, version: int, time: int, quality: TimeQuality
    ) -> None:
        """Store a newer revocation list or tariff table and log the version now held."""
        async with self._transaction() as db:
            await self._put(db, name, signed)
            await self._append(
                db, kind=kind, body=tokens.VersionBody(version=version), time=time, quality=quality
            )

    # Sessions and spent grants

    async def spent_grant_ids(self) -> set[bytes]:
        async with self._db.execute("SELECT grant_id FROM spent_grants") as cursor:
            return {bytes(row[0]) for row in await cursor.fetchall()}

    async def is_spent(self, grant_id: bytes) -> bool:
        async with self._db.execute("SELECT 1 FROM spent_grants WHERE grant_id = ?", (grant_id,)) as cursor:
            return await cursor.fetchone() is not None

    async def start_session(
        self, session: StoredSession, body: tokens.SessionStartedBody, *, quality: TimeQuality
    ) -> bytes:
        """Spend the grant, record the running session and its ledger entry, all at once."""
        async with self._transaction() as db:
            try:
                await db.execute(
                    "INSERT INTO spent_grants (grant_id, session_id) VALUES (?, ?)",
                    (session.grant_ids[0], session.session_id),
                )
                await db.execute(
                    f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({', '.join('?' * 17)})",  # noqa: S608
                    _session_row(session),
                )
            except sqlite3.IntegrityError:
                raise StoreError("grant spent or outlet busy", code=ErrorCode.GRANT_SPENT) from None
            return await self._append(
                db, kind=EntryKind.SESSION_STARTED, body=body, time=session.start_time, quality=quality
            )

    async def top_up(
        self, session_id: bytes, grant_id: bytes, amount_fen: int, *, time: int, quality: TimeQuality
    ) -> StoredSession:
        async with self._transaction() as db:
            session = await self._session(db, session_id)
            if session is None or session.end_time is not None:
                raise StoreError("no such running session", code=ErrorCode.SESSION_UNKNOWN)
            try:
                await db.execute(
                    "INSERT INTO spent_grants (grant_id, session_id) VALUES (?, ?)", (grant_id, session_id)
                )
            except sqlite3.IntegrityError:
                raise StoreError("grant spent", code=ErrorCode.GRANT_SPENT) from None
            amounts = ",".join(str(a) for a in (*session.grant_amounts_fen, amount_fen))
            await db.execute(
                "UPDATE sessions SET grant_ids = ?, grant_amounts = ?, balance_fen = balance_fen + ?"
                " WHERE session_id = ?",
                (b"".join((*session.grant_ids, grant_id)), amounts, amount_fen, session_id),
            )
            await self._append(
                db,
                kind=EntryKind.SESSION_TOPPED_UP,
                body=tokens.SessionToppedUpBody(
                    session_id=session_id, grant_id=grant_id, amount_fen=amount_fen
                ),
                time=time,
                quality=quality,
            )
            updated = await self._session(db, session_id)
            assert updated is not None
            return updated

    async def record_reading(self, session_id: bytes, *, register_wh: int, time: int, had_load: bool) -> None:
        """Persist the latest reading: what a restart closes the session from."""
        await self._db.execute(
            "UPDATE sessions SET last_register_wh = ?, last_reading_time = ?,"
            " last_load_time = CASE WHEN ? THEN ? ELSE last_load_time END"
            " WHERE session_id = ? AND end_time IS NULL",
            (register_wh, time, had_load, time, session_id),
        )

    async def end_session(
        self,
        session_id: bytes,
        receipt: tokens.SessionReceipt,
        *,
        quality: TimeQuality,
        entry_time: int | None = None,
    ) -> bytes | None:
        """Close a running session with its receipt, exactly once. None if it was already closed.
        The entry is stamped `entry_time` (default: the receipt's end)."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE sessions SET end_time = ?, end_reason = ?, last_register_wh = ?"
                " WHERE session_id = ? AND end_time IS NULL",
                (receipt.end_time, int(receipt.end_reason), receipt.end_register_wh, session_id),
            )
            if cursor.rowcount != 1:
                return None
            signed = await self._append(
                db,
                kind=EntryKind.SESSION_ENDED,
                body=receipt,
                time=receipt.end_time if entry_time is None else entry_time,
                quality=quality,
            )
            await db.execute("INSERT INTO receipts (session_id, signed) VALUES (?, ?)", (session_id, signed))
            return signed

    async def clock_state(self) -> tuple[int, int | None]:
        """What the clock persisted: its high-water mark, and the newest operator time it saw."""
        high_water = await self.setting(CLOCK_HIGH_WATER)
        last_sync = await self.setting(LAST_SYNC)
        return (
            int.from_bytes(high_water, "big") if high_water else 0,
            int.from_bytes(last_sync, "big") if last_sync else None,
        )

    async def receipt(self, session_id: bytes) -> bytes | None:
        """The signed SESSION_ENDED entry of an ended session."""
        async with self._db.execute("SELECT signed FROM receipts WHERE session_id = ?", (session_id,)) as c:
            row = await c.fetchone()
        return None if row is None else bytes(row[0])

    async def _session(self, db: aiosqlite.Connection, session_id: bytes) -> StoredSession | None:
        async with db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE session_id = ?",  # noqa: S608
            (session_id,),
        ) as c:
            row = await c.fetchone()
        return None if row is None else _session_from_row(tuple(row))

    async def session(self, session_id: bytes) -> StoredSession | None:
        return await self._session(self._db, session_id)

    async def running_sessions(self) -> list[StoredSession]:
        async with self._db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE end_time IS NULL ORDER BY outlet"  # noqa: S608
        ) as cursor:
            return [_session_from_row(tuple(row)) for row in await cursor.fetchall()]

    async def sessions_of(self, owner_key: bytes, *, since: int) -> list[StoredSession]:
        async with self._db.execute(
            f"SELECT {_SESSION_COLUMNS} FROM sessions"  # noqa: S608
            " WHERE owner_key = ? AND (end_time IS NULL OR end_time >= ?)"
            " ORDER BY start_time",
            (owner_key, since),
        ) as cursor:
            return [_session_from_row(tuple(row)) for row in await cursor.fetchall()]


def _session_row(session: StoredSession) -> tuple[object, ...]:
    return (
        session.session_id,
        session.outlet,
        session.owner_key,
        session.user_id,
        b"".join(session.grant_ids),
        ",".join(str(a) for a in session.grant_amounts_fen),
        session.balance_fen,
        session.max_end_time,
        session.start_time,
        session.start_register_wh,
        session.last_register_wh,
        session.last_reading_time,
        session.last_load_time,
        session.tariff_version,
        session.price_fen_per_kwh,
        session.end_time,
        None if session.end_reason is None else int(session.end_reason),
    )
