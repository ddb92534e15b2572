"""The box's own decisions: start per S1 and interlocks, fee control, every way a session ends."""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from box_peripheral.controller import BoxPolicy
from box_peripheral.hardware.memory import MemoryHardware
from protocol import cose, messages, sealing, tariff, tokens
from protocol.errors import ErrorCode
from protocol.tokens import Door, EndReason, EntryKind, TimeQuality
from testbench.box_rig import BOX_KEY, OPERATOR, START_TIME, box_rig, operator_encryption_keys

PRICE = 120  # the box's default tariff, fen per kWh


def receipt_of(ended: messages.Message) -> tokens.SessionReceipt:
    assert isinstance(ended, messages.SessionEnded)
    entry = tokens.LedgerEntry.verify(ended.receipt, cose.key_ring(BOX_KEY.public_key()))
    assert isinstance(entry.body, tokens.SessionReceipt)
    return entry.body


async def ledger_kinds(rig_store: object) -> list[EntryKind]:
    from box_peripheral.store import BoxStore

    assert isinstance(rig_store, BoxStore)
    ring = cose.key_ring(BOX_KEY.public_key())
    return [tokens.LedgerEntry.verify(e, ring).kind for e in await rig_store.entries()]


async def test_start_unlocks_the_door_closes_the_breaker_and_streams_readings(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        phone = rig.phone()
        started = await rig.start(phone, outlet=2)
        assert started.balance_fen == 500
        assert await hw.breaker_closed(2)
        assert hw.lock_pulses(Door.OUTLET, 2) == 1
        hw.set_load(2, 2000)
        await rig.run_for(90_000)
        reading = phone.last(messages.MeterReading)
        assert isinstance(reading, messages.MeterReading)
        assert reading.power_w == 2000
        assert 40 <= reading.energy_wh <= 50  # 2 kW for 90 s is 50 Wh; the register counts in 10 Wh
        assert reading.cost_fen == tariff.session_cost_fen(reading.energy_wh, PRICE)
        assert reading.remaining_fen == 500 - reading.cost_fen


@pytest.mark.parametrize("watts", [100, 1000, 3500])
async def test_the_breaker_trips_before_the_balance_is_exceeded(tmp_path: Path, watts: int) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        phone = rig.phone()
        started = await rig.start(phone, outlet=1, amount_fen=6)  # 6 fen buys 58 Wh at 120 fen/kWh
        affordable_wh = tariff.energy_affordable_wh(6, PRICE)
        assert affordable_wh == 58
        hw.set_load(1, watts)
        await rig.run_for(58 * 3_600_000 // watts + 5_000)
        receipt = receipt_of(phone.last(messages.SessionEnded))
        assert receipt.end_reason is EndReason.BALANCE_EXHAUSTED
        assert receipt.cost_fen <= 6
        assert not await hw.breaker_closed(1)
        delivered_mwh = hw.delivered_mwh(1)
        assert delivered_mwh <= affordable_wh * 1000 + 1000  # at most 1 Wh given away
        assert delivered_mwh >= (affordable_wh - 1) * 1000  # and the user got what was paid for
        assert receipt.session_id == started.session_id


async def test_a_top_up_extends_a_running_session(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        phone = rig.phone()
        started = await rig.start(phone, amount_fen=6)
        hw.set_load(1, 3000)
        await rig.run_for(30_000)
        await rig.request(
            phone,
            messages.TopUp(
                request_id=phone.session.new_request_id(),
                session_id=started.session_id,
                grant=rig.grant(phone, amount_fen=12),
            ),
        )
        topped = phone.last(messages.ToppedUp)
        assert isinstance(topped, messages.ToppedUp)
        assert topped.balance_fen == 18  # 158 Wh: 190 s at 3 kW in all
        await rig.run_for(200_000)
        receipt = receipt_of(phone.last(messages.SessionEnded))
        assert receipt.end_reason is EndReason.BALANCE_EXHAUSTED
        assert len(receipt.grant_ids) == 2
        assert hw.delivered_mwh(1) <= (tariff.energy_affordable_wh(18, PRICE) or 0) * 1000 + 1000


async def test_user_stop_gives_a_signed_receipt(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        phone = rig.phone()
        started = await rig.start(phone)
        hw.set_load(1, 1000)
        await rig.run_for(36_000)
        await rig.request(
            phone,
            messages.StopSession(request_id=phone.session.new_request_id(), session_id=started.session_id),
        )
        receipt = receipt_of(phone.last(messages.SessionEnded))
        assert receipt.end_reason is EndReason.USER_STOP
        assert receipt.energy_wh == receipt.end_register_wh - receipt.start_register_wh
        assert receipt.cost_fen == tariff.session_cost_fen(receipt.energy_wh, PRICE)
        assert not await hw.breaker_closed(1)
        # the owner may still open the outlet door to unplug
        await rig.request(
            phone,
            messages.OpenOutletDoor(request_id=phone.session.new_request_id(), session_id=started.session_id),
        )
        assert isinstance(phone.last(messages.DoorOpened), messages.DoorOpened)
        assert hw.lock_pulses(Door.OUTLET, 1) == 2


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        ("overload", EndReason.OVERLOAD),
        ("tamper", EndReason.TAMPER),
        ("idle", EndReason.IDLE),
        ("meter timeout", EndReason.FAULT),
        ("register backwards", EndReason.FAULT),
        ("bus down", EndReason.FAULT),
    ],
)
async def test_every_way_a_session_ends_on_its_own(tmp_path: Path, setup: str, reason: EndReason) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        phone = rig.phone()
        await rig.start(phone, outlet=3)
        hw.set_load(3, 500)
        await rig.run_for(120_000)  # 16 Wh: the register shows 10
        match setup:
            case "overload":
                hw.set_load(3, 5000)  # rated 3500 W
            case "tamper":
                hw.open_door(Door.METERING_BOX, 0)
            case "idle":
                hw.unplug(3)
                await rig.run_for(60_000)
            case "meter timeout":
                hw.fail_next_read(3, ErrorCode.METER_TIMEOUT)
            case "register backwards":
                hw.jump_energy_backwards(3, 20)
            case "bus down":
                hw.set_bus_down(True)
        await rig.run_for(2_000)
        hw.clear_faults()
        await rig.run_for(1_000)  # a breaker the dead bus kept closed is opened once it answers
        receipt = receipt_of(phone.last(messages.SessionEnded))
        assert receipt.end_reason is reason
        assert not await hw.breaker_closed(3)
        kinds = await ledger_kinds(rig.controller.store)
        if reason is EndReason.TAMPER:
            assert EntryKind.TAMPER in kinds
        if reason is EndReason.FAULT:
            assert EntryKind.FAULT in kinds
        assert kinds.count(EntryKind.SESSION_ENDED) == 1


async def test_the_grant_maximum_length_ends_a_session(tmp_path: Path) -> None:
    # poll once a minute here: twelve hours of one-second polls would only slow the test
    async with box_rig(
        tmp_path / "box.sqlite", hardware=(hw := MemoryHardware()), policy=BoxPolicy(poll_interval_ms=60_000)
    ) as rig:
        phone = rig.phone()
        await rig.start(phone)
        hw.set_load(1, 10)  # 10 W: the balance lasts far longer than 12 hours
        await rig.run_for(12 * 3600 * 1000 + 2000)
        assert receipt_of(phone.last(messages.SessionEnded)).end_reason is EndReason.MAX_DURATION


async def test_no_power_while_the_metering_box_door_is_open(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        hw.open_door(Door.METERING_BOX, 0)
        phone = rig.phone()
        phone.session.send(messages.StartSession(request_id=7, outlet=1, grant=rig.grant(phone)))
        await rig.pump()
        assert phone.errors() == [ErrorCode.METERING_DOOR_OPEN]
        assert not await hw.breaker_closed(1)


async def test_busy_and_unknown_outlets_and_spent_grants_are_refused(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite") as rig:
        first, second = rig.phone(), rig.phone()
        await rig.start(first, outlet=1)
        grant = rig.grant(second)
        for request_id, outlet in ((1, 1), (2, 9)):
            second.session.send(messages.StartSession(request_id=request_id, outlet=outlet, grant=grant))
        await rig.pump()
        assert second.errors() == [ErrorCode.OUTLET_BUSY, ErrorCode.OUTLET_UNKNOWN]
        second.session.send(messages.StartSession(request_id=3, outlet=2, grant=grant))
        second.session.send(messages.StartSession(request_id=4, outlet=3, grant=grant))
        await rig.pump()
        assert second.errors()[-1] == ErrorCode.GRANT_SPENT


async def test_a_phone_that_walked_away_sees_its_session_again(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        phone = rig.phone()
        started = await rig.start(phone)
        hw.set_load(1, 1500)
        rig.phones.remove(phone)  # out of range
        rig.controller.connections.forget(phone.session.connection_id)
        await rig.run_for(60_000)
        back = rig.phone(phone.key)
        await rig.request(back, messages.ListSessions(request_id=back.session.new_request_id()))
        listing = back.last(messages.SessionList)
        assert isinstance(listing, messages.SessionList)
        assert [s.session_id for s in listing.sessions] == [started.session_id]
        assert listing.sessions[0].running
        await rig.run_for(2_000)
        assert back.received(messages.MeterReading)  # live readings follow the phone
        stranger = rig.phone()
        await rig.request(stranger, messages.StopSession(request_id=1, session_id=started.session_id))
        assert stranger.errors() == [ErrorCode.SESSION_NOT_OWNER]


async def test_a_phone_that_was_away_gets_the_receipt_when_it_lists_its_sessions(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        phone = rig.phone()
        started = await rig.start(phone)
        hw.set_load(1, 1500)
        rig.phones.remove(phone)  # out of range
        rig.controller.connections.forget(phone.session.connection_id)
        await rig.run_for(30_000)
        assert await rig.controller.remote_stop(session_id=started.session_id)
        # the operator's ack prunes the ledger: the receipt must outlive it
        entries = await rig.controller.store.entries()
        last = tokens.LedgerEntry.decode_unverified(entries[-1])
        ack = tokens.LedgerAck(
            box_id=rig.controller.box_id,
            sequence=last.sequence,
            entry_hash=tokens.entry_hash(entries[-1]),
            issued_at=START_TIME + 60,
        )
        mule = rig.phone()
        await rig.request(mule, messages.PushLedgerAck(request_id=1, ledger_ack=ack.sign(OPERATOR)))
        assert isinstance(mule.last(messages.UpdateAccepted), messages.UpdateAccepted)
        assert len(await rig.controller.store.entries()) < len(entries)
        back = rig.phone(phone.key)
        await rig.request(back, messages.ListSessions(request_id=back.session.new_request_id()))
        listing = back.last(messages.SessionList)
        assert isinstance(listing, messages.SessionList)
        assert [(s.session_id, s.running) for s in listing.sessions] == [(started.session_id, False)]
        ended = back.last(messages.SessionEnded)
        assert isinstance(ended, messages.SessionEnded)
        assert ended.request_id == 0
        assert ended.end_reason is EndReason.REMOTE_STOP
        receipt = tokens.LedgerEntry.verify(ended.receipt, cose.key_ring(BOX_KEY.public_key())).body
        assert isinstance(receipt, tokens.SessionReceipt)
        assert receipt.session_id == started.session_id
        assert receipt.cost_fen == listing.sessions[0].cost_fen
        assert receipt.energy_wh == listing.sessions[0].energy_wh > 0


async def test_a_restart_closes_the_interrupted_session_once_from_its_last_reading(tmp_path: Path) -> None:
    database = tmp_path / "box.sqlite"
    hardware = MemoryHardware(outlets=(1, 2, 3, 4))
    clock = [START_TIME * 1000, 0]
    async with box_rig(database, hardware=hardware, clock=clock) as rig:
        phone = rig.phone()
        await rig.start(phone)
        hardware.set_load(1, 2000)
        await rig.run_for(36_000)
        persisted = (await rig.controller.store.running_sessions())[0]
    hardware.advance(10_000)  # the box is down, the breaker still closed
    for restart in range(2):
        async with box_rig(database, hardware=hardware, clock=clock) as rig:
            ring = cose.key_ring(BOX_KEY.public_key())
            entries = [tokens.LedgerEntry.verify(e, ring) for e in await rig.controller.store.entries()]
            ended = [e.body for e in entries if e.kind is EntryKind.SESSION_ENDED]
            assert len(ended) == 1, f"restart {restart}"
            receipt = ended[0]
            assert isinstance(receipt, tokens.SessionReceipt)
            assert receipt.end_reason is EndReason.POWER_LOSS
            assert receipt.end_register_wh == persisted.last_register_wh
            assert receipt.end_time == persisted.last_reading_time  # when power was last seen
            assert not await hardware.breaker_closed(1)
            assert [e.kind for e in entries].count(EntryKind.BOOT) == restart + 2
            # the ledger stays in time order (the receipt's entry is stamped after the boot) and the
            # operator time the box saw before the crash still counts: no clock anomaly at the server
            times = [e.time for e in entries]
            assert times == sorted(times)
            closed = next(e for e in entries if e.kind is EntryKind.SESSION_ENDED)
            assert closed.time_quality is TimeQuality.SYNCED


async def test_entries_handed_to_a_mule_open_only_for_the_operator(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite") as rig:
        phone = rig.phone()
        started = await rig.start(phone)
        await rig.request(phone, messages.StopSession(request_id=2, session_id=started.session_id))
        await rig.request(phone, messages.RequestLedgerEntries(request_id=3, max_entries=100))
        batch = phone.last(messages.LedgerEntries)
        assert isinstance(batch, messages.LedgerEntries)
        entries = cbor2.loads(sealing.open_sealed(batch.sealed_batch, operator_encryption_keys()))
        ring = cose.key_ring(BOX_KEY.public_key())
        sequences = [tokens.LedgerEntry.verify(e, ring).sequence for e in entries]
        assert sequences == list(range(batch.first_sequence, batch.last_sequence + 1))
        assert b"grant" not in batch.sealed_batch
        # the operator's ack, relayed by the phone, prunes what it covers
        last_hash = tokens.entry_hash(entries[-1])
        ack = tokens.LedgerAck(
            box_id=rig.controller.box_id,
            sequence=batch.last_sequence,
            entry_hash=last_hash,
            issued_at=START_TIME + 60,
        )
        await rig.request(phone, messages.PushLedgerAck(request_id=4, ledger_ack=ack.sign(OPERATOR)))
        accepted = phone.last(messages.UpdateAccepted)
        assert isinstance(accepted, messages.UpdateAccepted)
        assert accepted.version == batch.last_sequence
        await rig.request(phone, messages.RequestLedgerEntries(request_id=5, max_entries=100))
        after = phone.last(messages.LedgerEntries)
        assert isinstance(after, messages.LedgerEntries)
        assert after.first_sequence == batch.last_sequence + 1  # only what the ack did not cover


async def test_newer_tariff_applies_to_new_sessions_and_older_versions_are_refused(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite") as rig:
        phone = rig.phone()
        table = tokens.TariffTable(version=5, issued_at=START_TIME, default_price_fen_per_kwh=100)
        await rig.request(phone, messages.PushTariffTable(request_id=1, tariff_table=table.sign(OPERATOR)))
        older = tokens.TariffTable(version=4, issued_at=START_TIME, default_price_fen_per_kwh=90)
        await rig.request(phone, messages.PushTariffTable(request_id=2, tariff_table=older.sign(OPERATOR)))
        assert phone.errors() == [ErrorCode.STALE_VERSION]
        started = await rig.start(phone)
        assert (started.tariff_version, started.price_fen_per_kwh) == (5, 100)


async def test_a_technician_token_opens_the_metering_box_only_when_no_session_runs(tmp_path: Path) -> None:
    async with box_rig(tmp_path / "box.sqlite", hardware=(hw := MemoryHardware())) as rig:
        technician = rig.phone()
        token = tokens.UnlockToken(
            token_id=b"unlock-9",
            holder_id=3,
            box_id=rig.controller.box_id,
            holder_key=technician.key.public_key(),
            door=Door.METERING_BOX,
            outlet=0,
            not_before=START_TIME - 60,
            expires_at=START_TIME + 3600,
            issued_at=START_TIME - 60,
        ).sign(OPERATOR)
        user = rig.phone()
        await rig.start(user)
        await rig.request(technician, messages.OpenDoorWithToken(request_id=1, unlock_token=token))
        assert technician.errors() == [ErrorCode.BOX_BUSY]
        await rig.controller.remote_stop(outlet=1)
        await rig.request(technician, messages.OpenDoorWithToken(request_id=2, unlock_token=token))
        assert isinstance(technician.last(messages.DoorOpened), messages.DoorOpened)
        assert hw.lock_pulses(Door.METERING_BOX, 0) == 1
        assert receipt_of(user.last(messages.SessionEnded)).end_reason is EndReason.REMOTE_STOP


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    garbage=st.lists(
        st.one_of(
            st.binary(max_size=60),
            # well-framed messages with nonsense inside, for a known and an unknown connection
            st.builds(
                lambda body: b"\x12\x34\xc0" + len(body).to_bytes(2, "big") + body, st.binary(max_size=50)
            ),
        ),
        max_size=12,
    )
)
async def test_garbage_from_the_radio_changes_nothing_and_the_box_keeps_serving(
    tmp_path_factory: pytest.TempPathFactory, garbage: list[bytes]
) -> None:
    async with box_rig(
        tmp_path_factory.mktemp("garbage") / "box.sqlite", hardware=(hw := MemoryHardware())
    ) as rig:
        for fragment in garbage:
            await rig.controller.on_write(fragment)
        assert not any([await hw.breaker_closed(outlet) for outlet in (1, 2, 3, 4)])
        assert not await rig.controller.store.running_sessions()
        started = await rig.start(rig.phone())  # a real phone is still served
        assert started.outlet == 1
