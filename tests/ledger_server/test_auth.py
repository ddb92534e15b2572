"""Logging in: shared users, electricity-account users, staff and boxes; short-lived tokens."""

from __future__ import annotations

import asyncio

from ledger_server.db import Database
from ledger_server.providers import add_dev_electricity_account
from protocol import cose, proofs, testing
from protocol.errors import ErrorCode
from tests.ledger_server.conftest import RunningServer
from tests.ledger_server.harness import Api, b64, key_hex, unb64


async def test_a_shared_user_signs_up_with_a_texted_code_and_logs_in_again_as_the_same_user(api: Api) -> None:
    first = await api.shared_user("+8613900000001")
    again = await api.shared_user("+8613900000001")
    me = await api.call("GET", "/v1/me", token=again.token)
    assert (me["user_id"], me["kind"], me["phone"]) == (first.user_id, "shared", "+8613900000001")


async def test_a_wrong_code_is_refused_and_guessing_is_cut_off(api: Api) -> None:
    phone = "+8613900000002"
    await api.call("POST", "/v1/auth/shared/code", json={"phone": phone}, expect=202)
    code = api.sms.last_code(phone)
    assert code is not None
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    for _ in range(5):
        assert (
            await api.error("POST", "/v1/auth/shared/token", json={"phone": phone, "code": wrong}, expect=401)
            == ErrorCode.AUTH_FAILED
        )
    # Five wrong guesses used the code up: even the right one no longer works.
    refused = await api.error(
        "POST", "/v1/auth/shared/token", json={"phone": phone, "code": code}, expect=429
    )
    assert refused == ErrorCode.API_RATE_LIMITED


async def test_a_code_works_once_and_expires(api: Api) -> None:
    phone = "+8613900000003"
    await api.call("POST", "/v1/auth/shared/code", json={"phone": phone}, expect=202)
    code = api.sms.last_code(phone)
    await api.call("POST", "/v1/auth/shared/token", json={"phone": phone, "code": code})
    await api.error("POST", "/v1/auth/shared/token", json={"phone": phone, "code": code}, expect=401)

    await api.call("POST", "/v1/auth/shared/code", json={"phone": phone}, expect=202)
    api.clock.advance(301)
    code = api.sms.last_code(phone)
    await api.error("POST", "/v1/auth/shared/token", json={"phone": phone, "code": code}, expect=401)


async def test_codes_per_phone_are_rate_limited(api: Api) -> None:
    for _ in range(5):
        await api.call("POST", "/v1/auth/shared/code", json={"phone": "+8613900000004"}, expect=202)
    code = await api.error("POST", "/v1/auth/shared/code", json={"phone": "+8613900000004"}, expect=429)
    assert code == ErrorCode.API_RATE_LIMITED


async def test_an_electricity_account_user_binds_the_account_with_its_password_and_a_code(
    api: Api, server: RunningServer
) -> None:
    database = Database(server.database_url)
    try:
        await add_dev_electricity_account(
            database, number="3100123456", password="grid-pass", phone="+8613700000009"
        )
    finally:
        await database.close()
    refused = await api.error(
        "POST",
        "/v1/auth/account/code",
        json={"account_number": "3100123456", "password": "wrong"},
        expect=401,
    )
    assert refused == ErrorCode.AUTH_FAILED

    await api.call(
        "POST",
        "/v1/auth/account/code",
        json={"account_number": "3100123456", "password": "grid-pass"},
        expect=202,
    )
    code = api.sms.last_code("+8613700000009")  # texted to the account's phone
    body = await api.call(
        "POST",
        "/v1/auth/account/token",
        json={"account_number": "3100123456", "password": "grid-pass", "code": code},
    )
    me = await api.call("GET", "/v1/me", token=body["access_token"])
    assert (me["kind"], me["electricity_account"]) == ("account", "3100123456")

    # An account user pays from the electricity account: a grant draws what the deposit lacks.
    phone = await api.device(body["access_token"], f"user:{me['user_id']}", "account phone")
    await api.call(
        "POST",
        "/v1/me/grants",
        token=body["access_token"],
        json={
            "phone_key": key_hex(phone),
            "amount_fen": 800,
            "max_price_fen_per_kwh": 200,
            "idempotency_key": "first",
        },
        expect=201,
    )
    me = await api.call("GET", "/v1/me", token=body["access_token"])
    assert me["balances"] == {"available_fen": 0, "frozen_fen": 800, "arrears_fen": 0}


