"""What the server found wrong in the boxes' ledgers, listed for operators (DESIGN §6).

An anomaly is recorded once per fact however often the evidence arrives (a unique dedup key), and
never blocks settlement: the money side is always settled by the rules, the anomaly says why an
operator may want to look.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server.context import ServerContext
from ledger_server.db import Database
from ledger_server.schema import anomalies
from protocol.errors import ErrorCode

MAX_DETAIL = 400


class AnomalyKind(enum.StrEnum):
    DOUBLE_SPEND = "double_spend"  # one grant charged by two sessions (two boxes offline)
    FORK = "fork"  # the box signed two different entries for one place in its chain
    GAP = "gap"  # entries wait for missing ones
    BAD_SIGNATURE = "bad_signature"  # an entry the box key did not sign
    UNKNOWN_BOX = "unknown_box"  # entries of a box that was never provisioned
    COST_MISMATCH = "cost_mismatch"  # the receipt's cost or price is not what the tariff says
    CLOCK = "clock"  # box time went backwards, ran ahead, or contradicts a grant
    UNKNOWN_GRANT = "unknown_grant"  # a session names a grant we never issued, or not for it
    LATE_RECEIPT = "late_receipt"  # a receipt for a grant already released as unused

    @property
    def code(self) -> ErrorCode:
        return _CODES[self]


_CODES = {
    AnomalyKind.DOUBLE_SPEND: ErrorCode.LEDGER_DOUBLE_SPEND,
    AnomalyKind.FORK: ErrorCode.LEDGER_FORK,
    AnomalyKind.GAP: ErrorCode.LEDGER_GAP,
    AnomalyKind.BAD_SIGNATURE: ErrorCode.LEDGER_BAD_SIGNATURE,
    AnomalyKind.UNKNOWN_BOX: ErrorCode.LEDGER_UNKNOWN_BOX,
    AnomalyKind.COST_MISMATCH: ErrorCode.LEDGER_COST_MISMATCH,
    AnomalyKind.CLOCK: ErrorCode.LEDGER_CLOCK,
    AnomalyKind.UNKNOWN_GRANT: ErrorCode.LEDGER_UNKNOWN_GRANT,
    AnomalyKind.LATE_RECEIPT: ErrorCode.LEDGER_GAP,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Anomaly:
    kind: AnomalyKind
    dedup_key: str
    detail: str
    box_id: str | None = None
    sequence: int | None = None
    grant_id: bytes | None = None
    user_id: int | None = None
    evidence: bytes | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AnomalyRecord:
    anomaly_id: int
    kind: AnomalyKind
    detail: str
    box_id: str | None
    sequence: int | None
    grant_id: bytes | None
    user_id: int | None
    created_at: int
    resolved_at: int | None


async def record(database: Database, connection: AsyncConnection, found: Sequence[Anomaly], now: int) -> None:
    if not found:
        return
    await connection.execute(
        database.insert_ignoring_conflicts(anomalies),
        [
            {
                "kind": anomaly.kind,
                "dedup_key": f"{anomaly.kind}:{anomaly.dedup_key}"[:200],
                "box_id": anomaly.box_id,
                "sequence": anomaly.sequence,
                "grant_id": anomaly.grant_id,
                "user_id": anomaly.user_id,
                "detail": anomaly.detail[:MAX_DETAIL],
                "evidence": anomaly.evidence,
                "created_at": now,
            }
            for anomaly in found
        ],
    )


async def record_now(context: ServerContext, found: Sequence[Anomaly]) -> None:
    """Record in a transaction of its own (evidence kept even when the request is refused)."""

    async def work(connection: AsyncConnection) -> None:
        await record(context.database, connection, found, context.clock())

    await context.database.transaction(work)


async def resolve_gaps(connection: AsyncConnection, box_id: str, contiguous_sequence: int, now: int) -> None:
    await connection.execute(
        update(anomalies)
        .where(
            anomalies.c.kind == AnomalyKind.GAP,
            anomalies.c.box_id == box_id,
            anomalies.c.sequence <= contiguous_sequence,
            anomalies.c.resolved_at.is_(None),
        )
        .values(resolved_at=now)
    )


async def list_anomalies(
    context: ServerContext,
    *,
    kind: AnomalyKind | None = None,
    box_id: str | None = None,
    unresolved_only: bool = False,
    limit: int = 100,
    after_id: int = 0,
) -> list[AnomalyRecord]:
    query = select(anomalies).where(anomalies.c.anomaly_id > after_id)
    if kind is not None:
        query = query.where(anomalies.c.kind == kind)
    if box_id is not None:
        query = query.where(anomalies.c.box_id == box_id)
    if unresolved_only:
        query = query.where(anomalies.c.resolved_at.is_(None))
    async with context.database.connect() as connection:
        rows = await connection.execute(query.order_by(anomalies.c.anomaly_id).limit(limit))
        return [
            AnomalyRecord(
                anomaly_id=row.anomaly_id,
                kind=AnomalyKind(row.kind),
                detail=row.detail,
                box_id=row.box_id,
                sequence=row.sequence,
                grant_id=row.grant_id,
                user_id=row.user_id,
                created_at=row.created_at,
                resolved_at=row.resolved_at,
            )
            for row in rows
        ]
