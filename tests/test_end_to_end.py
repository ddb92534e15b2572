"""End to end on the whole system (testbench.system): box daemons on the virtual radio with their
Modbus plants, the phone CLI on nodes of its own, the settlement server on SQLite.

Beyond the demo's story (tests/test_demo.py): a grant used at two boxes while both are offline,
a box killed in mid-session, ledgers that reach the server only through phones, and reconciliation
interrupted by a killed job and a server restart. Each test ends with the server's money journal
balanced and every session settled exactly once (DESIGN §7 S5, S6, S7).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from box_peripheral.config import load_config
from box_peripheral.hardware.registermap import WH_PER_ENERGY_UNIT
from box_peripheral.store import BoxStore
from ledger_server.db import Database
from ledger_server.schema import grant_charges
from protocol import cose
from protocol.tokens import EndReason, EntryKind, LedgerEntry, SessionReceipt, entry_hash
from testbench.system import (
    OperatorConsole,
    PhoneCli,
    RunningBox,
    RunningServer,
    eventually,
    running_system,
)
from tests.ledger_server.test_exactly_once import reconcile_killed_after, reconcile_to_the_end

pytestmark = pytest.mark.timeout(150)

DAY = 86_400
BIG_LOAD_W = 3000  # 50 Wh per real second at the plant's time scale: 6 fen a second at 120 fen/kWh
LOAD_W = 2000


# --- the phones ---------------------------------------------------------------------------------


async def ready_user(phone: PhoneCli, server: RunningServer, *, deposit_yuan: str = "10") -> int:
    """Sign up with a deposit and sync once, so the phone carries the tariff table to boxes that
    never had 4G; the user id."""
    logged_in = await phone.sign_up(server, deposit_yuan=deposit_yuan)
    await phone.run("sync", expect="synced")
    return int(logged_in["subject"])


def clone_wallet(source: Path, clone: Path) -> None:
    """Copy a whole wallet (SQLite's online backup, device key included): a cloned phone."""
    os.close(os.open(clone, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    with (
        contextlib.closing(sqlite3.connect(source)) as original,
        contextlib.closing(sqlite3.connect(clone)) as copy,
    ):
        original.backup(copy)


async def session_at(phone: PhoneCli, box: RunningBox, outlet: int) -> dict[str, Any]:
    """Plug a load in, start from the outlet's label, watch a reading, stop: the session_ended event."""
    await box.plant.control.set_load(outlet, LOAD_W)
    await phone.run("start", box.labels[outlet], "--readings", "1", expect="session_started")
    ended = await phone.run("stop", expect="session_ended")
    await box.plant.control.unplug(outlet)
    return ended


# --- the boxes ----------------------------------------------------------------------------------


async def box_status(box: RunningBox) -> dict[str, Any]:
    """`powerbox box status --json`: running sessions as persisted, ledger position, ack."""
    return dict(json.loads(await box.cli("status", "--json")))


async def box_ledger(box: RunningBox) -> list[LedgerEntry]:
    """The entries the box's store holds (not yet pruned), each signature and chain link checked."""
    config = load_config(box.config_path)
    async with BoxStore.open(
        config.database, box_id=config.certificate.box_id, box_key=config.box_key
    ) as store:
        signed = await store.entries(after=0, limit=100_000)
    ring = cose.key_ring(config.certificate.box_public_key)
    entries = [LedgerEntry.verify(raw, ring) for raw in signed]
    for previous, raw_previous, entry in zip(entries, signed, entries[1:], strict=False):
        assert entry.sequence == previous.sequence + 1
        assert entry.previous_hash == entry_hash(raw_previous)
    return entries


def receipts(entries: list[LedgerEntry]) -> dict[str, SessionReceipt]:
    """The receipts (SESSION_ENDED bodies) by session id, each session ended once."""
    ended = [entry.body for entry in entries if isinstance(entry.body, SessionReceipt)]
    counted = Counter(r.session_id.hex() for r in ended)
    assert all(n == 1 for n in counted.values()), counted
    return {r.session_id.hex(): r for r in ended}


def breaker_open(box: RunningBox, outlet: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return not (await box.plant.control.status()).outlet(outlet).breaker_closed

    return check


# --- the server ---------------------------------------------------------------------------------


async def server_ledger(operator: OperatorConsole, box_id: str) -> dict[str, Any]:
    return dict(await operator.call("GET", f"/v1/operator/boxes/{box_id}/ledger"))


async def wait_for_server_ledger(operator: OperatorConsole, box_id: str, sequence: int) -> None:
    async def arrived() -> bool:
        return bool((await server_ledger(operator, box_id))["contiguous_sequence"] >= sequence)

    await eventually(arrived, f"{box_id}'s entries up to {sequence} at the server")


async def settled_exactly_once(
    operator: OperatorConsole, user_id: int, costs: dict[str, int]
) -> dict[str, Any]:
    """The user's statement on the server lists each session of `costs` (session id to the
    receipt's cost) once and nothing else, at that cost, and the session's charges moved exactly
    that much out of the user's accounts. The statement."""
    statement = dict(await operator.call("GET", f"/v1/operator/users/{user_id}/statement"))
    assert Counter(s["session_id"] for s in statement["sessions"]) == Counter(costs.keys())
    assert {s["session_id"]: s["cost_fen"] for s in statement["sessions"]} == costs
    charged: defaultdict[str, int] = defaultdict(int)
    for line in statement["lines"]:
        if line["kind"] in ("charge", "late_charge"):
            charged[line["session_id"]] -= line["amount_fen"]
    assert dict(charged) == {session: cost for session, cost in costs.items() if cost}
    return statement


async def daily_figures(operator: OperatorConsole, box_id: str) -> tuple[int, int]:
    """Sessions and revenue of the box in the operator's daily report around now."""
    now = int(time.time())
    rows = await operator.call(
        "GET", "/v1/operator/reports/daily", params={"from_time": now - DAY, "to_time": now + DAY}
    )
    mine = [row for row in rows if row["box_id"] == box_id]
    return sum(row["sessions"] for row in mine), sum(row["revenue_fen"] for row in mine)


async def assert_anomalies(operator: OperatorConsole, **expected: int) -> list[dict[str, Any]]:
    """The server's anomaly list holds exactly `expected` (kind to count); the list."""
    found = list(await operator.call("GET", "/v1/operator/anomalies"))
    assert Counter(a["kind"] for a in found) == Counter(expected), found
    return found


async def reconcile_and_balance(operator: OperatorConsole) -> dict[str, Any]:
    """The batch job once more over HTTP: nothing left to apply, and the books balance."""
    reconciled = dict(await operator.call("POST", "/v1/operator/reconcile"))
    assert reconciled["entries_applied"] == 0
    assert reconciled["gaps"] == 0
    books = await operator.call("GET", "/v1/operator/books")
    assert books["balanced"], books["problems"]
    return reconciled


# --- the scenarios ------------------------------------------------------------------------------


async def test_a_grant_used_at_two_offline_boxes_is_bounded_and_the_excess_becomes_arrears(
    tmp_path: Path,
) -> None:
    """S7: one grant spent at two boxes that cannot know of each other (a cloned phone); each box
    holds it to the grant, settlement charges the grant once and the second use as arrears."""
    async with running_system(
        tmp_path / "system", box_ids=("BOX-A", "BOX-B"), phones=2, uplink_on=False
    ) as system:
        box_a, box_b = system.box("BOX-A"), system.box("BOX-B")
        phone, clone = system.phones
        operator = system.operator
        user_id = await ready_user(phone, system.server)
        grant = await phone.run("grant", "request", "0.30", expect="grant")  # good at any box
        grant_id, amount = grant["grant_id"], grant["amount_fen"]
        # the grant is bound to the device key, so the clone is the whole wallet, key and all
        await asyncio.to_thread(clone_wallet, phone.wallet, clone.wallet)

        # Both boxes offline, neither can know of the other: each lets the grant run out.
        for box in (box_a, box_b):
            await box.plant.control.set_load(1, BIG_LOAD_W)
        started = "session_started"
        await asyncio.gather(
            *(
                holder.run("start", box.labels[1], "--grant", grant_id, "--readings", "1", expect=started)
                for holder, box in ((phone, box_a), (clone, box_b))
            )
        )
        for box in (box_a, box_b):
            await eventually(breaker_open(box, 1), f"{box.box_id}'s breaker to trip at the balance")
            await box.plant.control.unplug(1)
        (receipt_a,) = receipts(await box_ledger(box_a)).values()
        (receipt_b,) = receipts(await box_ledger(box_b)).values()
        for receipt in (receipt_a, receipt_b):
            assert receipt.grant_ids == (bytes.fromhex(grant_id),)
            assert receipt.end_reason is EndReason.BALANCE_EXHAUSTED
            assert 0 < receipt.cost_fen <= amount  # each box alone never lets it go above the grant

        # Box B's entries come through the clone, box A's over its 4G once it is back.
        carried = await clone.run("visit", box_b.box_id, expect="visited")
        synced = await clone.run("sync", expect="synced")
        assert synced["batches"][-1]["acked_sequence"] == carried["batch"]["last_sequence"]
        await box_a.uplink(True)
        await wait_for_server_ledger(operator, box_a.box_id, (await box_status(box_a))["last_sequence"])
        await operator.call("POST", "/v1/operator/reconcile")

        # The second use (at A, settled last) is the double spend; its whole cost is owed.
        (double_spend,) = await assert_anomalies(operator, double_spend=1)
        assert (double_spend["grant_id"], double_spend["box_id"], double_spend["user_id"]) == (
            grant_id,
            box_a.box_id,
            user_id,
        )
        cost_a, cost_b = receipt_a.cost_fen, receipt_b.cost_fen
        statement = await settled_exactly_once(
            operator, user_id, {receipt_a.session_id.hex(): cost_a, receipt_b.session_id.hex(): cost_b}
        )
        against_grant = -sum(
            line["amount_fen"]
            for line in statement["lines"]
            if line["grant_id"] == grant_id and line["kind"] == "charge" and line["account"] == "frozen"
        )
        assert against_grant == amount  # the freeze: captured for B's session, the rest released
        assert statement["balances"] == {
            "available_fen": 1000 - cost_b,
            "frozen_fen": 0,
            "arrears_fen": cost_a,
        }
        await phone.run("sync", expect="synced")
        (held,) = (await phone.run("grants", "--all", expect="grants"))["grants"]
        assert held["charged_fen"] == cost_a + cost_b > amount
        assert (await phone.run("balance", expect="balance"))["arrears_fen"] == cost_a
        assert await daily_figures(operator, box_a.box_id) == (1, cost_a)
        assert await daily_figures(operator, box_b.box_id) == (1, cost_b)
        await reconcile_and_balance(operator)


async def test_a_box_killed_in_mid_session_closes_it_from_its_last_reading_and_it_settles_once(
    tmp_path: Path,
) -> None:
    """S5, DESIGN §4: a power cut in mid-session; on restart the box closes the session from its
    last persisted reading (POWER_LOSS), the phone learns it ended, the server settles it once."""
    async with running_system(tmp_path / "system", box_ids=("BOX-A",), phones=1, uplink_on=False) as system:
        box = system.box()
        (phone,) = system.phones
        operator = system.operator
        user_id = await ready_user(phone, system.server)
        await phone.run("grant", "request", "5", "--box", box.box_id, expect="grant")
        await box.plant.control.set_load(1, LOAD_W)
        watching, started = await phone.spawn_until("start", box.labels[1], first="session_started")
        session_id = started["session_id"]
        await watching.wait_for(
            lambda m: m.get("event") == "reading" and m["energy_wh"] >= 20,
            within=30,
            what="a reading with energy",
        )

        await box.kill()  # power cut: the daemon and its radio node die at once, the load stays on
        lost = await watching.wait_event("error", within=30)  # the phone was watching: link gone
        assert lost["origin"] == "radio"
        assert (await watching.wait(within=30)).returncode == 1
        (persisted,) = (await box_status(box))["running_sessions"]
        assert persisted["session_id"] == session_id
        assert persisted["energy_wh"] >= 20
        before = await box_ledger(box)
        await box.restart()

        # Closed on start-up from what was persisted, not from the meter, which ran on meanwhile.
        entries = await box_ledger(box)
        new = entries[len(before) :]
        assert [e.kind for e in new] == [EntryKind.BOOT, EntryKind.SESSION_ENDED]
        receipt = receipts(entries)[session_id]
        assert receipt.end_reason is EndReason.POWER_LOSS
        assert receipt.energy_wh == persisted["energy_wh"]
        outlet = (await box.plant.control.status()).outlet(1)
        assert not outlet.breaker_closed
        assert outlet.delivered_mwh >= (receipt.end_register_wh + WH_PER_ENERGY_UNIT) * 1000
        assert receipt.cost_fen > 0
        assert (await box_status(box))["running_sessions"] == []
        await box.plant.control.unplug(1)

        came_back = await phone.run("watch", expect="ended_while_away")
        assert (came_back["session_id"], came_back["energy_wh"], came_back["cost_fen"]) == (
            session_id,
            receipt.energy_wh,
            receipt.cost_fen,
        )

        await box.uplink(True)
        await wait_for_server_ledger(operator, box.box_id, entries[-1].sequence)
        await operator.call("POST", "/v1/operator/reconcile")
        await phone.run("sync", expect="synced")
        (settled,) = (await phone.run("statement", expect="statement"))["sessions"]
        assert (settled["session_id"], settled["cost_fen"], settled["energy_wh"], settled["end_reason"]) == (
            session_id,
            receipt.cost_fen,
            receipt.energy_wh,
            "power_loss",
        )
        await settled_exactly_once(operator, user_id, {session_id: receipt.cost_fen})
        assert await daily_figures(operator, box.box_id) == (1, receipt.cost_fen)
        await reconcile_and_balance(operator)
        # the power-loss receipt is stamped after the boot, by a clock that kept its last sync
        await assert_anomalies(operator)


async def test_ledger_entries_reach_the_server_only_through_phones(tmp_path: Path) -> None:
    """DESIGN §4: a box that never has 4G; another user's phone carries its sealed entries to the
    server and brings the server's ack back to the box."""
    async with running_system(tmp_path / "system", box_ids=("BOX-A",), phones=2, uplink_on=False) as system:
        box = system.box()
        user, mule = system.phones
        operator = system.operator
        user_id = await ready_user(user, system.server)
        await ready_user(mule, system.server, deposit_yuan="1")
        for _ in range(2):
            await user.run("grant", "request", "2", "--box", box.box_id, expect="grant")
        ended = [await session_at(user, box, outlet) for outlet in (1, 2)]

        # Another user's phone passes by, carries the sealed entries and hands them in.
        carried = await mule.run("visit", box.labels[3], expect="visited")
        last_sequence = (await box_status(box))["last_sequence"]
        assert carried["batch"]["last_sequence"] == last_sequence
        synced = await mule.run("sync", expect="synced")
        assert [b["acked_sequence"] for b in synced["batches"]] == [last_sequence]
        ledger = await server_ledger(operator, box.box_id)
        assert (ledger["contiguous_sequence"], ledger["applied_sequence"], ledger["waiting"]) == (
            last_sequence,
            last_sequence,
            0,
        )
        assert (await box_status(box))["acked_sequence"] < last_sequence  # the ack is still on the phone

        # The mule's next visit gives the box the server's ack.
        delivered = await mule.run("visit", box.box_id, expect="visited")
        assert {"kind": "ledger_ack", "accepted": True} in [
            {"kind": p["kind"], "accepted": p["accepted"]} for p in delivered["pushes"]
        ]
        assert (await box_status(box))["acked_sequence"] == last_sequence

        await user.run("sync", expect="synced")
        statement = await user.run("statement", expect="statement")
        costs = {e["session_id"]: e["cost_fen"] for e in ended}
        assert {s["session_id"]: s["cost_fen"] for s in statement["sessions"]} == costs
        await settled_exactly_once(operator, user_id, costs)
        assert await daily_figures(operator, box.box_id) == (2, sum(costs.values()))
        assert (await operator.box(box.box_id))["last_seen_at"] is None  # never over 4G
        await assert_anomalies(operator)
        await reconcile_and_balance(operator)


async def test_reconciliation_interrupted_by_a_killed_job_and_a_server_restart_settles_once(
    tmp_path: Path,
) -> None:
    """S6: the reconcile job killed after one committed step, then the server restarted while a
    reconcile request is in flight, then the same entries delivered again: settled exactly once."""
    async with running_system(tmp_path / "system", box_ids=("BOX-A",), phones=2, uplink_on=False) as system:
        box = system.box()
        server, operator = system.server, system.operator
        # the operator settles with the batch job only: ingest stores, reconciliation applies
        server.config = dataclasses.replace(server.config, settle_after_ingest=False)
        await server.restart()
        users = {phone.name: await ready_user(phone, server) for phone in system.phones}
        for phone in system.phones:
            for _ in range(2):
                await phone.run("grant", "request", "2", "--box", box.box_id, expect="grant")
        costs: dict[str, dict[str, int]] = defaultdict(dict)
        for _ in range(2):
            rounds = await asyncio.gather(
                *(session_at(phone, box, outlet) for outlet, phone in enumerate(system.phones, start=1))
            )
            for phone, ended in zip(system.phones, rounds, strict=True):
                costs[phone.name][ended["session_id"]] = ended["cost_fen"]
        carrier = system.phones[1]
        await carrier.run("visit", box.box_id, expect="visited")
        await carrier.run("sync", expect="synced")
        last_sequence = (await box_status(box))["last_sequence"]
        ledger = await server_ledger(operator, box.box_id)
        assert (ledger["contiguous_sequence"], ledger["applied_sequence"]) == (last_sequence, 0)
        assert last_sequence > 7  # more than one of the job's steps (it applies 7 entries a step)

        # The job is killed after its first committed step.
        url, keys = server.config.database_url, server.key_directory
        assert await asyncio.to_thread(reconcile_killed_after, url, keys, steps=1) == 1
        applied = (await server_ledger(operator, box.box_id))["applied_sequence"]
        assert 0 < applied < last_sequence

        # The server restarts while a reconcile request is in flight: it finishes or is cut off.
        in_flight = asyncio.create_task(operator.call("POST", "/v1/operator/reconcile"))
        await server.restart()
        try:
            finished = await in_flight
        except httpx.TransportError:  # refused or cut off by the restart: the job below does it
            finished = None
        if finished is not None:  # uvicorn let it finish first: it applied what the job had left
            assert finished["entries_applied"] == last_sequence - applied

        # Everything again, after the restart: the same entries carried twice, the job to the end.
        await system.phones[0].run("visit", box.box_id, expect="visited")
        synced = await system.phones[0].run("sync", expect="synced")
        assert synced["batches"][-1]["acked_sequence"] == last_sequence
        assert "books balance" in await asyncio.to_thread(reconcile_to_the_end, url, keys)
        ledger = await server_ledger(operator, box.box_id)
        assert (ledger["contiguous_sequence"], ledger["applied_sequence"]) == (last_sequence, last_sequence)

        for phone in system.phones:
            await settled_exactly_once(operator, users[phone.name], costs[phone.name])
            await phone.run("sync", expect="synced")
            held = (await phone.run("grants", "--all", expect="grants"))["grants"]
            charged = {g["session_id"]: g["charged_fen"] for g in held}
            assert charged == costs[phone.name]
        sessions = sum(len(c) for c in costs.values())
        revenue = sum(sum(c.values()) for c in costs.values())
        assert await daily_figures(operator, box.box_id) == (sessions, revenue)
        database = Database(url)
        try:
            async with database.connect() as connection:
                charges = await connection.execute(select(func.count()).select_from(grant_charges))
                assert charges.scalar_one() == sessions
        finally:
            await database.close()
        await assert_anomalies(operator)
        await reconcile_and_balance(operator)
