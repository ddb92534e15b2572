"""Server, box and phone together: the phone signs up on the real settlement server over loopback,
tops up, gets a grant, runs a session at the real box daemon on the virtual radio with no network
there, carries the box's ledger to the server, and carries the server's ack back to the box."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ledger_server.db import Database
from ledger_server.keys import load_keys
from ledger_server.providers import add_dev_electricity_account
from powerbox_cli import main
from protocol.tokens import BoxCertificate
from testbench.bluez import BleNode
from testbench.plant import running_plant
from testbench.testbed import BleTestbed
from tests.ledger_server.conftest import RunningServer, api_for, running_server
from tests.phone_client.conftest import BOX_KEY, PhoneCli, now, start_box

pytestmark = pytest.mark.timeout(180)

BOX_ID = "BOX-SRV-1"
PHONE_NUMBER = "+8613900001234"


@pytest.fixture
def server(sqlite_url: str, key_directory: Path) -> Iterator[RunningServer]:
    with running_server(sqlite_url, key_directory) as running:
        running.clock.now = now()  # the box and the phone live on wall-clock time
        yield running


async def test_sign_up_top_up_grant_session_sync_and_the_ack_reaches_the_box(
    ble_testbed: BleTestbed, phone_node: BleNode, server: RunningServer, key_directory: Path, tmp_path: Path
) -> None:
    async with api_for(server) as operator:
        provisioned = await operator.provision(BOX_ID, BOX_KEY)
        await operator.set_tariff(120)
    keys = load_keys(key_directory)
    certificate = BoxCertificate.verify(base64.b64decode(provisioned["certificate"]), keys.verification_keys)
    label = provisioned["labels"][1]["label"]  # the QR code the operator printed for outlet 2
    cli = PhoneCli(ble_testbed, phone_node, tmp_path / "phone.sqlite", server=server.base_url)

    # the plant's clock runs a minute a second, so a short session costs real money
    async with running_plant(outlets=4, time_scale=60.0) as plant:
        await start_box(
            ble_testbed,
            tmp_path / "box",
            box_key=BOX_KEY,
            certificate=certificate,
            operator=keys.signer,
            hardware={"kind": "modbus-tcp", "host": plant.endpoint.host, "port": plant.endpoint.port},
            plant=plant,
            encryption_key=keys.encryption_public_key,
        )

        # before logging in, a sync brings only the operator's public keys
        first_sync = await cli.run("sync", expect="synced")
        assert first_sync["operator_keys_added"] == 1
        assert "not logged in" in first_sync["notes"][0]

        # online: sign up as a shared user, pay in, get a grant for this box
        sent = await cli.run("register", "shared", PHONE_NUMBER, expect="code_sent")
        assert sent["expires_in"] > 0
        code = server.sms.last_code(PHONE_NUMBER)
        assert code is not None
        logged_in = await cli.run("login", "shared", PHONE_NUMBER, "--code", code, expect="logged_in")
        assert logged_in["principal"] == "user"
        deposited = await cli.run("deposit", "10", expect="deposited")
        assert deposited["available_fen"] == 1000
        grant = await cli.run("grant", "request", "5", "--box", BOX_ID, "--max-price", "1.50", expect="grant")
        assert (grant["amount_fen"], grant["box_id"], grant["status"]) == (500, BOX_ID, "available")

        # at the box, the network plays no part
        await plant.control.set_load(2, 2000)
        started = await cli.run("start", label, "--readings", "1", expect="session_started")
        assert started["grant_id"] == grant["grant_id"]
        ended = await cli.run("stop", expect="session_ended")
        assert ended["verified"] is True
        assert ended["cost_fen"] > 0
        carried = await cli.run("visit", BOX_ID, expect="visited")
        batch = carried["batch"]
        assert batch is not None
        assert batch["first_sequence"] == 1

        # online again: hand the sealed batch in, get the ack and the settled grant
        synced = await cli.run("sync", expect="synced")
        (outcome,) = synced["batches"]
        assert outcome["acked_sequence"] == batch["last_sequence"]
        assert synced["grants_settled"] == 1
        assert synced["statement_fetched"] is True
        grants = await cli.run("grants", "--all", expect="grants")
        (settled,) = grants["grants"]
        assert settled["status"] == "settled"
        assert settled["charged_fen"] == ended["cost_fen"]
        statement = await cli.run("statement", expect="statement")
        assert [s["session_id"] for s in statement["sessions"]] == [ended["session_id"]]
        assert statement["available_fen"] == 1000 - ended["cost_fen"]

        # back at the box: the ack goes in, and the box hands over only what came after it
        again = await cli.run("visit", BOX_ID, expect="visited")
        assert {
            "kind": "ledger_ack",
            "version": batch["last_sequence"],
            "accepted": True,
            "refused_code": None,
        } in (again["pushes"])
        assert again["batch"]["first_sequence"] == batch["last_sequence"] + 1
        status = await cli.run("status", expect="status")
        assert status["acks_to_deliver"] == []

        # more of the server: nearby boxes, a reservation honoured at the box, an invoice
        nearby = await cli.run("nearby", "--lat", "31.230416", "--lon", "121.473701", expect="nearby")
        assert [b["box_id"] for b in nearby["boxes"]] == [BOX_ID]
        reserved = await cli.run("reserve", BOX_ID, "3", "--for", "30m", expect="reserved")
        assert reserved["outlet"] == 3
        await cli.run("grant", "request", "3", "--box", BOX_ID, expect="grant")
        started = await cli.run(
            "start", provisioned["labels"][2]["label"], "--no-watch", expect="session_started"
        )
        assert started["outlet"] == 3
        await cli.run("stop", expect="session_ended")
        invoice = await cli.run("invoice", "create", ended["session_id"][:8], expect="invoice")
        assert invoice["total_fen"] == ended["cost_fen"]

        # a technician opens the metering box with an unlock token from the server
        async with api_for(server) as operator:
            await operator.staff("tech1", "technician")
        tech = PhoneCli(ble_testbed, phone_node, tmp_path / "tech.sqlite", server=server.base_url)
        await tech.run("login", "staff", "tech1", "--password", "tech1-password", expect="logged_in")
        await tech.run("token", "request", BOX_ID, "--door", "metering-box", expect="unlock_token")
        opened = await tech.run("unlock", provisioned["labels"][0]["label"], expect="door_opened")
        assert (opened["door"], opened["outlet"]) == ("METERING_BOX", 0)


def test_an_electricity_account_user_signs_up_and_gets_a_grant(server: RunningServer, tmp_path: Path) -> None:
    async def add_account() -> None:
        database = Database(server.database_url)
        try:
            await add_dev_electricity_account(
                database, number="3100123456", password="grid-pass", phone="+8613700000009"
            )
        finally:
            await database.close()

    asyncio.run(add_account())
    wallet = tmp_path / "account-phone.sqlite"

    def phone(*args: str) -> tuple[int, dict[str, Any]]:
        result = CliRunner().invoke(
            main, ["phone", "--wallet", str(wallet), "--server", server.base_url, "--json", *args]
        )
        assert "Traceback" not in result.output
        (line,) = [json.loads(text) for text in result.stdout.splitlines() if text.startswith("{")]
        return result.exit_code, line

    status, wrong = phone("register", "account", "3100123456", "--password", "not-it")
    assert (status, wrong["origin"], wrong["name"]) == (1, "server", "AUTH_FAILED")
    status, sent = phone("register", "account", "3100123456", "--password", "grid-pass")
    assert (status, sent["event"]) == (0, "code_sent")
    code = server.sms.last_code("+8613700000009")  # texted to the account's phone
    assert code is not None
    status, _ = phone("login", "account", "3100123456", "--password", "grid-pass", "--code", code)
    assert status == 0
    status, me = phone("balance")
    assert (status, me["kind"], me["electricity_account"]) == (0, "account", "3100123456")
    status, grant = phone("grant", "request", "8")  # paid from the electricity account
    assert (status, grant["amount_fen"], grant["status"]) == (0, 800, "available")
