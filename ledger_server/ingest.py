"""Ledger ingest: batches from a box's uplink or sealed batches carried by phones (DESIGN §6, S5).

Every entry is decoded and its signature checked against the box's registered key before anything
is stored (a large batch in worker processes, a small one on the event loop with the signature
checks on threads); a batch with one bad entry is refused whole. Stored entries
are keyed by (box, sequence), so the same entry arriving any number of times, from anywhere, in any
order, is stored once; a different entry for a stored place is a fork and becomes an anomaly.
Entries are then chained from the last contiguous one: whatever links on becomes contiguous (and
is acknowledged with a signed LedgerAck), whatever lies beyond a gap waits for it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import BrokenExecutor, Executor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from ledger_server import anomalies, settlement, verification
from ledger_server.anomalies import Anomaly, AnomalyKind
from ledger_server.context import ServerContext
from ledger_server.errors import ForbiddenError, LedgerRejectedError, ServerError, TooLargeError
from ledger_server.schema import box_ledgers, boxes, ledger_entries
from protocol import encoding, sealing
from protocol.errors import ErrorCode, TokenError
from protocol.tokens import LedgerAck, LedgerEntry

log = logging.getLogger(__name__)

_CHAIN_WALK = 5000  # entries read per step while walking the chain forward
_ENTRY_COLUMNS = (
    "box_id",
    "sequence",
    "entry_hash",
    "previous_hash",
    "time",
    "kind",
    "signed",
    "received_at",
)


class UnknownBoxError(ServerError):
    code = ErrorCode.LEDGER_UNKNOWN_BOX
    status = 422


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedEntry:
    """An entry of a batch, decoded and (once past `check`) signed by its box's key."""

    signed: bytes
    entry: LedgerEntry
    entry_hash: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchResult:
    box_id: str
    received: int
    stored: int  # new entries kept by this batch
    duplicates: int
    forks: int
    waiting: int  # entries of this box that wait beyond a gap, after this batch
    contiguous_sequence: int
    applied_sequence: int
    ack: bytes | None  # signed LedgerAck for `contiguous_sequence`


def open_sealed_batch(context: ServerContext, sealed: bytes) -> list[bytes]:
    """The signed entries inside a batch a phone carried (only the operator's key opens it, S9)."""
    try:
        plaintext = sealing.open_sealed(sealed, context.keys.encryption_keys)
        fields = encoding.Fields("sealed batch", error=TokenError, code=ErrorCode.TOKEN_MALFORMED)
        items = fields.array(encoding.decode(plaintext, error=TokenError, code=ErrorCode.TOKEN_MALFORMED))
        return [fields.bytes_(item, "entry", max_size=16384) for item in items]
    except TokenError as error:
        raise LedgerRejectedError(f"sealed batch refused: {error.detail}", code=error.code) from None


async def _box_keys(context: ServerContext, box_ids: set[str]) -> dict[str, bytes]:
    """Registered keys of these boxes (a box's key never changes, so each process remembers them)."""
    missing = box_ids - set(context.box_keys)
    if missing:
        async with context.database.connect() as connection:
            rows = await connection.execute(
                select(boxes.c.box_id, boxes.c.public_key).where(boxes.c.box_id.in_(missing))
            )
            context.box_keys.update((box_id, bytes(public_key)) for box_id, public_key in rows.all())
    return {box_id: context.box_keys[box_id] for box_id in box_ids if box_id in context.box_keys}


def _refuse_malformed(malformed: verification.Malformed) -> LedgerRejectedError:
    return LedgerRejectedError(f"entry {malformed.index}: {malformed.detail}", code=malformed.code)


async def _refuse_unknown(
    context: ServerContext, raw_entries: Sequence[bytes], entries: Sequence[LedgerEntry]
) -> None:
    """Boxes never provisioned: list them as anomalies and refuse the batch."""
    keys = await _box_keys(context, {entry.box_id for entry in entries})
    first_of: dict[str, bytes] = {}
    for signed, entry in zip(raw_entries, entries, strict=True):
        if entry.box_id not in keys:
            first_of.setdefault(entry.box_id, signed)
    if first_of:
        await anomalies.record_now(
            context,
            [
                Anomaly(
                    kind=AnomalyKind.UNKNOWN_BOX,
                    dedup_key=box_id,
                    detail=f"entries of {box_id}, which was never provisioned",
                    box_id=box_id,
                    evidence=signed,
                )
                for box_id, signed in sorted(first_of.items())
            ],
        )
        raise UnknownBoxError(f"unknown box {min(first_of)}; batch refused")