async def test_staff_log_in_with_a_password_and_get_their_role(api: Api) -> None:
    technician = await api.staff("tech.one", "technician")
    refused = await api.error(
        "POST", "/v1/auth/staff/token", json={"username": "tech.one", "password": "not-it"}, expect=401
    )
    assert refused == ErrorCode.AUTH_FAILED
    await api.error("GET", "/v1/operator/books", token=technician.token, expect=403)


async def test_a_box_logs_in_by_signing_a_fresh_nonce_with_its_key(api: Api) -> None:
    box_key = testing.ed25519_key("box login")
    await api.provision("BOX-LOGIN", box_key)
    token = await api.box_token("BOX-LOGIN", box_key)
    await api.call("POST", "/v1/box/poll", token=token, json={})

    challenge = await api.call("POST", "/v1/auth/box/challenge", json={"box_id": "BOX-LOGIN"})
    nonce = unb64(challenge["nonce"])
    impostor = proofs.sign_possession(
        context=proofs.ProofContext.BOX_UPLINK,
        subject="BOX-LOGIN",
        nonce=nonce,
        key=cose.SigningKey.from_private_key(testing.ed25519_key("not the box")),
    )
    body = {"box_id": "BOX-LOGIN", "nonce": challenge["nonce"], "proof": b64(impostor)}
    assert await api.error("POST", "/v1/auth/box/token", json=body, expect=401) == ErrorCode.AUTH_FAILED
    # The nonce was spent by the failed attempt: the right proof for it is refused too.
    genuine = proofs.sign_possession(
        context=proofs.ProofContext.BOX_UPLINK,
        subject="BOX-LOGIN",
        nonce=nonce,
        key=cose.SigningKey.from_private_key(box_key),
    )
    body["proof"] = b64(genuine)
    assert await api.error("POST", "/v1/auth/box/token", json=body, expect=401) == ErrorCode.AUTH_FAILED


async def test_tokens_expire_and_can_be_ended(api: Api) -> None:
    user = await api.shared_user()
    await api.call("GET", "/v1/me", token=user.token)
    await api.call("POST", "/v1/auth/logout", token=user.token, expect=204)
    assert await api.error("GET", "/v1/me", token=user.token, expect=401) == ErrorCode.API_UNAUTHENTICATED

    other = await api.shared_user()
    api.clock.advance(901)
    assert await api.error("GET", "/v1/me", token=other.token, expect=401) == ErrorCode.API_UNAUTHENTICATED


async def test_a_device_key_needs_proof_of_possession_and_belongs_to_one_person(api: Api) -> None:
    alice, bob = await api.shared_user(), await api.shared_user()
    key = await api.user_device(alice, "shared phone")
    # Bob presents Alice's key with a proof made for Alice: refused.
    proof = proofs.sign_possession(
        context=proofs.ProofContext.DEVICE_REGISTRATION,
        subject=f"user:{alice.user_id}",
        nonce=b"",
        key=cose.SigningKey.from_private_key(key),
    )
    refused = await api.error(
        "POST",
        "/v1/me/devices",
        token=bob.token,
        json={"public_key": key_hex(key), "proof": b64(proof)},
        expect=400,
    )
    assert refused == ErrorCode.API_MALFORMED
    # Even with a proof for Bob (someone holding the key), the key stays Alice's.
    proof = proofs.sign_possession(
        context=proofs.ProofContext.DEVICE_REGISTRATION,
        subject=f"user:{bob.user_id}",
        nonce=b"",
        key=cose.SigningKey.from_private_key(key),
    )
    refused = await api.error(
        "POST",
        "/v1/me/devices",
        token=bob.token,
        json={"public_key": key_hex(key), "proof": b64(proof)},
        expect=409,
    )
    assert refused == ErrorCode.API_CONFLICT
    devices = await api.call("GET", "/v1/me/devices", token=alice.token)
    assert [d["public_key"] for d in devices] == [key_hex(key)]
    assert await api.call("GET", "/v1/me/devices", token=bob.token) == []


def test_dev_sms_log_file_gives_the_code_to_another_process(tmp_path: object) -> None:
    from pathlib import Path

    from ledger_server.providers import DevSmsProvider, SmsMessage, last_code_in_log

    assert isinstance(tmp_path, Path)
    log = tmp_path / "sms.log"
    provider = DevSmsProvider(log)
    asyncio.run(provider.send(SmsMessage(phone="+861", text="Your powerbox code is 123456.")))
    asyncio.run(provider.send(SmsMessage(phone="+862", text="Your powerbox code is 654321.")))
    assert last_code_in_log(log, "+861") == "123456"
    assert last_code_in_log(log, "+863") is None
