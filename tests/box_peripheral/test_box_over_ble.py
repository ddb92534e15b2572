"""The box daemon as it runs in the field: bless over the emulated BlueZ, the real Modbus driver
against the simulated plant, and unmodified bleak phones on other nodes of the virtual radio."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protocol import cose, testing, tokens
from protocol.errors import ErrorCode
from protocol.tokens import EndReason
from testbench._process import python_module_argv
from testbench.app_process import AppProcess
from testbench.box_setup import ProvisionedBox, write_box_directory
from testbench.plant import Plant, running_plant
from testbench.testbed import BleTestbed

OPERATOR = testing.operator_key()
ENCRYPTION = testing.x25519_key("operator encryption")
BOX_KEY = testing.ed25519_key("ble box")
TIMEOUT = 20.0
POLICY = {"idle_timeout_s": 3, "poll_interval_ms": 250}


@dataclass
class BoxOnRadio:
    box: ProvisionedBox
    process: AppProcess
    plant: Plant
    testbed: BleTestbed

    async def phone(self, name: str = "phone") -> AppProcess:
        node = await self.testbed.start_node(name=name)
        process = await self.testbed.spawn(node, python_module_argv("testbench.phone_agent"), name=name)
        await process.wait_event("ready", within=TIMEOUT)
        return process


def phone_key(name: str) -> str:
    return testing.seed(f"ble phone {name}").hex()


def signed_grant(name: str, *, amount_fen: int = 500, grant_id: bytes | None = None) -> str:
    key = testing.ed25519_key(f"ble phone {name}")
    # phone_key() hands the agent the same seed as raw private bytes
    grant = testing.sample_grant(
        key,
        grant_id=grant_id or testing.seed(f"grant {name} {amount_fen}")[:8],
        amount_fen=amount_fen,
        box_id=None,
        issued_at=testing.SAMPLE_TIME,
        expires_at=2_000_000_000,
    )
    return grant.sign(OPERATOR).hex()


def connect_arguments(box: ProvisionedBox, name: str, outlet: int, **extra: Any) -> dict[str, Any]:
    return {
        "label": box.label(outlet).encode(),
        "phone_key": phone_key(name),
        "operator_keys": [cose.public_key_bytes(OPERATOR.public_key).hex()],
        **extra,
    }


async def unlock(
    phone: AppProcess, box: ProvisionedBox, name: str, outlet: int, **grant: Any
) -> dict[str, Any]:
    reply = await phone.request(
        "connect", connect_arguments(box, name, outlet, grant=signed_grant(name, **grant)), within=TIMEOUT
    )
    assert reply["ok"], reply
    assert reply["answer"]["type"] == "SessionStarted", reply
    return reply


def receipt_in(message: dict[str, Any]) -> tokens.SessionReceipt:
    assert message["type"] == "SessionEnded", message
    entry = tokens.LedgerEntry.verify(bytes.fromhex(message["receipt"]), cose.key_ring(BOX_KEY.public_key()))
    assert isinstance(entry.body, tokens.SessionReceipt)
    return entry.body


async def ended(phone: AppProcess) -> tokens.SessionReceipt:
    """The receipt of a session the box ended on its own (an event, not an answer)."""
    return receipt_in(await phone.wait_event("message", within=TIMEOUT, type="SessionEnded"))


@pytest.fixture
async def box_on_radio(ble_testbed: BleTestbed, tmp_path: Path) -> AsyncIterator[BoxOnRadio]:
    async with running_plant(outlets=4, time_scale=1.0) as plant:
        # a steep tariff so a 1-fen grant lasts a second or two at 3.5 kW
        certificate = testing.sample_certificate(BOX_KEY)
        box = write_box_directory(
            tmp_path / "box",
            box_key=BOX_KEY,
            certificate=certificate,
            operator=OPERATOR,
            operator_encryption_key=ENCRYPTION.public_key(),
            hardware={"kind": "modbus-tcp", "host": plant.endpoint.host, "port": plant.endpoint.port},
            policy=POLICY,
        )
        node = await ble_testbed.start_node(name="box")
        process = await ble_testbed.spawn(
            node,
            [sys.executable, "-m", "powerbox_cli", "box", "run", "--config", str(box.config_path)],
            name="box",
        )
        await process.wait_event("ready", within=TIMEOUT)
        yield BoxOnRadio(box=box, process=process, plant=plant, testbed=ble_testbed)


async def test_unlock_readings_top_up_and_stop(box_on_radio: BoxOnRadio) -> None:
    phone = await box_on_radio.phone()
    reply = await unlock(phone, box_on_radio.box, "alice", 2)
    session_id = reply["answer"]["session_id"]
    status = await box_on_radio.plant.control.status()
    assert status.outlets[1].breaker_closed
    await box_on_radio.plant.control.set_load(2, 1200)
    reading = await phone.wait_event("message", within=TIMEOUT, type="MeterReading", power_w=1200)
    assert reading["remaining_fen"] <= 500
    top_up = await phone.request(
        "send",
        {
            "message": "TopUp",
            "fields": {"session_id": session_id, "grant": signed_grant("alice", amount_fen=300)},
        },
        within=TIMEOUT,
    )
    assert top_up["answer"]["balance_fen"] == 800
    stop = await phone.request(
        "send", {"message": "StopSession", "fields": {"session_id": session_id}}, within=TIMEOUT
    )
    assert stop["ok"], stop
    receipt = receipt_in(stop["answer"])
    assert receipt.end_reason is EndReason.USER_STOP
    assert len(receipt.grant_ids) == 2
    assert not (await box_on_radio.plant.control.status()).outlets[1].breaker_closed


async def test_balance_exhausted_overload_tamper_and_idle(box_on_radio: BoxOnRadio) -> None:
    control = box_on_radio.plant.control
    phones = [await box_on_radio.phone(f"p{i}") for i in range(4)]
    # outlet 1 runs out of money, 2 is overloaded, 3 goes idle; then the metering box opens
    await unlock(phones[0], box_on_radio.box, "p0", 1, amount_fen=1)  # 16 Wh at 120 fen/kWh
    await control.set_load(1, 3500)
    await unlock(phones[1], box_on_radio.box, "p1", 2)
    await control.set_load(2, 4000)  # rated 3500 W
    await unlock(phones[2], box_on_radio.box, "p2", 3)
    assert (await ended(phones[1])).end_reason is EndReason.OVERLOAD
    assert (await ended(phones[2])).end_reason is EndReason.IDLE
    exhausted = await ended(phones[0])
    assert exhausted.end_reason is EndReason.BALANCE_EXHAUSTED
    assert exhausted.cost_fen <= 1
    delivered = (await control.status()).outlets[0].delivered_mwh
    assert delivered <= 16_000 + 1_000  # at most about a Wh beyond what 1 fen buys
    await unlock(phones[3], box_on_radio.box, "p3", 4)
    await control.open_door(0)
    assert (await ended(phones[3])).end_reason is EndReason.TAMPER
    status = await control.status()
    assert not any(outlet.breaker_closed for outlet in status.outlets)


async def test_four_phones_on_four_outlets_at_once(box_on_radio: BoxOnRadio) -> None:
    phones = [await box_on_radio.phone(f"crowd{i}") for i in range(4)]
    replies = [await unlock(p, box_on_radio.box, f"crowd{i}", i + 1) for i, p in enumerate(phones)]
    for outlet in (1, 2, 3, 4):
        await box_on_radio.plant.control.set_load(outlet, 400 + 100 * outlet)
    for index, phone in enumerate(phones):
        watts = 500 + 100 * index
        await phone.wait_event("message", within=TIMEOUT, type="MeterReading", power_w=watts)
        stop = await phone.request(
            "send",
            {"message": "StopSession", "fields": {"session_id": replies[index]["answer"]["session_id"]}},
            within=TIMEOUT,
        )
        assert receipt_in(stop["answer"]).outlet == index + 1


async def test_walk_away_and_come_back(box_on_radio: BoxOnRadio) -> None:
    phone = await box_on_radio.phone()
    reply = await unlock(phone, box_on_radio.box, "bob", 3)
    await box_on_radio.plant.control.set_load(3, 800)
    assert (await phone.request("disconnect", {}, within=TIMEOUT))["ok"]
    again = await phone.request("connect", connect_arguments(box_on_radio.box, "bob", 3), within=TIMEOUT)
    assert again["ok"], again
    listing = await phone.request("send", {"message": "ListSessions", "fields": {}}, within=TIMEOUT)
    sessions = listing["answer"]["sessions"]
    assert [s["session_id"] for s in sessions] == [reply["answer"]["session_id"]]
    assert sessions[0]["running"]
    await phone.wait_event("message", within=TIMEOUT, type="MeterReading")


async def test_a_forged_label_or_a_spent_grant_is_refused(box_on_radio: BoxOnRadio) -> None:
    phone = await box_on_radio.phone()
    forged = box_on_radio.box.label(1)
    wrong = type(forged)(box_id=forged.box_id, outlet=1, fingerprint=bytes(16)).encode()
    reply = await phone.request(
        "connect", {**connect_arguments(box_on_radio.box, "eve", 1), "label": wrong}, within=TIMEOUT
    )
    assert not reply["ok"]
    assert reply["code"] == ErrorCode.EDHOC_WRONG_BOX
    grant = signed_grant("carol")
    first = await phone.request(
        "connect", connect_arguments(box_on_radio.box, "carol", 1, grant=grant), within=TIMEOUT
    )
    assert first["ok"], first
    second = await phone.request(
        "connect", connect_arguments(box_on_radio.box, "carol", 2, grant=grant), within=TIMEOUT
    )
    assert not second["ok"]
    assert second["code"] == ErrorCode.GRANT_SPENT
