"""The box store: one transaction per fact, a verifiable chain, exactly-once session ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from box_peripheral.store import BoxStore, StoredSession, StoreError
from protocol import cose, testing, tokens
from protocol.errors import ErrorCode
from protocol.tokens import EndReason, EntryKind, TimeQuality

BOX_KEY = cose.SigningKey.from_private_key(testing.ed25519_key("box"))
OPERATOR = testing.operator_key()
Q = TimeQuality.SYNCED


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[BoxStore]:
    async with BoxStore.open(
        tmp_path / "box.sqlite", box_id=testing.SAMPLE_BOX_ID, box_key=BOX_KEY
    ) as opened:
        yield opened


def running(session_id: bytes = b"session1", *, outlet: int = 1, grant: bytes = b"grant-01") -> StoredSession:
    return StoredSession(
        session_id=session_id,
        outlet=outlet,
        owner_key=bytes(32),
        user_id=7,
        grant_ids=(grant,),
        grant_amounts_fen=(500,),
        balance_fen=500,
        max_end_time=10_000,
        start_time=1000,
        start_register_wh=100,
        last_register_wh=100,
        last_reading_time=1000,
        last_load_time=1000,
        tariff_version=1,
        price_fen_per_kwh=120,
        end_time=None,
        end_reason=None,
    )


def started_body(session: StoredSession) -> tokens.SessionStartedBody:
    return tokens.SessionStartedBody(
        session_id=session.session_id,
        outlet=session.outlet,
        grant_id=session.grant_ids[0],
        user_id=7,
        phone_key=bytes(32),
        start_time=1000,
        start_register_wh=100,
        tariff_version=1,
        price_fen_per_kwh=120,
        amount_fen=500,
    )


def receipt(session: StoredSession, *, end_register: int = 150) -> tokens.SessionReceipt:
    return tokens.SessionReceipt(
        session_id=session.session_id,
        grant_ids=session.grant_ids,
        outlet=session.outlet,
        start_time=1000,
        end_time=2000,
        start_register_wh=100,
        end_register_wh=end_register,
        energy_wh=end_register - 100,
        tariff_version=1,
        price_fen_per_kwh=120,
        cost_fen=6,
        end_reason=EndReason.USER_STOP,
    )


def verify_chain(
    entries: list[bytes], *, first_previous: bytes | None = tokens.GENESIS_HASH
) -> list[tokens.LedgerEntry]:
    ring = cose.key_ring(BOX_KEY.public_key)
    previous = first_previous
    decoded = []
    for signed in entries:
        entry = tokens.LedgerEntry.verify(signed, ring)
        if previous is not None:
            assert entry.previous_hash == previous
        previous = tokens.entry_hash(signed)
        decoded.append(entry)
    return decoded


async def test_a_session_start_spends_the_grant_and_logs_it_in_one_go(store: BoxStore) -> None:
    session = running()
    await store.start_session(session, started_body(session), quality=Q)
    assert await store.is_spent(b"grant-01")
    assert [s.session_id for s in await store.running_sessions()] == [b"session1"]
    again = running(b"session2", outlet=2)
    with pytest.raises(StoreError) as excinfo:
        await store.start_session(again, started_body(again), quality=Q)  # same grant
    assert excinfo.value.code == ErrorCode.GRANT_SPENT
    busy = running(b"session3", grant=b"grant-03")  # outlet 1 still running
    with pytest.raises(StoreError):
        await store.start_session(busy, started_body(busy), quality=Q)
    assert [e.kind for e in verify_chain(await store.entries())] == [EntryKind.SESSION_STARTED]


async def test_top_up_and_end_exactly_once(store: BoxStore) -> None:
    session = running()
    await store.start_session(session, started_body(session), quality=Q)
    updated = await store.top_up(b"session1", b"grant-02", 300, time=1500, quality=Q)
    assert (updated.balance_fen, updated.grant_ids, updated.grant_amounts_fen) == (
        800,
        (b"grant-01", b"grant-02"),
        (500, 300),
    )
    await store.record_reading(b"session1", register_wh=140, time=1600, had_load=True)
    assert (await store.running_sessions())[0].last_register_wh == 140
    first = await store.end_session(b"session1", receipt(updated), quality=Q)
    second = await store.end_session(b"session1", receipt(updated), quality=Q)
    assert first is not None
    assert second is None
    assert not await store.running_sessions()
    kinds = [e.kind for e in verify_chain(await store.entries())]
    assert kinds == [EntryKind.SESSION_STARTED, EntryKind.SESSION_TOPPED_UP, EntryKind.SESSION_ENDED]


async def test_an_ack_prunes_what_it_covers_and_keeps_the_chain_anchored(store: BoxStore) -> None:
    for i in range(5):
        await store.append(
            kind=EntryKind.BOOT, body=tokens.BootBody(software_version=f"v{i}"), time=1000 + i, quality=Q
        )
    third = await store.entry_hash_at(3)
    assert third is not None
    ack = tokens.LedgerAck(box_id=testing.SAMPLE_BOX_ID, sequence=3, entry_hash=third, issued_at=2000)
    assert await store.apply_ack(ack, ack.sign(OPERATOR), time=2000, quality=Q)
    assert await store.acked_sequence() == 3
    remaining = verify_chain(await store.entries(), first_previous=None)
    assert [e.sequence for e in remaining] == [3, 4, 5, 6]
    assert remaining[-1].kind is EntryKind.ACK_RECEIVED
    stale = tokens.LedgerAck(box_id=testing.SAMPLE_BOX_ID, sequence=2, entry_hash=bytes(32), issued_at=2001)
    assert not await store.apply_ack(stale, stale.sign(OPERATOR), time=2001, quality=Q)
    forked = tokens.LedgerAck(box_id=testing.SAMPLE_BOX_ID, sequence=5, entry_hash=bytes(32), issued_at=2002)
    with pytest.raises(StoreError) as excinfo:
        await store.apply_ack(forked, forked.sign(OPERATOR), time=2002, quality=Q)
    assert excinfo.value.code == ErrorCode.LEDGER_FORK
    assert await store.acked_sequence() == 3


async def test_committed_entries_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "box.sqlite"
    async with BoxStore.open(path, box_id=testing.SAMPLE_BOX_ID, box_key=BOX_KEY) as first:
        await first.append(kind=EntryKind.BOOT, body=tokens.BootBody(software_version="a"), time=1, quality=Q)
    async with BoxStore.open(path, box_id=testing.SAMPLE_BOX_ID, box_key=BOX_KEY) as second:
        await second.append(
            kind=EntryKind.BOOT, body=tokens.BootBody(software_version="b"), time=2, quality=Q
        )
        assert [e.sequence for e in verify_chain(await second.entries())] == [1, 2]
