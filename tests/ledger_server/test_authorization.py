"""S8: every endpoint authenticates its caller, allows only its roles, and nobody reads or changes
another's data. The role table below must name every operation of the OpenAPI document."""

from __future__ import annotations

import re
from typing import Any

from protocol import testing
from protocol.errors import ErrorCode
from protocol.tokens import Door, UnlockToken
from tests.ledger_server.harness import Api, BoxLedger, key_hex, unb64

PUBLIC = "public"
ANYONE = "any token"
USER = "user"
PERSON = "user, operator or technician"
STAFF = "operator or technician"
OPERATOR = "operator"
BOX = "box"

# (method, path) -> who may call it
ROLES: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): PUBLIC,
    ("GET", "/v1/operator-keys"): PUBLIC,
    ("POST", "/v1/auth/shared/code"): PUBLIC,
    ("POST", "/v1/auth/shared/token"): PUBLIC,
    ("POST", "/v1/auth/account/code"): PUBLIC,
    ("POST", "/v1/auth/account/token"): PUBLIC,
    ("POST", "/v1/auth/staff/token"): PUBLIC,
    ("POST", "/v1/auth/box/challenge"): PUBLIC,
    ("POST", "/v1/auth/box/token"): PUBLIC,
    ("POST", "/v1/auth/logout"): ANYONE,
    ("GET", "/v1/revocations/latest"): ANYONE,
    ("GET", "/v1/tariffs/latest"): ANYONE,
    ("GET", "/v1/me"): USER,
    ("POST", "/v1/me/top-ups"): USER,
    ("POST", "/v1/me/withdrawals"): USER,
    ("POST", "/v1/me/grants"): USER,
    ("GET", "/v1/me/grants"): USER,
    ("POST", "/v1/me/reservations"): USER,
    ("GET", "/v1/me/statement"): USER,
    ("POST", "/v1/me/invoices"): USER,
    ("GET", "/v1/me/invoices"): USER,
    ("GET", "/v1/me/invoices/{number}"): USER,
    ("GET", "/v1/me/invoices/{number}/html"): USER,
    ("POST", "/v1/me/devices"): PERSON,
    ("GET", "/v1/me/devices"): PERSON,
    ("GET", "/v1/boxes/nearby"): PERSON,
    ("POST", "/v1/ledger/sealed"): PERSON,
    ("POST", "/v1/technician/unlock-tokens"): STAFF,
    ("POST", "/v1/operator/staff"): OPERATOR,
    ("POST", "/v1/operator/boxes"): OPERATOR,
    ("GET", "/v1/operator/boxes"): OPERATOR,
    ("GET", "/v1/operator/boxes/{box_id}"): OPERATOR,
    ("GET", "/v1/operator/boxes/{box_id}/ledger"): OPERATOR,
    ("POST", "/v1/operator/boxes/{box_id}/commands"): OPERATOR,
    ("GET", "/v1/operator/boxes/{box_id}/commands"): OPERATOR,
    ("POST", "/v1/operator/revocations"): OPERATOR,
    ("POST", "/v1/operator/tariffs"): OPERATOR,
    ("GET", "/v1/operator/anomalies"): OPERATOR,
    ("POST", "/v1/operator/reconcile"): OPERATOR,
    ("GET", "/v1/operator/books"): OPERATOR,
    ("GET", "/v1/operator/reports/daily"): OPERATOR,
    ("GET", "/v1/operator/users/{user_id}/statement"): OPERATOR,
    ("POST", "/v1/box/poll"): BOX,
    ("POST", "/v1/box/ledger"): BOX,
}

ALLOWED = {
    ANYONE: {"user", "operator", "technician", "box"},
    USER: {"user"},
    PERSON: {"user", "operator", "technician"},
    STAFF: {"operator", "technician"},
    OPERATOR: {"operator"},
    BOX: {"box"},
}


async def test_the_role_table_names_every_operation(sqlite_api: Api) -> None:
    spec = await sqlite_api.call("GET", "/openapi.json")
    operations = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert operations == set(ROLES)


def _concrete(path: str) -> str:
    return re.sub(
        r"\{[a-z_]+\}",
        lambda m: {"{user_id}": "1", "{box_id}": "BOX-Z"}.get(m.group(0), "INV-000001-0001"),
        path,
    )


