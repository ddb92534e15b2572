"""The box uplink: one long-poll for revocations, tariffs, acks, reservations and remote commands."""

from __future__ import annotations

import asyncio

from protocol import testing
from protocol.tokens import Reservation, TariffTable
from tests.ledger_server.harness import Api, BoxLedger, key_hex, unb64


async def box(api: Api, box_id: str = "BOX-U") -> str:
    key = testing.ed25519_key(f"uplink {box_id}")
    await api.provision(box_id, key)
    return await api.box_token(box_id, key)


async def test_a_poll_with_nothing_new_says_so(api: Api) -> None:
    token = await box(api)
    reply = await api.call("POST", "/v1/box/poll", token=token, json={"wait_seconds": 0})
    assert reply == {
        "revocation_list": None,
        "tariff_table": None,
        "ledger_ack": None,
        "ack_sequence": 0,
        "reservations": None,
        "commands": [],
        "server_time": api.clock.now,
    }


async def test_a_waiting_poll_returns_with_a_new_tariff(api: Api) -> None:
    token = await box(api)
    await api.set_tariff(100)
    waiting = asyncio.create_task(
        api.call("POST", "/v1/box/poll", token=token, json={"tariff_version": 1, "wait_seconds": 30})
    )
    await asyncio.sleep(0.2)
    await api.set_tariff(130)

    reply = await waiting

    table = TariffTable.decode_unverified(unb64(reply["tariff_table"]["signed"]))
    assert (reply["tariff_table"]["version"], table.default_price_fen_per_kwh) == (2, 130)


async def test_remote_commands_are_sent_until_the_box_reports_them_done(api: Api) -> None:
    token = await box(api)
    other = await box(api, "BOX-V")
    operator = await api.operator()
    queued = await api.call(
        "POST",
        "/v1/operator/boxes/BOX-U/commands",
        token=operator,
        json={"kind": "trip", "outlet": 2},
        expect=201,
    )
    command_id = queued["command_id"]

    first = await api.call("POST", "/v1/box/poll", token=token, json={})
    again = await api.call("POST", "/v1/box/poll", token=token, json={"received_commands": [command_id]})
    # Another box cannot finish it.
    await api.call(
        "POST",
        "/v1/box/poll",
        token=other,
        json={"completed_commands": [{"command_id": command_id, "result": "done"}]},
    )
    still = await api.call("GET", "/v1/operator/boxes/BOX-U/commands", token=operator)
    done = await api.call(
        "POST",
        "/v1/box/poll",
        token=token,
        json={
            "completed_commands": [{"command_id": command_id, "result": "done", "detail": "outlet 2 tripped"}]
        },
    )

    assert [(c["kind"], c["outlet"]) for c in first["commands"]] == [("trip", 2)]
    assert [c["command_id"] for c in again["commands"]] == [command_id]
    assert still[0]["completed_at"] is None
    assert done["commands"] == []
    (finished,) = await api.call("GET", "/v1/operator/boxes/BOX-U/commands", token=operator)
    assert (finished["result"], finished["detail"]) == ("done", "outlet 2 tripped")


async def test_reservations_reach_the_box_until_it_holds_them(api: Api) -> None:
    token = await box(api)
    user = await api.shared_user()
    phone = await api.user_device(user)
    issued = await api.call(
        "POST",
        "/v1/me/reservations",
        token=user.token,
        json={
            "box_id": "BOX-U",
            "outlet": 3,
            "phone_key": key_hex(phone),
            "starts_at": api.clock.now,
            "duration_seconds": 600,
        },
        expect=201,
    )

    first = await api.call("POST", "/v1/box/poll", token=token, json={})
    held = await api.call(
        "POST", "/v1/box/poll", token=token, json={"known_reservations": [issued["token_id"]]}
    )

    (signed,) = first["reservations"]
    assert Reservation.decode_unverified(unb64(signed)).outlet == 3
    assert held["reservations"] is None
    api.clock.advance(601)
    expired = await api.call(
        "POST", "/v1/box/poll", token=token, json={"known_reservations": [issued["token_id"]]}
    )
    assert expired["reservations"] == []


async def test_the_newest_ack_and_reported_availability_travel_the_uplink(api: Api) -> None:
    key = testing.ed25519_key("uplink ack box")
    await api.provision("BOX-ACK", key)
    token = await api.box_token("BOX-ACK", key)
    ledger = BoxLedger(box_id="BOX-ACK", key=key)
    ledger.boot()
    ledger.boot()
    await api.upload(token, ledger.entries)
    user = await api.shared_user()

    reply = await api.call(
        "POST",
        "/v1/box/poll",
        token=token,
        json={
            "ack_sequence": 1,
            "outlets": [{"number": 1, "available": False}, {"number": 2, "available": True}],
        },
    )
    current = await api.call("POST", "/v1/box/poll", token=token, json={"ack_sequence": 2})

    assert (reply["ack_sequence"], reply["ledger_ack"] is not None) == (2, True)
    assert current["ledger_ack"] is None
    (found,) = await api.call(
        "GET",
        "/v1/boxes/nearby",
        token=user.token,
        params={"latitude_microdeg": 31_230_416, "longitude_microdeg": 121_473_701, "radius_m": 10},
    )
    assert [o["available"] for o in found["outlets"]] == [False, True, None, None]
    assert found["last_seen_at"] == api.clock.now