async def _refuse_forged(context: ServerContext, forged: ReceivedEntry) -> None:
    await anomalies.record_now(
        context,
        [
            Anomaly(
                kind=AnomalyKind.BAD_SIGNATURE,
                dedup_key=forged.entry_hash.hex(),
                detail=f"entry {forged.entry.sequence} is not signed by {forged.entry.box_id}'s key",
                box_id=forged.entry.box_id,
                sequence=forged.entry.sequence,
                evidence=forged.signed,
            )
        ],
    )
    raise LedgerRejectedError(
        f"entry {forged.entry.sequence} of {forged.entry.box_id}: bad signature; batch refused",
        code=ErrorCode.LEDGER_BAD_SIGNATURE,
    )


def _only(only_box: str | None, entries: Sequence[LedgerEntry]) -> None:
    if only_box is not None and any(entry.box_id != only_box for entry in entries):
        raise ForbiddenError("a box uploads its own entries only")


def _split(count: int, parts: int) -> list[range]:
    size = -(-count // max(1, parts))
    return [range(start, min(start + size, count)) for start in range(0, count, size)]


async def _check_here(
    context: ServerContext, raw_entries: Sequence[bytes], only_box: str | None
) -> list[ReceivedEntry]:
    """Decode on the event loop, verify on threads: for small batches."""
    parsed = verification.parse(raw_entries)
    if isinstance(parsed, verification.Malformed):
        raise _refuse_malformed(parsed)
    _only(only_box, [item.entry for item in parsed])
    await _refuse_unknown(context, raw_entries, [item.entry for item in parsed])
    keys = {box_id: Ed25519PublicKey.from_public_bytes(key) for box_id, key in context.box_keys.items()}
    loop = asyncio.get_running_loop()
    by_box: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(parsed):
        by_box[item.entry.box_id].append(index)
    for box_id, indices in sorted(by_box.items()):
        parts = _split(len(indices), min(context.config.verify_threads, len(indices) // 16))
        chunks = [[parsed[indices[i]] for i in part] for part in parts]
        failures = await asyncio.gather(
            *(
                loop.run_in_executor(context.verifier, verification.first_forged, c, keys[box_id])
                for c in chunks
            )
        )
        for part, failure in zip(parts, failures, strict=True):
            if failure is not None:
                index = indices[part[failure]]
                item = parsed[index]
                await _refuse_forged(
                    context,
                    ReceivedEntry(signed=raw_entries[index], entry=item.entry, entry_hash=item.entry_hash),
                )
    return [
        ReceivedEntry(signed=signed, entry=item.entry, entry_hash=item.entry_hash)
        for signed, item in zip(raw_entries, parsed, strict=True)
    ]


async def _check_in_processes(
    context: ServerContext, checkers: Executor, raw_entries: Sequence[bytes], only_box: str | None
) -> list[ReceivedEntry]:
    """Decode and verify in worker processes: for large batches (decoding is CPU-bound Python)."""
    if only_box is not None:
        keys = await _box_keys(context, {only_box})
    else:  # most carried batches hold one box: learn it from the first entry
        first = verification.parse(raw_entries[:1])
        keys = (
            {}
            if isinstance(first, verification.Malformed)
            else await _box_keys(context, {first[0].entry.box_id})
        )
    loop = asyncio.get_running_loop()

    async def check(indices: Sequence[int], keys: dict[str, bytes]) -> list[verification.CheckedBatch]:
        parts = _split(len(indices), context.config.verify_processes)
        return list(
            await asyncio.gather(
                *(
                    loop.run_in_executor(
                        checkers,
                        verification.check_batch,
                        [raw_entries[indices[i]] for i in part],
                        keys,
                        indices[part[0]],
                    )
                    for part in parts
                )
            )
        )

    everything = range(len(raw_entries))
    checked = await check(everything, keys)
    malformed = [c.malformed for c in checked if c.malformed is not None]
    if malformed:
        raise _refuse_malformed(min(malformed, key=lambda m: m.index))
    decoded = [pair for part in checked for pair in part.decoded]
    entries = [entry for entry, _ in decoded]
    _only(only_box, entries)
    missing = set().union(*(c.missing_keys for c in checked))
    forged = [c.forged for c in checked if c.forged is not None]
    if missing:
        await _refuse_unknown(context, raw_entries, entries)
        # Boxes known after all (not in this process's cache at first): check their entries now.
        others = [i for i in everything if entries[i].box_id in missing]
        forged += [
            c.forged for c in await check(others, await _box_keys(context, missing)) if c.forged is not None
        ]
    received = [
        ReceivedEntry(signed=signed, entry=entry, entry_hash=entry_hash)
        for signed, (entry, entry_hash) in zip(raw_entries, decoded, strict=True)
    ]
    if forged:
        await _refuse_forged(context, received[min(forged)])
    return received


async def check(
    context: ServerContext, raw_entries: Sequence[bytes], *, only_box: str | None
) -> list[ReceivedEntry]:
    """Every entry decoded and signed by its (provisioned) box, or the whole batch refused."""
    if len(raw_entries) > context.config.max_batch_entries:
        raise TooLargeError(f"at most {context.config.max_batch_entries} entries per batch")
    if context.checkers is not None and len(raw_entries) >= context.config.process_batch_threshold:
        try:
            return await _check_in_processes(context, context.checkers, raw_entries, only_box)
        except BrokenExecutor:
            log.exception("the checking processes are gone; checking here instead")
    return await _check_here(context, raw_entries, only_box)


def group_by_box(entries: Sequence[ReceivedEntry]) -> dict[str, list[ReceivedEntry]]:
    grouped: dict[str, list[ReceivedEntry]] = defaultdict(list)
    for received in entries:
        grouped[received.entry.box_id].append(received)
    return dict(grouped)


async def ingest(
    context: ServerContext, raw_entries: Sequence[bytes], *, only_box: str | None = None
) -> list[BatchResult]:
    """Verify, store and chain a batch; then settle what became contiguous (when configured to).

    `only_box`: the batch came over that box's own uplink, and may hold nothing else.
    """
    grouped = group_by_box(await check(context, raw_entries, only_box=only_box))
    results = []
    for box_id, entries in sorted(grouped.items()):
        result = await _store_and_chain(context, box_id, entries)
        if context.config.settle_after_ingest and result.contiguous_sequence > result.applied_sequence:
            try:
                await settlement.settle_box(
                    context, box_id, known={r.entry.sequence: r.entry for r in entries}
                )
                # settle_box stops only when nothing contiguous is left unapplied.
                result = dataclasses.replace(result, applied_sequence=result.contiguous_sequence)
            except ServerError:
                # Stored and acknowledged already; the reconcile job settles what is left.
                log.exception("settling %s after ingest failed", box_id)
        results.append(result)
    return results


async def ingest_sealed(context: ServerContext, sealed: bytes) -> list[BatchResult]:
    return await ingest(context, open_sealed_batch(context, sealed))


async def _store_and_chain(
    context: ServerContext, box_id: str, entries: Sequence[ReceivedEntry]
) -> BatchResult:
    now = context.clock()

    async def work(connection: AsyncConnection) -> BatchResult:
        state = (
            await connection.execute(
                select(box_ledgers).where(box_ledgers.c.box_id == box_id).with_for_update()
            )
        ).one()
        sequences = sorted({received.entry.sequence for received in entries})
        stored: dict[int, bytes] = {
            sequence: bytes(entry_hash)
            for sequence, entry_hash in await context.database.fetch_in(
                connection,
                "SELECT sequence, entry_hash FROM ledger_entries WHERE box_id = ? AND sequence IN ({})",
                sequences,
                before=(box_id,),
            )
        }
        new_rows: list[tuple[object, ...]] = []
        links: dict[int, tuple[bytes, bytes]] = {}  # what this batch stores: sequence -> (previous, own) hash
        duplicates = forks = 0
        found: list[Anomaly] = []
        for received in entries:
            sequence = received.entry.sequence
            known = stored.get(sequence)
            if known is None:
                stored[sequence] = received.entry_hash
                links[sequence] = (received.entry.previous_hash, received.entry_hash)
                new_rows.append(
                    (
                        box_id,
                        sequence,
                        received.entry_hash,
                        received.entry.previous_hash,
                        received.entry.time,
                        int(received.entry.kind),
                        received.signed,
                        now,
                    )
                )
            elif known == received.entry_hash:
                duplicates += 1
            else:
                forks += 1
                found.append(
                    Anomaly(
                        kind=AnomalyKind.FORK,
                        dedup_key=f"{box_id}:{sequence}:{received.entry_hash.hex()}",
                        detail=f"{box_id} signed two different entries {sequence}",
                        box_id=box_id,
                        sequence=sequence,
                        evidence=received.signed,
                    )
                )
        await context.database.insert_many(
            connection, ledger_entries, _ENTRY_COLUMNS, new_rows, ignore_conflicts=True
        )
        contiguous, contiguous_hash = await _walk_chain(
            connection, box_id, state.contiguous_sequence, state.contiguous_hash, found, links
        )
        ack = state.ack
        if contiguous > state.contiguous_sequence:
            ack = LedgerAck(
                box_id=box_id, sequence=contiguous, entry_hash=contiguous_hash, issued_at=now
            ).sign(context.keys.signer)
            await connection.execute(
                update(box_ledgers)
                .where(box_ledgers.c.box_id == box_id)
                .values(contiguous_sequence=contiguous, contiguous_hash=contiguous_hash, ack=ack)
            )
            await anomalies.resolve_gaps(connection, box_id, contiguous, now)
        waiting = (
            await connection.execute(
                select(func.count())
                .select_from(ledger_entries)
                .where(ledger_entries.c.box_id == box_id, ledger_entries.c.sequence > contiguous)
            )
        ).scalar_one()
        await anomalies.record(context.database, connection, found, now)
        return BatchResult(
            box_id=box_id,
            received=len(entries),
            stored=len(new_rows),
            duplicates=duplicates,
            forks=forks,
            waiting=int(waiting),
            contiguous_sequence=contiguous,
            applied_sequence=state.applied_sequence,
            ack=ack,
        )

    result = await context.database.transaction(work)
    if result.contiguous_sequence:
        context.changes.notify()  # a long-polling box may be waiting for this ack
    return result


def _broken_link(box_id: str, sequence: int) -> Anomaly:
    return Anomaly(
        kind=AnomalyKind.FORK,
        dedup_key=f"{box_id}:{sequence}:link",
        detail=f"entry {sequence} of {box_id} does not link to entry {sequence - 1}",
        box_id=box_id,
        sequence=sequence,
    )


async def _walk_chain(
    connection: AsyncConnection,
    box_id: str,
    sequence: int,
    entry_hash: bytes,
    found: list[Anomaly],
    just_stored: dict[int, tuple[bytes, bytes]],
) -> tuple[int, bytes]:
    """Advance from the last contiguous entry while the next one is stored and links to it.

    `just_stored` (sequence -> previous hash, hash) is walked in memory first; the database is read
    for what earlier batches left waiting."""
    while True:
        while sequence + 1 in just_stored:
            previous_hash, next_hash = just_stored[sequence + 1]
            if previous_hash != entry_hash:
                found.append(_broken_link(box_id, sequence + 1))
                return sequence, entry_hash
            sequence, entry_hash = sequence + 1, next_hash
        rows = (
            await connection.execute(
                select(ledger_entries.c.sequence, ledger_entries.c.previous_hash, ledger_entries.c.entry_hash)
                .where(ledger_entries.c.box_id == box_id, ledger_entries.c.sequence > sequence)
                .order_by(ledger_entries.c.sequence)
                .limit(_CHAIN_WALK)
            )
        ).all()
        for next_sequence, previous_hash, next_hash in rows:
            if next_sequence != sequence + 1:
                return sequence, entry_hash  # a gap: the rest waits
            if previous_hash != entry_hash:
                found.append(_broken_link(box_id, next_sequence))
                return sequence, entry_hash
            sequence, entry_hash = next_sequence, next_hash
        if len(rows) < _CHAIN_WALK and sequence + 1 not in just_stored:
            return sequence, entry_hash


async def ledger_state(context: ServerContext, box_id: str) -> BatchResult:
    """Where a box's ledger stands, as a result with nothing received (for the uplink and operators)."""
    async with context.database.connect() as connection:
        state = (await connection.execute(select(box_ledgers).where(box_ledgers.c.box_id == box_id))).first()
        if state is None:
            raise UnknownBoxError(f"unknown box {box_id}")
        waiting = (
            await connection.execute(
                select(func.count())
                .select_from(ledger_entries)
                .where(
                    ledger_entries.c.box_id == box_id, ledger_entries.c.sequence > state.contiguous_sequence
                )
            )
        ).scalar_one()
    return BatchResult(
        box_id=box_id,
        received=0,
        stored=0,
        duplicates=0,
        forks=0,
        waiting=int(waiting),
        contiguous_sequence=state.contiguous_sequence,
        applied_sequence=state.applied_sequence,
        ack=state.ack,
    )
