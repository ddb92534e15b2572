"""The phone library at a real box daemon over the virtual radio, with no server anywhere:
start, live readings, top-up, stop with a verified receipt, walking away and coming back, and
the boxes and grants it must refuse or see refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from phone_client.at_box import BoxVisit, LiveEvent, LiveReading, SessionClosed, label_for_session
from phone_client.errors import BoxNotTrustedError, BoxRefusedError
from phone_client.wallet import GrantState, SessionState, Wallet
from protocol import cose, gatt, testing, tokens
from protocol.errors import ErrorCode
from protocol.tokens import EndReason
from testbench.bluez import BleNode
from testbench.testbed import BleTestbed
from tests.phone_client.conftest import (
    OPERATOR,
    TIMEOUT,
    BoxOnRadio,
    now,
    signed_grant,
    start_box,
)

pytestmark = pytest.mark.timeout(120)


async def reading_with(visit: BoxVisit, power_w: int) -> LiveReading:
    """The first live reading showing `power_w` (the plant's load reaches the meter within a poll)."""
    while True:
        event: LiveEvent | None = await visit.next_event(TIMEOUT)
        assert event is not None, "no reading from the box"
        if isinstance(event, LiveReading) and event.reading.power_w == power_w:
            return event


async def test_start_readings_top_up_stop_and_a_verified_receipt(
    box_on_radio: BoxOnRadio, phone_node: BleNode, wallet: Wallet
) -> None:
    assert box_on_radio.plant is not None
    control = box_on_radio.plant.control
    label = box_on_radio.box.label(2)
    grant = await wallet.add_grant(await signed_grant(wallet, "first", amount_fen=500))
    top_up = await wallet.add_grant(await signed_grant(wallet, "second", amount_fen=300))
    assert (await wallet.choose_grant(box_id=label.box_id)).grant_id in (grant.grant_id, top_up.grant_id)

    async with BoxVisit.open(wallet, label, start_grant=grant) as visit:
        session = visit.started
        assert session is not None
        assert session.outlet == 2
        assert session.balance_fen == 500
        assert (await control.status()).outlets[1].breaker_closed
        await control.set_load(2, 1200)
        live = await reading_with(visit, 1200)
        assert live.session.state is SessionState.RUNNING
        assert live.session.voltage_dv > 0
        assert live.session.current_ma > 0
        assert live.reading.remaining_fen == 500 - live.reading.cost_fen

        topped = await visit.top_up(session, top_up)
        assert topped.balance_fen == 800
        receipt = await visit.stop(topped)

    body = receipt.receipt
    assert body.end_reason is EndReason.USER_STOP
    assert body.grant_ids == (grant.grant_id, top_up.grant_id)
    assert not (await control.status()).outlets[1].breaker_closed
    # the receipt was checked against the certificate this phone verified at the box
    entry = tokens.LedgerEntry.verify(
        receipt.signed, cose.key_ring(box_on_radio.box.certificate.box_public_key)
    )
    assert entry.body == body
    assert [r.receipt.session_id for r in await wallet.receipts()] == [session.session_id]
    ended = await wallet.session(label.box_id, session.session_id)
    assert ended is not None
    assert ended.state is SessionState.ENDED
    assert ended.cost_fen == body.cost_fen
    left = {g.grant_id: (g.state, g.remaining_fen) for g in await wallet.grants()}
    charged_first = min(body.cost_fen, 500)
    assert left == {
        grant.grant_id: (GrantState.USED, 500 - charged_first),
        top_up.grant_id: (GrantState.USED, 300 - (body.cost_fen - charged_first)),
    }
    known = await wallet.box(label.box_id)
    assert known is not None
    assert known.label(2) == label


async def test_walk_away_and_come_back(box_on_radio: BoxOnRadio, phone_node: BleNode, wallet: Wallet) -> None:
    assert box_on_radio.plant is not None
    grant = await wallet.add_grant(await signed_grant(wallet, "walk"))
    async with BoxVisit.open(wallet, box_on_radio.box.label(3), start_grant=grant) as visit:
        session = visit.started
        assert session is not None
    await box_on_radio.plant.control.set_load(3, 800)

    # back later, with no label: the wallet knows the box and the session
    (running,) = await wallet.sessions(running_only=True)
    label = await label_for_session(wallet, running)
    assert label == box_on_radio.box.label(3)
    async with BoxVisit.open(wallet, label) as again:
        # the box attaches this phone's running session to the new connection by itself
        live = await reading_with(again, 800)
        assert live.session.session_id == session.session_id
        (listed,) = await again.list_sessions()
        assert listed.state is SessionState.RUNNING
        assert listed.energy_wh >= 0
        receipt = await again.stop(listed)
    assert receipt.receipt.session_id == session.session_id
    assert await wallet.sessions(running_only=True) == []


async def test_a_label_whose_fingerprint_is_not_the_box_is_refused(
    box_on_radio: BoxOnRadio, phone_node: BleNode, wallet: Wallet
) -> None:
    grant = await wallet.add_grant(await signed_grant(wallet, "never sent"))
    genuine = box_on_radio.box.label(1)
    forged = gatt.QrLabel(box_id=genuine.box_id, outlet=1, fingerprint=bytes(16))
    with pytest.raises(BoxNotTrustedError) as refused:
        async with BoxVisit.open(wallet, forged, start_grant=grant):
            pass
    assert refused.value.code is ErrorCode.EDHOC_WRONG_BOX
    unused = await wallet.grant(grant.grant_id)
    assert unused is not None
    assert unused.state is GrantState.AVAILABLE
    assert await wallet.box(genuine.box_id) is None
    assert not (await box_on_radio.plant.control.status()).outlets[0].breaker_closed  # type: ignore[union-attr]


async def test_expired_and_revoked_grants_are_refused_by_the_box(
    box_on_radio: BoxOnRadio, phone_node: BleNode, wallet: Wallet
) -> None:
    label = box_on_radio.box.label(1)
    expired = await wallet.add_grant(await signed_grant(wallet, "expired", expires_in=-10))
    with pytest.raises(BoxRefusedError) as too_late:
        async with BoxVisit.open(wallet, label, start_grant=expired):
            pass
    assert too_late.value.code is ErrorCode.GRANT_EXPIRED
    assert (await wallet.grant(expired.grant_id)).state is GrantState.REFUSED  # type: ignore[union-attr]

    revoked = await wallet.add_grant(await signed_grant(wallet, "revoked"))
    revocations = tokens.RevocationList(
        version=now(), issued_at=now() - 5, grant_ids=frozenset({revoked.grant_id})
    )
    await wallet.offer_update(revocations.sign(OPERATOR))
    # the phone relays its newest revocation list right behind the handshake, before the start
    with pytest.raises(BoxRefusedError) as withdrawn:
        async with BoxVisit.open(wallet, label, start_grant=revoked):
            pass
    assert withdrawn.value.code is ErrorCode.GRANT_REVOKED
    assert (await wallet.grant(revoked.grant_id)).state is GrantState.REFUSED  # type: ignore[union-attr]

    async with BoxVisit.open(wallet, label) as visit:
        assert visit.pushes == []  # the box holds that list now; nothing to relay again
        batch = await visit.collect_entries()
    assert batch is not None
    assert batch.box_id == label.box_id
    assert batch.last_sequence >= 2
    assert [b.batch_id for b in await wallet.batches(pending_only=True)] == [batch.batch_id]


async def test_a_box_whose_certificate_no_trusted_operator_signed_is_refused(
    ble_testbed: BleTestbed, phone_node: BleNode, wallet: Wallet, tmp_path: Path
) -> None:
    forger = testing.operator_key("forger")
    fake_key = testing.ed25519_key("fake box")
    fake = await start_box(
        ble_testbed,
        tmp_path / "fake",
        box_key=fake_key,
        certificate=testing.sample_certificate(fake_key),
        operator=forger,  # the fake box trusts its forger; the phone does not
        hardware={"kind": "memory"},
        plant=None,
    )
    grant = await wallet.add_grant(await signed_grant(wallet, "kept"))
    # a perfect fake label: the fingerprint is the fake box's own key
    with pytest.raises(BoxNotTrustedError) as refused:
        async with BoxVisit.open(wallet, fake.box.label(1), start_grant=grant):
            pass
    assert refused.value.code is ErrorCode.TOKEN_UNKNOWN_KEY
    unused = await wallet.grant(grant.grant_id)
    assert unused is not None
    assert unused.state is GrantState.AVAILABLE


async def test_the_box_ends_a_session_on_its_own_and_refuses_to_start_with_its_door_open(
    box_on_radio: BoxOnRadio, phone_node: BleNode, wallet: Wallet
) -> None:
    assert box_on_radio.plant is not None
    control = box_on_radio.plant.control
    label = box_on_radio.box.label(4)
    grant = await wallet.add_grant(await signed_grant(wallet, "tamper"))
    spare = await wallet.add_grant(await signed_grant(wallet, "spare"))
    async with BoxVisit.open(wallet, label, start_grant=grant) as visit:
        assert visit.started is not None
        await control.open_door(0)  # someone opens the metering box: every outlet trips
        while True:
            event = await visit.next_event(TIMEOUT)
            assert event is not None, "the box never ended the session"
            if isinstance(event, SessionClosed):
                break
        assert event.receipt.receipt.end_reason is EndReason.TAMPER
        assert event.session is not None
        assert event.session.state is SessionState.ENDED

        with pytest.raises(BoxRefusedError) as door_open:
            await visit.start(spare)
    assert door_open.value.code is ErrorCode.METERING_DOOR_OPEN
    kept = await wallet.grant(spare.grant_id)
    assert kept is not None
    assert (kept.state, kept.refused_code) == (GrantState.AVAILABLE, ErrorCode.METERING_DOOR_OPEN)
    assert (await wallet.choose_grant(box_id=label.box_id)).grant_id == spare.grant_id  # usable once shut
