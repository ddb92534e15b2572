"""The wallet on its own: keys, grants and what is left of them, receipts, updates, acks, batches,
and files that are not wallets."""

from __future__ import annotations

import asyncio
import sqlite3
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from phone_client.errors import PrerequisiteError, ReceiptRejectedError, TokenRejectedError, WalletError
from phone_client.wallet import GrantState, SessionState, Wallet
from protocol import cose, messages, tariff, testing, tokens
from protocol.errors import ErrorCode
from protocol.tokens import EndReason, EntryKind, LedgerEntry, SessionReceipt, TimeQuality

OPERATOR = testing.operator_key()
BOX_KEY = testing.ed25519_key("wallet box")
NOW = testing.SAMPLE_TIME
BOX_ID = testing.SAMPLE_BOX_ID


@pytest.fixture
async def wallet(tmp_path: Path) -> AsyncIterator[Wallet]:
    async with Wallet.open(tmp_path / "wallet.sqlite", clock=lambda: NOW) as opened:
        await opened.trust_operator_key(OPERATOR.public_key, source="test")
        yield opened


async def grant_for(
    wallet: Wallet, name: str, *, amount_fen: int = 500, box_id: str | None = BOX_ID, **extra: int
) -> bytes:
    key = await wallet.device_key()
    return testing.sample_grant(
        key, grant_id=testing.seed(name)[:8], amount_fen=amount_fen, box_id=box_id, **extra
    ).sign(OPERATOR)


def receipt(session_id: bytes, grant_ids: tuple[bytes, ...], *, energy_wh: int, balance_fen: int) -> bytes:
    body = SessionReceipt(
        session_id=session_id,
        grant_ids=grant_ids,
        outlet=2,
        start_time=NOW,
        end_time=NOW + 600,
        start_register_wh=1000,
        end_register_wh=1000 + energy_wh,
        energy_wh=energy_wh,
        tariff_version=1,
        price_fen_per_kwh=120,
        cost_fen=tariff.charged_cost_fen(energy_wh, 120, balance_fen),
        end_reason=EndReason.USER_STOP,
    )
    entry = LedgerEntry(
        box_id=BOX_ID,
        sequence=7,
        previous_hash=bytes(32),
        time=NOW + 600,
        time_quality=TimeQuality.SYNCED,
        kind=EntryKind.SESSION_ENDED,
        body=body,
    )
    return entry.sign(cose.SigningKey.from_private_key(BOX_KEY))


def started(session_id: bytes, *, balance_fen: int) -> messages.SessionStarted:
    return messages.SessionStarted(
        request_id=1,
        session_id=session_id,
        outlet=2,
        start_time=NOW,
        start_register_wh=1000,
        tariff_version=1,
        price_fen_per_kwh=120,
        balance_fen=balance_fen,
    )


async def test_the_device_key_is_made_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "wallet.sqlite"
    async with Wallet.open(path) as first:
        key = await first.device_public_key()
        assert await first.device_public_key() == key
    async with Wallet.open(path) as again:
        assert await again.device_public_key() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds a private key


async def test_opening_a_new_wallet_twice_at_once_makes_one_wallet_with_one_key(tmp_path: Path) -> None:
    """Two commands on one new wallet (the TUI reads a phone while it acts): one creates it."""
    path = tmp_path / "wallet.sqlite"

    async def open_and_read_key() -> bytes:
        async with Wallet.open(path) as wallet:
            return await wallet.device_public_key()

    keys = await asyncio.gather(*(open_and_read_key() for _ in range(4)))
    assert len(set(keys)) == 1


async def test_a_grant_is_kept_only_if_signed_and_bound_to_this_phone(wallet: Wallet) -> None:
    stored = await wallet.add_grant(await grant_for(wallet, "g1"))
    assert stored.state is GrantState.AVAILABLE
    assert stored.remaining_fen == 500
    assert (await wallet.add_grant(stored.signed)).grant_id == stored.grant_id  # again: no change
    assert len(await wallet.grants()) == 1

    someone_else = testing.sample_grant(Ed25519PrivateKey.generate(), grant_id=b"other-01").sign(OPERATOR)
    with pytest.raises(TokenRejectedError) as wrong_holder:
        await wallet.add_grant(someone_else)
    assert wrong_holder.value.code is ErrorCode.GRANT_WRONG_HOLDER

    forger = testing.operator_key("forger")
    forged = testing.sample_grant(await wallet.device_key(), grant_id=b"forged-1").sign(forger)
    with pytest.raises(TokenRejectedError) as unknown:
        await wallet.add_grant(forged)
    assert unknown.value.code is ErrorCode.TOKEN_UNKNOWN_KEY
    with pytest.raises(TokenRejectedError) as garbage:
        await wallet.add_grant(b"\x00garbage")
    assert garbage.value.code is ErrorCode.TOKEN_MALFORMED
    assert len(await wallet.grants()) == 1