async def test_each_endpoint_refuses_callers_without_a_token_or_the_role(sqlite_api: Api) -> None:
    api = sqlite_api
    box_key = testing.ed25519_key("authorization box")
    await api.provision("BOX-Z", box_key)
    tokens = {
        "user": (await api.shared_user()).token,
        "operator": await api.operator(),
        "technician": (await api.staff("tech.auth", "technician")).token,
        "box": await api.box_token("BOX-Z", box_key),
    }
    failures = []
    for (method, path), who in sorted(ROLES.items()):
        if who == PUBLIC or path == "/v1/auth/logout":
            continue
        url = _concrete(path)
        body: Any = {} if method == "POST" else None
        response = await api.client.request(method, url, json=body)
        if response.status_code != 401 or response.json()["error"]["code"] != ErrorCode.API_UNAUTHENTICATED:
            failures.append(f"{method} {path} without a token: {response.status_code}")
        for role, token in tokens.items():
            response = await api.client.request(
                method, url, json=body, headers={"Authorization": f"Bearer {token}"}
            )
            refused = (
                response.status_code == 403 and response.json()["error"]["code"] == ErrorCode.API_FORBIDDEN
            )
            if (role in ALLOWED[who]) == refused:
                failures.append(f"{method} {path} as {role}: {response.status_code}")
    assert failures == []


async def test_nobody_reads_or_uses_another_users_things(api: Api) -> None:
    alice, bob = await api.shared_user(), await api.shared_user()
    alice_phone = await api.user_device(alice)
    await api.user_device(bob)
    for user in (alice, bob):
        await api.top_up(user, 1000)
    box_key = testing.ed25519_key("shared box")
    await api.provision("BOX-S", box_key)
    await api.set_tariff(120)
    issued = await api.grant(alice, alice_phone, 500)
    ledger = BoxLedger(box_id="BOX-S", key=box_key)
    session_id = ledger.session(issued.grant, energy_wh=1000)
    await api.upload(await api.box_token("BOX-S", box_key), ledger.entries)
    invoice = await api.call(
        "POST",
        "/v1/me/invoices",
        token=alice.token,
        json={"sessions": [{"box_id": "BOX-S", "session_id": session_id.hex()}]},
        expect=201,
    )

    # Bob sees none of it...
    assert await api.call("GET", "/v1/me/grants", token=bob.token) == []
    assert await api.call("GET", "/v1/me/invoices", token=bob.token) == []
    for path in (f"/v1/me/invoices/{invoice['number']}", f"/v1/me/invoices/{invoice['number']}/html"):
        assert await api.error("GET", path, token=bob.token, expect=404) == ErrorCode.API_NOT_FOUND
    statement = await api.call("GET", "/v1/me/statement", token=bob.token)
    assert statement["sessions"] == []
    assert {line["kind"] for line in statement["lines"]} == {"deposit"}
    # ...cannot invoice Alice's session...
    refused = await api.error(
        "POST",
        "/v1/me/invoices",
        token=bob.token,
        json={"sessions": [{"box_id": "BOX-S", "session_id": session_id.hex()}]},
        expect=404,
    )
    assert refused == ErrorCode.API_NOT_FOUND
    # ...nor get a grant or a reservation bound to Alice's phone.
    assert await api.grant_refused(bob, alice_phone, 100, expect=404) == ErrorCode.DEVICE_UNKNOWN
    refused = await api.error(
        "POST",
        "/v1/me/reservations",
        token=bob.token,
        json={
            "box_id": "BOX-S",
            "outlet": 1,
            "phone_key": key_hex(alice_phone),
            "starts_at": api.clock.now,
            "duration_seconds": 600,
        },
        expect=404,
    )
    assert refused == ErrorCode.DEVICE_UNKNOWN
    assert (await api.balances(bob))["available_fen"] == 1000


async def test_a_technician_gets_unlock_tokens_only_for_their_own_phone(api: Api) -> None:
    box_key = testing.ed25519_key("technician box")
    await api.provision("BOX-T", box_key)
    first = await api.staff("tech.first", "technician")
    second = await api.staff("tech.second", "technician")
    phone = await api.device(first.token, f"staff:{first.staff_id}", "technician phone")
    body = {
        "box_id": "BOX-T",
        "door": "metering_box",
        "outlet": 0,
        "phone_key": key_hex(phone),
        "valid_seconds": 600,
    }

    issued = await api.call("POST", "/v1/technician/unlock-tokens", token=first.token, json=body, expect=201)
    refused = await api.error(
        "POST", "/v1/technician/unlock-tokens", token=second.token, json=body, expect=404
    )

    assert refused == ErrorCode.DEVICE_UNKNOWN
    token = UnlockToken.decode_unverified(unb64(issued["signed"]))
    assert (token.box_id, token.door, token.holder_id) == ("BOX-T", Door.METERING_BOX, first.staff_id)
    assert token.expires_at - token.not_before == 600
