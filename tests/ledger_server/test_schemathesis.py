"""Schemathesis against the published OpenAPI document: whatever it generates, valid or not, the
server never answers 5xx (S4). Each operation is called as the kind of caller it is for (the
authorization tests cover the wrong callers), on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings

from protocol import testing
from tests.ledger_server.conftest import RunningServer, api_for
from tests.ledger_server.test_authorization import ALLOWED, PUBLIC, ROLES

EXAMPLES = 250


async def callers(server: RunningServer) -> dict[str, dict[str, str]]:
    """Headers for a user with a phone and money, the operator, a technician and a box."""
    async with api_for(server) as api:
        user = await api.shared_user()
        phone = await api.user_device(user)
        await api.top_up(user, 10_000)
        await api.set_tariff(120)
        box_key = testing.ed25519_key("fuzzed box")
        await api.provision("BOX-1", box_key)
        await api.grant(user, phone, 100)
        technician = await api.staff("fuzz.tech", "technician")
        tokens = {
            "user": user.token,
            "operator": await api.operator(),
            "technician": technician.token,
            "box": await api.box_token("BOX-1", box_key),
        }
    return {"nobody": {}} | {who: {"Authorization": f"Bearer {token}"} for who, token in tokens.items()}


def caller_for(method: str, path: str) -> str:
    who = ROLES[(method, path)]
    return "nobody" if who == PUBLIC else min(ALLOWED[who])


def test_no_generated_request_gets_a_server_error(server: RunningServer) -> None:
    headers = asyncio.run(callers(server))
    spec = httpx.get(f"{server.base_url}/openapi.json").json()
    # Logging out would end the very tokens the other cases use.
    schema = schemathesis.openapi.from_dict(spec).exclude(path="/v1/auth/logout")
    failures: list[str] = []

    for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=schema.as_strategy(generation_mode=mode))
        def call(case: Any) -> None:
            who = caller_for(case.method.upper(), case.operation.path)
            response = case.call(base_url=server.base_url, headers=headers[who], timeout=30)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} as {who}: {response.status_code} {response.text}"
                )

        call()

    assert failures == []