async def test_no_operator_key_means_nothing_signed_is_accepted(tmp_path: Path) -> None:
    async with Wallet.open(tmp_path / "w.sqlite") as empty:
        signed = testing.sample_grant(await empty.device_key()).sign(OPERATOR)
        with pytest.raises(PrerequisiteError) as missing:
            await empty.add_grant(signed)
        assert missing.value.code is ErrorCode.TOKEN_UNKNOWN_KEY


async def test_grant_choice_skips_expired_revoked_and_other_boxes(wallet: Wallet) -> None:
    expired = await wallet.add_grant(await grant_for(wallet, "old", issued_at=NOW - 7200, expires_at=NOW - 1))
    other_box = await wallet.add_grant(await grant_for(wallet, "elsewhere", box_id="BOX-OTHER"))
    anywhere = await wallet.add_grant(await grant_for(wallet, "anywhere", box_id=None))
    here = await wallet.add_grant(await grant_for(wallet, "here"))
    assert [g.grant_id for g in await wallet.usable_grants(box_id=BOX_ID)] == [
        here.grant_id,
        anywhere.grant_id,
    ]
    assert expired.status(NOW) == "expired"
    assert [g.grant_id for g in await wallet.usable_grants(box_id="BOX-OTHER")] == [
        other_box.grant_id,
        anywhere.grant_id,
    ]

    revocations = tokens.RevocationList(version=3, issued_at=NOW, grant_ids=frozenset({here.grant_id}))
    assert await wallet.offer_update(revocations.sign(OPERATOR)) is not None
    assert (await wallet.choose_grant(box_id=BOX_ID)).grant_id == anywhere.grant_id
    # a grant named by the user goes to the box even if this phone thinks it is revoked
    assert (await wallet.choose_grant(box_id=BOX_ID, grant_prefix=here.grant_id.hex()[:6])).grant_id == (
        here.grant_id
    )

    await wallet.mark_grant_refused(anywhere.grant_id, ErrorCode.GRANT_REVOKED, box_id=BOX_ID)
    with pytest.raises(PrerequisiteError) as none_left:
        await wallet.choose_grant(box_id=BOX_ID)
    assert "no grant" in none_left.value.detail or none_left.value.wire_code is not None


async def test_a_grant_this_phone_spent_is_not_offered_to_another_box_even_when_named(wallet: Wallet) -> None:
    await wallet.remember_verified_box(testing.sample_certificate(BOX_KEY))
    grant = await wallet.add_grant(await grant_for(wallet, "once", box_id=None))
    await wallet.record_session_started(
        box_id=BOX_ID, started=started(b"session1", balance_fen=500), grant=grant
    )
    for box_id in (BOX_ID, "BOX-OTHER"):
        with pytest.raises(PrerequisiteError) as spent:
            await wallet.choose_grant(box_id=box_id, grant_prefix=grant.grant_id.hex()[:8])
        assert spent.value.code is ErrorCode.GRANT_SPENT
        assert BOX_ID in spent.value.detail
    assert (await wallet.find_grant(grant.grant_id.hex())).session_id == b"session1"  # nothing overwritten


async def test_a_grant_above_the_expected_price_is_not_chosen(wallet: Wallet) -> None:
    certificate = testing.sample_certificate(BOX_KEY)
    await wallet.remember_verified_box(certificate)
    await wallet.add_grant(await grant_for(wallet, "cheap", max_price_fen_per_kwh=100))
    table = tokens.TariffTable(
        version=2, issued_at=NOW, default_price_fen_per_kwh=90, region_prices=(("SH-01", 130),)
    )
    await wallet.offer_update(table.sign(OPERATOR))
    assert await wallet.expected_price(BOX_ID) == 130
    with pytest.raises(PrerequisiteError) as above:
        await wallet.choose_grant(box_id=BOX_ID)
    assert above.value.code is ErrorCode.GRANT_PRICE_ABOVE_LIMIT


