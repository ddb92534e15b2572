"""The HTTP client's error translation, against a stand-in transport: the server's error bodies
keep their codes, a dead network or a proxy's page become clear errors, odd answers are refused."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import httpx
import pytest

from phone_client.errors import (
    PrerequisiteError,
    ServerAnswerError,
    ServerRefusedError,
    ServerUnreachableError,
)
from phone_client.server_api import AccessToken, ServerApi, check_server_url
from protocol import cose, proofs, testing
from protocol.errors import ErrorCode

BASE = "http://settlement.test"


def api(handler: Callable[[httpx.Request], httpx.Response], token: str | None = "t0ken") -> ServerApi:
    return ServerApi(BASE, token=token, transport=httpx.MockTransport(handler))


def error_body(code: ErrorCode, detail: str) -> dict[str, object]:
    return {"error": {"code": int(code), "name": code.name, "detail": detail}}


async def test_an_error_body_keeps_the_servers_code_and_detail() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer t0ken"
        return httpx.Response(
            409, json=error_body(ErrorCode.INSUFFICIENT_FUNDS, "deposit 100 fen, asked 500")
        )

    async with api(refuse) as client:
        with pytest.raises(ServerRefusedError) as refused:
            await client.me()
    assert refused.value.code is ErrorCode.INSUFFICIENT_FUNDS
    assert refused.value.status == 409
    assert "asked 500" in refused.value.detail


async def test_bodies_without_an_error_are_judged_by_their_status() -> None:
    async with api(lambda request: httpx.Response(401, text="<html>login</html>")) as client:
        with pytest.raises(ServerRefusedError) as unauthorised:
            await client.me()
    assert unauthorised.value.code is ErrorCode.API_UNAUTHENTICATED
    async with api(lambda request: httpx.Response(502, text="bad gateway")) as client:
        with pytest.raises(ServerUnreachableError):
            await client.grants()
    newer = {"error": {"code": 899, "name": "SOMETHING_NEW", "detail": "later"}}
    async with api(lambda request: httpx.Response(403, json=newer)) as client:
        with pytest.raises(ServerRefusedError) as unknown_code:
            await client.grants()
    assert unknown_code.value.code is ErrorCode.API_FORBIDDEN


async def test_no_network_is_a_clear_error_and_an_idempotent_request_is_retried_once() -> None:
    attempts: list[str] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        attempts.append(json.loads(request.content)["idempotency_key"])
        if len(attempts) == 1:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(
            200,
            json={
                "payment_id": 7,
                "kind": "top_up",
                "amount_fen": 500,
                "provider_reference": "dev-1",
                "balances": {"available_fen": 500, "frozen_fen": 0, "arrears_fen": 0},
            },
        )

    async with api(flaky) as client:
        payment = await client.top_up(500, "key-1")
    assert payment.balances.available_fen == 500
    assert attempts == ["key-1", "key-1"]  # the same key: the provider pays once

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    async with api(down) as client:
        with pytest.raises(ServerUnreachableError, match="cannot reach"):
            await client.statement()

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    async with api(slow) as client:
        with pytest.raises(ServerUnreachableError, match="in time"):
            await client.grants()


async def test_answers_that_are_not_what_the_api_says_are_refused() -> None:
    async with api(lambda request: httpx.Response(200, text="not json")) as client:
        with pytest.raises(ServerAnswerError):
            await client.me()
    async with api(lambda request: httpx.Response(200, json={"user_id": "seven"})) as client:
        with pytest.raises(ServerAnswerError, match="user_id"):
            await client.me()
    async with api(lambda request: httpx.Response(200, json=[{"grant_id": "zz"}])) as client:
        with pytest.raises(ServerAnswerError):
            await client.grants()


async def test_missing_lists_and_logins_and_bad_urls() -> None:
    missing = error_body(ErrorCode.API_NOT_FOUND, "no tariff table issued yet")
    async with api(lambda request: httpx.Response(404, json=missing)) as client:
        assert await client.latest_tariff() is None
    async with api(lambda request: httpx.Response(200, json={}), token=None) as client:
        with pytest.raises(PrerequisiteError) as not_logged_in:
            await client.me()
    assert not_logged_in.value.code is ErrorCode.API_UNAUTHENTICATED
    for bad in ("settlement.test", "ftp://settlement.test", "http://"):
        with pytest.raises(PrerequisiteError):
            check_server_url(bad)
    assert check_server_url("https://settlement.test/") == "https://settlement.test"


async def test_the_device_registration_carries_a_proof_of_the_key() -> None:
    key = testing.ed25519_key("proof phone")
    seen: dict[str, str] = {}

    def register(request: httpx.Request) -> httpx.Response:
        seen.update(json.loads(request.content))
        return httpx.Response(201, json={"public_key": seen["public_key"], "registered_at": 5})

    login = AccessToken(access_token="t0ken", expires_at=10, principal="user", subject="42", role="user")
    async with api(register) as client:
        assert await client.register_device(key, login) == 5
    proofs.verify_possession(
        base64.b64decode(seen["proof"]),
        context=proofs.ProofContext.DEVICE_REGISTRATION,
        subject="user:42",
        nonce=b"",
        public_key=key.public_key(),
    )
    assert seen["public_key"] == cose.public_key_bytes(key.public_key()).hex()
