"""The server's signed objects work in the real protocol engines, and what the box writes settles:
provision a box, a phone gets grants, the phone and box run EDHOC and a session with a top-up
(protocol.session, protocol.testing.ScriptedBox), the box uploads its ledger, the user is charged."""

from __future__ import annotations

import itertools

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import cose, gatt, messages, testing
from protocol.session import MessageReceived, PhoneSession
from protocol.testing import SAMPLE_TIME, ConnectionPair, ScriptedBox
from protocol.tokens import EndReason, LedgerEntry, SessionReceipt
from tests.ledger_server.harness import Api, b64, unb64


async def test_a_real_conversation_settles_on_the_server(api: Api) -> None:
    box_key = testing.ed25519_key("end-to-end box")
    provisioned = await api.provision("BOX-7F3A21", box_key)
    await api.set_tariff(120)
    user = await api.shared_user()
    phone_key = await api.user_device(user)
    await api.top_up(user, 1000)
    grant = await api.grant(user, phone_key, 500, box_id="BOX-7F3A21")
    top_up = await api.grant(user, phone_key, 300)
    keys = await api.call("GET", "/v1/operator-keys")
    ring = {
        bytes.fromhex(k["key_id"]): Ed25519PublicKey.from_public_bytes(bytes.fromhex(k["public_key"]))
        for k in keys["signing_keys"]
    }

    ids = itertools.count(1)
    box = ScriptedBox(
        box_key=box_key,
        signed_certificate=unb64(provisioned["certificate"]),
        operator_keys=ring,
        box_id="BOX-7F3A21",
        ephemeral_keys=lambda: testing.x25519_key(f"box ephemeral {next(ids)}"),
        session_ids=lambda: b"session" + bytes([next(ids)]),
    )
    label = gatt.QrLabel.decode(provisioned["labels"][1]["label"])  # the QR code on outlet 2's door
    phone = PhoneSession(
        connection_id=0x0101,
        phone_key=phone_key,
        ephemeral_key=testing.x25519_key("phone ephemeral"),
        label=label,
        operator_keys=ring,
        att_mtu=247,
    )
    pair = ConnectionPair(phone, box)
    received: list[messages.Message] = []

    def pump(now: int) -> None:
        received.extend(event.message for event in pair.pump(now) if isinstance(event, MessageReceived))

    phone.connect()
    phone.send(
        messages.StartSession(request_id=phone.new_request_id(), outlet=label.outlet, grant=grant.signed)
    )
    pump(SAMPLE_TIME)
    (session_id,) = box.sessions
    phone.send(messages.TopUp(request_id=phone.new_request_id(), session_id=session_id, grant=top_up.signed))
    pump(SAMPLE_TIME + 60)
    box.now = SAMPLE_TIME + 3600
    box.meter(session_id, energy_wh=4000, power_w=1100)
    phone.send(messages.StopSession(request_id=phone.new_request_id(), session_id=session_id))
    pump(SAMPLE_TIME + 3600)

    ended = [m for m in received if isinstance(m, messages.SessionEnded)]
    assert [m.end_reason for m in ended] == [EndReason.USER_STOP]
    receipt = LedgerEntry.verify(ended[0].receipt, cose.key_ring(box_key.public_key()))
    assert isinstance(receipt.body, SessionReceipt)
    assert receipt.body.cost_fen == 480

    box_token = await api.box_token("BOX-7F3A21", box_key)
    result = await api.call(
        "POST", "/v1/box/ledger", token=box_token, json={"entries": [b64(e) for e in box.ledger]}
    )

    assert result["applied_sequence"] == len(box.ledger) == 2
    assert await api.balances(user) == {"available_fen": 1000 - 480, "frozen_fen": 0, "arrears_fen": 0}
    charged = {
        g["grant_id"]: g["charged_fen"] for g in await api.call("GET", "/v1/me/grants", token=user.token)
    }
    assert charged == {grant.grant_id.hex(): 480, top_up.grant_id.hex(): 0}
    assert await api.anomalies() == []
