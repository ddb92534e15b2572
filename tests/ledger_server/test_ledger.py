"""Ledger ingest and settlement over HTTP, on SQLite and PostgreSQL (DESIGN §6, S5-S7)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocol import cose, sealing, testing, tokens
from protocol.errors import ErrorCode
from protocol.tokens import ClockAdjustedBody, EntryKind, LedgerAck, TimeQuality
from tests.ledger_server.harness import START_TIME, Api, BoxLedger, User, b64, unb64


@dataclass(frozen=True, slots=True, kw_only=True)
class Site:
    user: User
    phone: Ed25519PrivateKey
    box_key: Ed25519PrivateKey
    ledger: BoxLedger
    box_token: str


async def site(api: Api, *, box_id: str = "BOX-A", deposit: int = 2000) -> Site:
    """A user with a phone and a deposit, a provisioned box, tariff version 1 at 120 fen/kWh."""
    user = await api.shared_user()
    phone = await api.user_device(user)
    await api.top_up(user, deposit)
    box_key = testing.ed25519_key(f"box {box_id}")
    await api.provision(box_id, box_key)
    if not (await api.call("GET", "/v1/operator/boxes", token=await api.operator()))[:-1]:
        await api.set_tariff(120)
    ledger = BoxLedger(box_id=box_id, key=box_key)
    ledger.boot()
    return Site(
        user=user, phone=phone, box_key=box_key, ledger=ledger, box_token=await api.box_token(box_id, box_key)
    )


async def operator_keys(api: Api) -> tuple[dict[bytes, Ed25519PublicKey], X25519PublicKey]:
    body = await api.call("GET", "/v1/operator-keys")
    ring = {
        bytes.fromhex(k["key_id"]): Ed25519PublicKey.from_public_bytes(bytes.fromhex(k["public_key"]))
        for k in body["signing_keys"]
    }
    return ring, X25519PublicKey.from_public_bytes(bytes.fromhex(body["encryption_public_key"]))


async def test_a_receipt_charges_its_grant_and_gives_back_the_rest(api: Api) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500, box_id="BOX-A")
    assert await api.balances(here.user) == {"available_fen": 1500, "frozen_fen": 500, "arrears_fen": 0}
    here.ledger.session(issued.grant, energy_wh=2000)  # 2 kWh at 120 fen/kWh: 240 fen

    result = await api.upload(here.box_token, here.ledger.entries)

    assert (result["stored"], result["contiguous_sequence"], result["applied_sequence"]) == (3, 3, 3)
    assert await api.balances(here.user) == {"available_fen": 1760, "frozen_fen": 0, "arrears_fen": 0}
    (grant,) = await api.call("GET", "/v1/me/grants", token=here.user.token)
    assert (grant["state"], grant["charged_fen"], grant["captured_fen"], grant["released_fen"]) == (
        "settled",
        240,
        240,
        260,
    )
    assert await api.anomalies() == []


async def test_the_same_entries_any_number_of_times_in_any_order_count_once(api: Api) -> None:
    here = await site(api, deposit=5000)
    for energy in (1000, 2500, 4000):
        issued = await api.grant(here.user, here.phone, 800)
        here.ledger.session(issued.grant, energy_wh=energy)
    entries = here.ledger.entries
    shuffled = random.Random(5).sample(entries * 3, k=len(entries) * 3)
    _, encryption_key = await operator_keys(api)

    for start in range(0, len(shuffled), 4):
        await api.upload(here.box_token, shuffled[start : start + 4])
        sealed = sealing.seal(
            cbor2.dumps(shuffled[start : start + 3]),
            recipient=encryption_key,
            ephemeral_key=testing.x25519_key(f"mule {start}"),
            iv=bytes(13),
        )
        await api.call("POST", "/v1/ledger/sealed", token=here.user.token, json={"sealed_batch": b64(sealed)})

    state = await api.call("GET", "/v1/operator/boxes/BOX-A/ledger", token=await api.operator())
    assert (state["contiguous_sequence"], state["applied_sequence"], state["waiting"]) == (7, 7, 0)
    charged = 120 + 300 + 480
    assert await api.balances(here.user) == {
        "available_fen": 5000 - charged,
        "frozen_fen": 0,
        "arrears_fen": 0,
    }
    assert await api.anomalies() == []


async def test_entries_ahead_of_a_gap_wait_for_it(api: Api) -> None:
    here = await site(api)
    first = await api.grant(here.user, here.phone, 500)
    here.ledger.session(first.grant, energy_wh=1000)
    second = await api.grant(here.user, here.phone, 500)
    here.ledger.session(second.grant, energy_wh=1000)

    ahead = await api.upload(here.box_token, here.ledger.entries[3:])
    assert (ahead["stored"], ahead["waiting"], ahead["contiguous_sequence"], ahead["ledger_ack"]) == (
        2,
        2,
        0,
        None,
    )
    assert (await api.reconcile())["gaps"] == 1
    (gap,) = await api.anomalies("gap")
    assert (gap["box_id"], gap["sequence"], gap["resolved_at"]) == ("BOX-A", 1, None)
    assert await api.balances(here.user) == {"available_fen": 1000, "frozen_fen": 1000, "arrears_fen": 0}

    filled = await api.upload(here.box_token, here.ledger.entries[:3])

    assert (filled["waiting"], filled["contiguous_sequence"], filled["applied_sequence"]) == (0, 5, 5)
    assert await api.balances(here.user) == {"available_fen": 1760, "frozen_fen": 0, "arrears_fen": 0}
    (gap,) = await api.anomalies("gap")
    assert gap["resolved_at"] is not None


async def test_each_batch_is_answered_with_an_operator_signed_ack_of_the_highest_contiguous_entry(
    api: Api,
) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500)
    here.ledger.session(issued.grant, energy_wh=10)
    ring, _ = await operator_keys(api)

    result = await api.upload(here.box_token, here.ledger.entries[:2])

    ack = LedgerAck.verify(unb64(result["ledger_ack"]), ring)
    assert (ack.box_id, ack.sequence, ack.entry_hash) == (
        "BOX-A",
        2,
        tokens.entry_hash(here.ledger.entries[1]),
    )


async def test_a_fork_becomes_an_anomaly_and_moves_no_money(api: Api) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500)
    here.ledger.session(issued.grant, energy_wh=1000)
    await api.upload(here.box_token, here.ledger.entries)
    before = await api.balances(here.user)
    forked = BoxLedger(box_id="BOX-A", key=here.box_key)
    forked.boot()
    forked.time = here.ledger.time
    forked.session(issued.grant, energy_wh=3000)  # the box signed another history for entries 2..3

    result = await api.upload(here.box_token, forked.entries)

    assert (result["forks"], result["duplicates"], result["stored"]) == (2, 1, 0)
    assert await api.balances(here.user) == before
    assert {a["sequence"] for a in await api.anomalies("fork")} == {2, 3}


async def test_a_grant_used_at_two_boxes_offline_is_charged_up_to_it_and_the_excess_is_arrears(
    api: Api,
) -> None:
    here = await site(api, deposit=500)
    there = await site(api, box_id="BOX-B")
    any_box = await api.grant(here.user, here.phone, 500)
    here.ledger.session(any_box.grant, energy_wh=3000)  # 360 fen
    there.ledger.session(any_box.grant, energy_wh=2500)  # 300 fen, at a box that could not know

    await api.upload(here.box_token, here.ledger.entries)
    await api.upload(there.box_token, there.ledger.entries)

    assert await api.balances(here.user) == {"available_fen": 140, "frozen_fen": 0, "arrears_fen": 300}
    (grant,) = await api.call("GET", "/v1/me/grants", token=here.user.token)
    assert (grant["charged_fen"], grant["captured_fen"], grant["excess_fen"]) == (660, 360, 300)
    (flag,) = await api.anomalies("double_spend")
    assert (flag["box_id"], flag["user_id"], flag["grant_id"]) == (
        "BOX-B",
        here.user.user_id,
        any_box.grant_id.hex(),
    )
    daily = await api.call(
        "GET",
        "/v1/operator/reports/daily",
        token=await api.operator(),
        params={"from_time": START_TIME, "to_time": START_TIME + 86_400},
    )
    assert {(row["box_id"], row["revenue_fen"]) for row in daily} == {("BOX-A", 360), ("BOX-B", 300)}

    # Arrears are paid first from the next top-up, and a grant waits until they are.
    assert await api.grant_refused(here.user, here.phone, 100, expect=409) == ErrorCode.ARREARS_OUTSTANDING
    await api.top_up(here.user, 1000)
    assert await api.balances(here.user) == {"available_fen": 840, "frozen_fen": 0, "arrears_fen": 0}


async def test_top_up_grants_are_charged_in_the_order_used(api: Api) -> None:
    here = await site(api)
    first = await api.grant(here.user, here.phone, 200)
    second = await api.grant(here.user, here.phone, 300)
    here.ledger.session(first.grant, top_ups=(second.grant,), energy_wh=3000)  # 360 fen

    await api.upload(here.box_token, here.ledger.entries)

    grants = {g["grant_id"]: g for g in await api.call("GET", "/v1/me/grants", token=here.user.token)}
    assert (grants[first.grant_id.hex()]["charged_fen"], grants[second.grant_id.hex()]["charged_fen"]) == (
        200,
        160,
    )
    assert await api.balances(here.user) == {"available_fen": 2000 - 360, "frozen_fen": 0, "arrears_fen": 0}


async def test_expired_unused_grants_are_released_by_reconcile(api: Api) -> None:
    here = await site(api)
    await api.grant(here.user, here.phone, 700, valid_seconds=60)
    api.clock.advance(61)

    summary = await api.reconcile()

    assert summary["grants_released"] == 1
    assert summary["books"]["balanced"]
    assert await api.balances(here.user) == {"available_fen": 2000, "frozen_fen": 0, "arrears_fen": 0}
    (grant,) = await api.call("GET", "/v1/me/grants", token=here.user.token)
    assert (grant["state"], grant["released_fen"]) == ("released", 700)
    assert (await api.reconcile())["grants_released"] == 0


async def test_a_grant_in_a_running_session_is_held_until_its_receipt(api: Api) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500, valid_seconds=60)
    here.ledger.session(issued.grant, energy_wh=1000, seconds=3600)
    await api.upload(here.box_token, here.ledger.entries[:2])  # started, not ended
    api.clock.advance(120)

    assert (await api.reconcile())["grants_released"] == 0
    assert (await api.balances(here.user))["frozen_fen"] == 500

    await api.upload(here.box_token, here.ledger.entries[2:])
    assert await api.balances(here.user) == {"available_fen": 1880, "frozen_fen": 0, "arrears_fen": 0}


async def test_a_receipt_after_its_grant_was_released_is_owed_as_arrears(api: Api) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500, valid_seconds=60)
    api.clock.advance(61)
    await api.reconcile()
    here.ledger.session(issued.grant, energy_wh=1000)  # the box was offline all along

    await api.upload(here.box_token, here.ledger.entries)

    assert await api.balances(here.user) == {"available_fen": 2000, "frozen_fen": 0, "arrears_fen": 120}
    (late,) = await api.anomalies("late_receipt")
    assert late["grant_id"] == issued.grant_id.hex()


async def test_cost_is_recomputed_never_above_the_tariff_the_grant_or_the_receipt(api: Api) -> None:
    here = await site(api)
    greedy = await api.grant(here.user, here.phone, 500)
    here.ledger.session(greedy.grant, energy_wh=1000, claimed_cost=400)  # tariff says 120
    modest = await api.grant(here.user, here.phone, 500)
    here.ledger.session(modest.grant, energy_wh=1000, claimed_cost=100)  # the box told the user 100
    small = await api.grant(here.user, here.phone, 50)
    here.ledger.session(small.grant, energy_wh=1000)  # 120 fen of energy, a 50 fen grant
    wrong_price = await api.grant(here.user, here.phone, 500)
    here.ledger.session(wrong_price.grant, energy_wh=1000, price=150)  # tariff version 1 says 120

    await api.upload(here.box_token, here.ledger.entries)

    charged = {
        g["grant_id"]: g["charged_fen"] for g in await api.call("GET", "/v1/me/grants", token=here.user.token)
    }
    assert [charged[g.grant_id.hex()] for g in (greedy, modest, small, wrong_price)] == [120, 100, 50, 150]
    mismatches = await api.anomalies("cost_mismatch")
    assert {m["sequence"] for m in mismatches} == {3, 5, 9}


async def test_clock_trouble_is_flagged_but_settles(api: Api) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500)
    here.ledger.append(
        EntryKind.CLOCK_ADJUSTED, ClockAdjustedBody(previous_time=here.ledger.time, new_time=100)
    )
    here.ledger.time = 1000  # the clock went back: every later entry is stamped before entry 1
    here.ledger.session(issued.grant, energy_wh=1000)

    await api.upload(here.box_token, here.ledger.entries)

    kinds = {a["detail"].split(" ")[0] for a in await api.anomalies("clock")}
    assert kinds == {"entry"}
    assert len(await api.anomalies("clock")) >= 3
    assert (await api.balances(here.user))["available_fen"] == 1880


async def test_an_unsynced_receipt_is_flagged(api: Api) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500)
    here.ledger.session(issued.grant, energy_wh=1000)
    receipt = tokens.LedgerEntry.decode_unverified(here.ledger.entries.pop())
    here.ledger.append(receipt.kind, receipt.body, quality=TimeQuality.UNKNOWN, time=receipt.time)

    await api.upload(here.box_token, here.ledger.entries)

    (flag,) = await api.anomalies("clock")
    assert flag["sequence"] == 3


async def test_a_grant_this_server_never_issued_is_flagged_and_charges_nobody(api: Api) -> None:
    here = await site(api)
    stranger = testing.sample_grant(here.phone, grant_id=b"unknown!", box_id=None)
    here.ledger.session(stranger, energy_wh=1000)

    await api.upload(here.box_token, here.ledger.entries)

    assert {a["grant_id"] for a in await api.anomalies("unknown_grant")} == {b"unknown!".hex()}
    assert await api.balances(here.user) == {"available_fen": 2000, "frozen_fen": 0, "arrears_fen": 0}


async def test_a_mule_carries_a_sealed_batch_and_brings_back_the_ack(api: Api) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500)
    here.ledger.session(issued.grant, energy_wh=2000)
    ring, encryption_key = await operator_keys(api)
    sealed = sealing.seal(
        cbor2.dumps(here.ledger.entries),
        recipient=encryption_key,
        ephemeral_key=testing.x25519_key("mule"),
        iv=bytes(13),
    )
    mule = await api.shared_user()

    (result,) = await api.call(
        "POST", "/v1/ledger/sealed", token=mule.token, json={"sealed_batch": b64(sealed)}
    )

    assert LedgerAck.verify(unb64(result["ledger_ack"]), ring).sequence == 3
    assert (await api.balances(here.user))["available_fen"] == 1760
    assert await api.balances(mule) == {"available_fen": 0, "frozen_fen": 0, "arrears_fen": 0}


async def test_outlet_availability_follows_the_ledger(api: Api) -> None:
    here = await site(api)
    issued = await api.grant(here.user, here.phone, 500)
    here.ledger.session(issued.grant, energy_wh=1000, outlet=2)
    await api.upload(here.box_token, here.ledger.entries[:2])

    def outlets(found: list[dict[str, Any]]) -> dict[int, bool | None]:
        (box,) = found
        return {o["number"]: o["available"] for o in box["outlets"]}

    near = {"latitude_microdeg": 31_230_416, "longitude_microdeg": 121_473_701, "radius_m": 100}
    assert outlets(await api.call("GET", "/v1/boxes/nearby", token=here.user.token, params=near))[2] is False
    await api.upload(here.box_token, here.ledger.entries[2:])
    assert outlets(await api.call("GET", "/v1/boxes/nearby", token=here.user.token, params=near))[2] is True


def test_signing_key_of_a_scripted_box_is_its_ledger_key() -> None:
    # The BoxLedger helper signs exactly as protocol.testing.ScriptedBox does.
    key = testing.ed25519_key("box")
    ledger = BoxLedger(box_id="BOX-1", key=key)
    ledger.boot()
    assert tokens.LedgerEntry.verify(ledger.entries[0], cose.key_ring(key.public_key())).sequence == 1
