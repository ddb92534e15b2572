"""Statements, invoices (stored, printable) and the operator's daily report."""

from __future__ import annotations

from protocol import testing
from protocol.errors import ErrorCode
from tests.ledger_server.harness import START_TIME, Api, BoxLedger


async def test_statement_invoice_and_daily_report(api: Api) -> None:
    user = await api.shared_user()
    phone = await api.user_device(user)
    await api.top_up(user, 2000)
    await api.set_tariff(120)
    boxes = {}
    for box_id in ("BOX-1", "BOX-2"):
        key = testing.ed25519_key(f"report {box_id}")
        await api.provision(box_id, key)
        boxes[box_id] = (BoxLedger(box_id=box_id, key=key), await api.box_token(box_id, key))
    sessions = []
    for box_id, energy in (("BOX-1", 2000), ("BOX-2", 1500), ("BOX-1", 500)):
        ledger, _ = boxes[box_id]
        issued = await api.grant(user, phone, 400)
        sessions.append((box_id, ledger.session(issued.grant, energy_wh=energy, seconds=3600)))
        ledger.time += 86_400  # one session a day per box
    for ledger, token in boxes.values():
        await api.upload(token, ledger.entries)

    statement = await api.call("GET", "/v1/me/statement", token=user.token)
    assert statement["balances"] == {
        "available_fen": 2000 - 240 - 180 - 60,
        "frozen_fen": 0,
        "arrears_fen": 0,
    }
    available = [
        (line["kind"], line["amount_fen"]) for line in statement["lines"] if line["account"] == "available"
    ]
    assert available[0] == ("deposit", 2000)
    assert sum(amount for _, amount in available) == 1520
    assert [(s["box_id"], s["energy_wh"], s["cost_fen"], s["invoiced"]) for s in statement["sessions"]] == [
        ("BOX-1", 2000, 240, False),
        ("BOX-2", 1500, 180, False),
        ("BOX-1", 500, 60, False),
    ]

    chosen = [{"box_id": box_id, "session_id": session_id.hex()} for box_id, session_id in sessions[:2]]
    invoice = await api.call(
        "POST", "/v1/me/invoices", token=user.token, json={"sessions": chosen}, expect=201
    )
    assert (invoice["total_fen"], invoice["energy_wh"]) == (420, 3500)
    page = await api.call("GET", invoice["html_url"], token=user.token)
    assert invoice["number"] in page
    assert "¥4.20" in page
    assert "3.500" in page
    again = await api.error(
        "POST", "/v1/me/invoices", token=user.token, json={"sessions": chosen[1:]}, expect=409
    )
    assert again == ErrorCode.API_CONFLICT
    assert [i["number"] for i in await api.call("GET", "/v1/me/invoices", token=user.token)] == [
        invoice["number"]
    ]
    fetched = await api.call("GET", f"/v1/me/invoices/{invoice['number']}", token=user.token)
    assert fetched == invoice
    statement = await api.call("GET", "/v1/me/statement", token=user.token)
    assert [s["invoiced"] for s in statement["sessions"]] == [True, True, False]

    operator = await api.operator()
    daily = await api.call(
        "GET",
        "/v1/operator/reports/daily",
        token=operator,
        params={"from_time": START_TIME, "to_time": START_TIME + 3 * 86_400},
    )
    assert [
        (row["day"], row["box_id"], row["sessions"], row["energy_wh"], row["revenue_fen"]) for row in daily
    ] == [
        ("2026-11-18", "BOX-1", 1, 2000, 240),
        ("2026-11-18", "BOX-2", 1, 1500, 180),
        ("2026-11-19", "BOX-1", 1, 500, 60),
    ]
    as_operator = await api.call("GET", f"/v1/operator/users/{user.user_id}/statement", token=operator)
    assert as_operator["sessions"] == statement["sessions"]
