"""S4: bad input (malformed CBOR, forged signatures, huge batches, unknown boxes) gets a clear 4xx
with an error code and changes nothing: no entry stored, no money moved. A forgery is kept as
evidence in the anomaly list, which is the only thing it adds."""

from __future__ import annotations

from typing import Any

import cbor2
import pytest

from protocol import sealing, testing
from protocol.errors import ErrorCode
from tests.ledger_server.harness import Api, BoxLedger, User, b64


async def snapshot(api: Api, user: User) -> tuple[Any, ...]:
    operator = await api.operator()
    books = await api.books()
    ledger = await api.call("GET", "/v1/operator/boxes/BOX-X/ledger", token=operator)
    return (
        books["transactions"],
        books["transfers"],
        ledger["contiguous_sequence"],
        ledger["applied_sequence"],
        ledger["waiting"],
        await api.balances(user),
    )


@pytest.fixture
async def scene(api: Api) -> tuple[Api, User, BoxLedger, str]:
    """A box with entries 1..3 stored and settled, entries 4..5 written but not yet uploaded."""
    user = await api.shared_user()
    phone = await api.user_device(user)
    await api.top_up(user, 1000)
    await api.set_tariff(120)
    key = testing.ed25519_key("box x")
    await api.provision("BOX-X", key)
    ledger = BoxLedger(box_id="BOX-X", key=key)
    ledger.boot()
    ledger.session((await api.grant(user, phone, 300)).grant, energy_wh=1000)
    ledger.session((await api.grant(user, phone, 300)).grant, energy_wh=1000)
    token = await api.box_token("BOX-X", key)
    await api.upload(token, ledger.entries[:3])
    return api, user, ledger, token


async def refused(api: Api, token: str, entries: list[str], status: int) -> int:
    return await api.error("POST", "/v1/box/ledger", token=token, json={"entries": entries}, expect=status)


async def test_malformed_cbor_is_refused_with_its_code(scene: tuple[Api, User, BoxLedger, str]) -> None:
    api, user, ledger, token = scene
    before = await snapshot(api, user)
    good = [b64(e) for e in ledger.entries[3:]]
    for garbage in (
        b"",
        b"\xff",
        b"\xd2\x84",
        cbor2.dumps([1, 2, 3]),
        cbor2.dumps({"a": 1}),
        ledger.entries[3][:-1],
    ):
        assert await refused(api, token, [*good, b64(garbage)], 400) == ErrorCode.TOKEN_MALFORMED
    assert await refused(api, token, ["not base64!"], 422) == ErrorCode.API_MALFORMED
    assert await refused(api, token, ["QUJ"], 400) == ErrorCode.API_MALFORMED  # not padded to 4
    assert await snapshot(api, user) == before


async def test_a_forged_entry_refuses_the_whole_batch_and_is_kept_as_evidence(
    scene: tuple[Api, User, BoxLedger, str],
) -> None:
    api, user, ledger, token = scene
    before = await snapshot(api, user)
    forger = BoxLedger(box_id="BOX-X", key=testing.ed25519_key("not box x"))
    forger.boot()
    tampered = bytearray(ledger.entries[4])
    tampered[-5] ^= 0x40

    for bad in (forger.entries[0], bytes(tampered)):
        code = await refused(api, token, [b64(ledger.entries[3]), b64(bad)], 400)
        assert code == ErrorCode.LEDGER_BAD_SIGNATURE

    assert await snapshot(api, user) == before
    assert len(await api.anomalies("bad_signature")) == 2
    await api.upload(token, ledger.entries[3:])  # the genuine entries still go in afterwards


async def test_huge_batches_and_bodies_are_refused(scene: tuple[Api, User, BoxLedger, str]) -> None:
    api, user, ledger, token = scene
    before = await snapshot(api, user)
    many = [b64(ledger.entries[0])] * 2001
    assert await refused(api, token, many, 413) == ErrorCode.API_TOO_LARGE
    assert await refused(api, token, many * 5, 422) == ErrorCode.API_MALFORMED  # past the schema's limit
    body = {"entries": ["A" * 3_000_000]}
    assert (
        await api.error("POST", "/v1/box/ledger", token=token, json=body, expect=413)
        == ErrorCode.API_TOO_LARGE
    )
    assert await snapshot(api, user) == before


async def test_entries_of_an_unknown_box_are_refused_and_listed(
    scene: tuple[Api, User, BoxLedger, str],
) -> None:
    api, user, _, _ = scene
    before = await snapshot(api, user)
    stranger = BoxLedger(box_id="BOX-NOBODY", key=testing.ed25519_key("nobody"))
    stranger.boot()
    keys = await api.call("GET", "/v1/operator-keys")
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

    recipient = X25519PublicKey.from_public_bytes(bytes.fromhex(keys["encryption_public_key"]))
    sealed = sealing.seal(
        cbor2.dumps(stranger.entries),
        recipient=recipient,
        ephemeral_key=testing.x25519_key("e"),
        iv=bytes(13),
    )

    code = await api.error(
        "POST", "/v1/ledger/sealed", token=user.token, json={"sealed_batch": b64(sealed)}, expect=422
    )

    assert code == ErrorCode.LEDGER_UNKNOWN_BOX
    assert [a["box_id"] for a in await api.anomalies("unknown_box")] == ["BOX-NOBODY"]
    assert await snapshot(api, user) == before


async def test_a_box_uploads_its_own_entries_only(scene: tuple[Api, User, BoxLedger, str]) -> None:
    api, user, ledger, _ = scene
    before = await snapshot(api, user)
    other_key = testing.ed25519_key("box y")
    await api.provision("BOX-Y", other_key)
    other_token = await api.box_token("BOX-Y", other_key)
    assert (
        await refused(api, other_token, [b64(e) for e in ledger.entries[3:]], 403) == ErrorCode.API_FORBIDDEN
    )
    assert await snapshot(api, user) == before


async def test_sealed_batches_that_do_not_open_are_refused(scene: tuple[Api, User, BoxLedger, str]) -> None:
    api, user, ledger, _ = scene
    before = await snapshot(api, user)
    sealed_to_a_stranger = sealing.seal(
        cbor2.dumps(ledger.entries[3:]),
        recipient=testing.x25519_key("not the operator").public_key(),
        ephemeral_key=testing.x25519_key("e"),
        iv=bytes(13),
    )
    cases = [
        (sealed_to_a_stranger, ErrorCode.TOKEN_UNKNOWN_KEY),
        (b"\x00garbage", ErrorCode.TOKEN_MALFORMED),
        (cbor2.dumps(cbor2.CBORTag(96, [b"", {}, b"", []])), ErrorCode.TOKEN_MALFORMED),
    ]
    for sealed, expected in cases:
        code = await api.error(
            "POST", "/v1/ledger/sealed", token=user.token, json={"sealed_batch": b64(sealed)}, expect=400
        )
        assert code == expected
    assert await snapshot(api, user) == before


async def test_bodies_that_do_not_match_the_schema_are_refused(
    scene: tuple[Api, User, BoxLedger, str],
) -> None:
    api, user, _, token = scene
    before = await snapshot(api, user)
    bodies: list[object] = [
        {"entries": []},
        {"entries": "AAAA"},
        {"entries": [1, 2]},
        {"entries": ["AAAA"], "x": 1},
        [],
        None,
    ]
    for body in bodies:
        assert (
            await api.error("POST", "/v1/box/ledger", token=token, json=body, expect=422)
            == ErrorCode.API_MALFORMED
        )
    assert await snapshot(api, user) == before