async def test_a_session_charges_its_grants_in_order_and_the_receipt_closes_it(wallet: Wallet) -> None:
    await wallet.remember_verified_box(testing.sample_certificate(BOX_KEY))
    first = await wallet.add_grant(await grant_for(wallet, "first", amount_fen=500))
    second = await wallet.add_grant(await grant_for(wallet, "second", amount_fen=300))
    session_id = b"session1"
    await wallet.record_session_started(
        box_id=BOX_ID, started=started(session_id, balance_fen=500), grant=first
    )
    await wallet.record_top_up(box_id=BOX_ID, session_id=session_id, grant=second, balance_fen=800)
    reading = messages.MeterReading(
        session_id=session_id,
        time=NOW + 60,
        energy_wh=5000,
        power_w=2000,
        voltage_dv=2300,
        current_ma=8700,
        cost_fen=600,
        remaining_fen=200,
    )
    live = await wallet.record_reading(box_id=BOX_ID, reading=reading)
    assert live is not None
    assert live.remaining_fen == 200
    assert {g.grant_id: (g.state, g.remaining_fen) for g in await wallet.grants()} == {
        first.grant_id: (GrantState.IN_SESSION, 0),
        second.grant_id: (GrantState.IN_SESSION, 200),
    }

    signed = receipt(session_id, (first.grant_id, second.grant_id), energy_wh=5500, balance_fen=800)
    stored = await wallet.store_receipt(box_id=BOX_ID, session_id=session_id, signed=signed)
    assert stored.receipt.cost_fen == 660
    session = await wallet.session(BOX_ID, session_id)
    assert session is not None
    assert session.state is SessionState.ENDED
    assert session.end_reason is EndReason.USER_STOP
    assert {g.grant_id: (g.state, g.remaining_fen) for g in await wallet.grants()} == {
        first.grant_id: (GrantState.USED, 0),
        second.grant_id: (GrantState.USED, 140),
    }
    assert [r.receipt.session_id for r in await wallet.receipts()] == [session_id]

    # the server settles: its figures win
    await wallet.apply_server_grant(
        grant_id=second.grant_id, signed=second.signed, state="settled", charged_fen=160
    )
    settled = await wallet.grant(second.grant_id)
    assert settled is not None
    assert settled.state is GrantState.SETTLED
    assert settled.charged_fen == 160


async def test_a_receipt_must_verify_with_the_box_certificate(wallet: Wallet) -> None:
    await wallet.remember_verified_box(testing.sample_certificate(BOX_KEY))
    grant = await wallet.add_grant(await grant_for(wallet, "g"))
    session_id = b"session2"
    await wallet.record_session_started(
        box_id=BOX_ID, started=started(session_id, balance_fen=500), grant=grant
    )
    impostor = LedgerEntry.decode_unverified(
        receipt(session_id, (grant.grant_id,), energy_wh=10, balance_fen=500)
    )
    forged = impostor.sign(cose.SigningKey.from_private_key(testing.ed25519_key("impostor")))
    with pytest.raises(ReceiptRejectedError) as bad:
        await wallet.store_receipt(box_id=BOX_ID, session_id=session_id, signed=forged)
    assert bad.value.code is ErrorCode.TOKEN_UNKNOWN_KEY
    genuine = receipt(session_id, (grant.grant_id,), energy_wh=10, balance_fen=500)
    with pytest.raises(ReceiptRejectedError) as other_session:
        await wallet.store_receipt(box_id=BOX_ID, session_id=b"session9", signed=genuine)
    assert other_session.value.code is ErrorCode.SESSION_UNKNOWN
    session = await wallet.session(BOX_ID, session_id)
    assert session is not None
    assert session.state is SessionState.RUNNING
    assert await wallet.receipts() == []


async def test_a_session_that_ended_while_away_is_closed_from_the_box_list(wallet: Wallet) -> None:
    grant = await wallet.add_grant(await grant_for(wallet, "away"))
    session_id = b"session3"
    await wallet.record_session_started(
        box_id=BOX_ID, started=started(session_id, balance_fen=500), grant=grant
    )
    summary = messages.SessionSummary(
        session_id=session_id,
        outlet=2,
        start_time=NOW,
        energy_wh=2000,
        cost_fen=240,
        remaining_fen=260,
        running=False,
    )
    await wallet.record_session_list(box_id=BOX_ID, sessions=[summary])
    session = await wallet.session(BOX_ID, session_id)
    assert session is not None
    assert session.state is SessionState.ENDED_AWAY
    used = await wallet.grant(grant.grant_id)
    assert used is not None
    assert (used.state, used.remaining_fen) == (GrantState.USED, 260)


