"""`powerbox phone` as a user runs it: processes on a phone node of the virtual radio, at the real
box daemon, with no server. JSON output for the assertions; one run in plain text for the reader."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest
import segno

from phone_client.wallet import Wallet
from protocol import gatt, tokens
from protocol.errors import ErrorCode
from testbench.bluez import BleNode
from testbench.testbed import BleTestbed
from tests.phone_client.conftest import OPERATOR, TIMEOUT, BoxOnRadio, PhoneCli, now, signed_grant

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cli(ble_testbed: BleTestbed, phone_node: BleNode, wallet: Wallet) -> PhoneCli:
    return PhoneCli(ble_testbed, phone_node, wallet.path)


async def test_a_session_from_a_photo_of_the_label_to_the_receipt(
    box_on_radio: BoxOnRadio, wallet: Wallet, cli: PhoneCli, tmp_path: Path
) -> None:
    assert box_on_radio.plant is not None
    first = await wallet.add_grant(await signed_grant(wallet, "cli first", amount_fen=500))
    second = await wallet.add_grant(await signed_grant(wallet, "cli second", amount_fen=300))
    photo = tmp_path / "label.png"
    segno.make(box_on_radio.box.label(2).encode(), error="m").save(str(photo), scale=8, border=4)
    await box_on_radio.plant.control.set_load(2, 900)

    process = await cli.spawn("start", str(photo), "--readings", "2")
    started = await process.wait_event("session_started", within=TIMEOUT)
    assert (started["box_id"], started["outlet"], started["balance_fen"]) == (box_on_radio.box_id, 2, 500)
    assert started["scan_to_power_ms"] > 0  # the phone's own figure, label read to SessionStarted
    reading = await process.wait_event("reading", within=TIMEOUT)
    assert reading["session_id"] == started["session_id"]
    assert reading["voltage_dv"] > 0
    assert reading["remaining_fen"] == 500 - reading["cost_fen"]
    left = await process.wait_event("left_running", within=TIMEOUT)
    assert left["interrupted"] is False
    assert (await process.wait(within=TIMEOUT)).returncode == 0

    # come back later and watch until Ctrl-C: the session runs on
    back = await cli.spawn("watch")
    reconnected = await back.wait_event("reconnected", within=TIMEOUT)
    assert reconnected["session_id"] == started["session_id"]
    await back.wait_event("reading", within=TIMEOUT)
    os.kill(back.pid, signal.SIGINT)
    walked_away = await back.wait_event("left_running", within=TIMEOUT)
    assert walked_away["interrupted"] is True
    assert (await back.wait(within=TIMEOUT)).returncode == 0

    topped = await cli.run("top-up", expect="topped_up")
    assert topped["balance_fen"] == 800
    assert topped["grant_id"] in (
        first.grant_id.hex(),
        second.grant_id.hex(),
    )
    stopped = await cli.run("stop", expect="session_ended")
    assert stopped["verified"] is True
    assert stopped["end_reason"] == "USER_STOP"
    assert stopped["ended_by_box"] is False
    assert len(stopped["grant_ids"]) == 2
    receipt = tokens.LedgerEntry.decode_unverified(bytes.fromhex(stopped["signed"]))
    assert receipt.box_id == box_on_radio.box_id
    door = await cli.run("door", expect="door_opened")
    assert door["outlet"] == 2
    listed = await cli.run("receipts", expect="receipts")
    assert [r["session_id"] for r in listed["receipts"]] == [started["session_id"]]
    assert not (await box_on_radio.plant.control.status()).outlets[1].breaker_closed


async def test_refusals_show_the_code_of_whoever_refused(
    box_on_radio: BoxOnRadio, wallet: Wallet, cli: PhoneCli
) -> None:
    label = box_on_radio.box.label(1).encode()
    expired = await wallet.add_grant(await signed_grant(wallet, "cli expired", expires_in=-10))
    refused = await cli.fails("start", label, "--grant", expired.grant_id.hex()[:8], "--no-watch")
    assert (refused["origin"], refused["code"], refused["name"]) == (
        "box",
        ErrorCode.GRANT_EXPIRED,
        "GRANT_EXPIRED",
    )
    assert "expired" in refused["explanation"]

    revoked = await wallet.add_grant(await signed_grant(wallet, "cli revoked"))
    listing = tokens.RevocationList(
        version=now(), issued_at=now() - 5, grant_ids=frozenset({revoked.grant_id})
    )
    await wallet.offer_update(listing.sign(OPERATOR))
    refused = await cli.fails("start", label, "--grant", revoked.grant_id.hex(), "--no-watch")
    assert (refused["origin"], refused["code"]) == ("box", ErrorCode.GRANT_REVOKED)

    # the phone itself knows both are gone: with no grant named, it does not even try
    nothing = await cli.fails("start", label, "--no-watch")
    assert (nothing["origin"], nothing["code"]) == ("phone", None)

    fake = gatt.QrLabel(box_id=box_on_radio.box_id, outlet=1, fingerprint=bytes(16)).encode()
    await wallet.add_grant(await signed_grant(wallet, "cli spare"))
    wrong_box = await cli.fails("start", fake, "--no-watch")
    assert (wrong_box["origin"], wrong_box["code"]) == ("phone", ErrorCode.EDHOC_WRONG_BOX)

    absent = gatt.QrLabel(box_id="NOWHERE-1", outlet=1, fingerprint=bytes(16)).encode()
    missing = await cli.fails("start", absent, "--no-watch", "--scan-timeout", "1")
    assert missing["origin"] == "radio"
    assert "PBWHERE1" in missing["message"]

    malformed = await cli.fails("start", "PBX1:box:1:xyz")
    assert (malformed["origin"], malformed["code"]) == ("phone", ErrorCode.MESSAGE_MALFORMED)

    # and for a person: one readable line with the code, no traceback
    process = await cli.spawn(
        "start", label, "--grant", revoked.grant_id.hex(), "--no-watch", json_output=False
    )
    assert (await process.wait(within=TIMEOUT)).returncode == 1
    text = process.log_path.read_text()
    assert "revoked" in text
    assert "501 GRANT_REVOKED" in text
    assert "Traceback" not in text


async def breaker_opens(box: BoxOnRadio, outlet: int) -> None:
    """No phone listens while the box ends a session on its own: the plant's breaker is all
    there is to watch, so look at it until it opens."""
    assert box.plant is not None
    async with asyncio.timeout(TIMEOUT):
        while (await box.plant.control.status()).outlets[outlet - 1].breaker_closed:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_coming_back_to_a_session_that_ended_while_away(
    box_on_radio: BoxOnRadio, wallet: Wallet, cli: PhoneCli
) -> None:
    assert box_on_radio.plant is not None
    await wallet.add_grant(await signed_grant(wallet, "cli away"))
    started = await cli.run(
        "start", box_on_radio.box.label(3).encode(), "--no-watch", expect="session_started"
    )
    await box_on_radio.plant.control.open_door(0)
    await breaker_opens(box_on_radio, 3)
    away = await cli.run("watch", expect="ended_while_away")
    assert away["session_id"] == started["session_id"]
    # the box follows its SessionList with the receipt: the phone learns why and what it cost
    assert away["state"] == "ended"
    assert away["receipt"]["end_reason"] == "TAMPER"
    assert away["receipt"]["verified"] is True
    assert away["receipt"]["cost_fen"] == away["cost_fen"]
    receipts = (await cli.run("receipts", expect="receipts"))["receipts"]
    assert [r["session_id"] for r in receipts] == [started["session_id"]]
    assert (await cli.run("sessions", expect="sessions"))["sessions"] == []
    stopped = await cli.fails("stop")
    assert (stopped["origin"], stopped["code"]) == ("phone", ErrorCode.SESSION_UNKNOWN)