async def test_updates_and_acks_keep_only_the_newest(wallet: Wallet) -> None:
    newer = tokens.RevocationList(version=5, issued_at=NOW).sign(OPERATOR)
    older = tokens.RevocationList(version=4, issued_at=NOW).sign(OPERATOR)
    assert await wallet.offer_update(newer) is not None
    assert await wallet.offer_update(older) is None
    stored = await wallet.update(messages.UpdateKind.REVOCATION_LIST)
    assert stored is not None
    assert stored.version == 5
    table = tokens.TariffTable(version=1, issued_at=NOW, default_price_fen_per_kwh=120).sign(OPERATOR)
    assert await wallet.offer_update(table) is not None
    with pytest.raises(TokenRejectedError):
        await wallet.offer_update(
            tokens.RevocationList(version=9, issued_at=NOW).sign(testing.operator_key("x"))
        )

    def ack(sequence: int) -> bytes:
        return tokens.LedgerAck(box_id=BOX_ID, sequence=sequence, entry_hash=bytes(32), issued_at=NOW).sign(
            OPERATOR
        )

    assert await wallet.offer_ack(ack(10)) is not None
    assert await wallet.offer_ack(ack(8)) is None
    held = await wallet.ack_for(BOX_ID)
    assert held is not None
    assert held.sequence == 10
    assert not held.delivered
    await wallet.record_box_version(BOX_ID, messages.UpdateKind.LEDGER_ACK, 10)
    delivered = await wallet.ack_for(BOX_ID)
    assert delivered is not None
    assert delivered.delivered


async def test_carried_batches_are_kept_once_and_a_wider_one_replaces_a_narrower_one(wallet: Wallet) -> None:
    def batch(first: int, last: int, sealed: bytes) -> messages.LedgerEntries:
        return messages.LedgerEntries(
            request_id=1, box_id=BOX_ID, first_sequence=first, last_sequence=last, sealed_batch=sealed
        )

    assert await wallet.add_batch(batch(3, 3, b"")) is None  # nothing to carry
    assert await wallet.add_batch(batch(1, 5, b"sealed 1-5")) is not None
    assert await wallet.add_batch(batch(1, 5, b"sealed again")) is None
    wider = await wallet.add_batch(batch(1, 9, b"sealed 1-9"))
    assert wider is not None
    assert [(b.first_sequence, b.last_sequence) for b in await wallet.batches(pending_only=True)] == [(1, 9)]
    await wallet.mark_batch_uploaded(wider.batch_id)
    assert await wallet.batches(pending_only=True) == []
    assert len(await wallet.batches()) == 1


async def test_files_that_are_not_wallets_are_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(WalletError, match="directory"):
        async with Wallet.open(tmp_path):
            pass
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(WalletError, match="not a powerbox wallet"):
        async with Wallet.open(garbage):
            pass
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE t (x)")
    with pytest.raises(WalletError, match="another program"):
        async with Wallet.open(foreign):
            pass
    newer = tmp_path / "newer.sqlite"
    async with Wallet.open(newer):
        pass
    with sqlite3.connect(newer) as connection:
        connection.execute("PRAGMA user_version = 99")
    with pytest.raises(WalletError, match="newer powerbox"):
        async with Wallet.open(newer):
            pass
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with pytest.raises(WalletError, match="cannot use"):
        async with Wallet.open(blocked / "wallet.sqlite"):
            pass


async def test_a_failed_change_leaves_nothing_behind(wallet: Wallet) -> None:
    grant = await wallet.add_grant(await grant_for(wallet, "atomic"))
    session_id = b"session4"
    # a top-up for a session the wallet never saw fails before anything is written
    with pytest.raises(PrerequisiteError):
        await wallet.record_top_up(box_id=BOX_ID, session_id=session_id, grant=grant, balance_fen=1)
    unchanged = await wallet.grant(grant.grant_id)
    assert unchanged is not None
    assert unchanged.state is GrantState.AVAILABLE
    assert await wallet.sessions() == []
