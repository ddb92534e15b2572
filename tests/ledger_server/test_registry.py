"""Money in, grants out, and the operator's registry: boxes, revocations, tariffs, reservations."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import cose, gatt, testing
from protocol.authorization import check_box_certificate, check_grant
from protocol.errors import ErrorCode
from protocol.tokens import BoxCertificate, Reservation, RevocationList, TariffTable
from tests.ledger_server.harness import Api, key_hex, unb64


class NothingSpent:
    def is_spent(self, grant_id: bytes) -> bool:
        return False


async def operator_ring(api: Api) -> dict[bytes, Ed25519PublicKey]:
    body = await api.call("GET", "/v1/operator-keys")
    return {
        bytes.fromhex(k["key_id"]): Ed25519PublicKey.from_public_bytes(bytes.fromhex(k["public_key"]))
        for k in body["signing_keys"]
    }


async def test_top_ups_and_withdrawals_are_idempotent_per_key(api: Api) -> None:
    user = await api.shared_user()
    first = await api.top_up(user, 1000, key="salary")
    again = await api.top_up(user, 1000, key="salary")
    assert first["payment_id"] == again["payment_id"]
    refused = await api.error(
        "POST",
        "/v1/me/top-ups",
        token=user.token,
        json={"amount_fen": 5, "idempotency_key": "salary"},
        expect=409,
    )
    assert refused == ErrorCode.API_CONFLICT
    for _ in range(2):
        await api.call(
            "POST",
            "/v1/me/withdrawals",
            token=user.token,
            json={"amount_fen": 300, "idempotency_key": "rent"},
        )
    assert await api.balances(user) == {"available_fen": 700, "frozen_fen": 0, "arrears_fen": 0}
    refused = await api.error(
        "POST",
        "/v1/me/withdrawals",
        token=user.token,
        json={"amount_fen": 701, "idempotency_key": "more"},
        expect=409,
    )
    assert refused == ErrorCode.INSUFFICIENT_FUNDS


async def test_a_grant_freezes_first_and_a_box_accepts_it(api: Api) -> None:
    user = await api.shared_user()
    phone = await api.user_device(user)
    assert await api.grant_refused(user, phone, 100, expect=409) == ErrorCode.INSUFFICIENT_FUNDS
    await api.top_up(user, 600)

    issued = await api.grant(user, phone, 500, key="one")
    again = await api.grant(user, phone, 500, key="one")

    assert again.grant_id == issued.grant_id
    assert await api.balances(user) == {"available_fen": 100, "frozen_fen": 500, "arrears_fen": 0}
    assert await api.grant_refused(user, phone, 101, expect=409) == ErrorCode.INSUFFICIENT_FUNDS
    grant = check_grant(
        issued.signed,
        operator_keys=await operator_ring(api),
        box_id="ANY-BOX",
        connection_key=phone.public_key(),
        now=api.clock.now,
        revocations=None,
        price_fen_per_kwh=150,
        spent=NothingSpent(),
    )
    assert (grant.user_id, grant.amount_fen, grant.box_id) == (user.user_id, 500, None)
    assert cose.public_key_bytes(grant.phone_key) == cose.public_key_bytes(phone.public_key())
    assert len(issued.signed) <= 200


async def test_provisioning_signs_a_certificate_and_the_qr_labels_match_the_box_key(api: Api) -> None:
    box_key = testing.ed25519_key("provisioned box")
    body = await api.provision("SITE7-0042", box_key, outlets=2)

    ring = await operator_ring(api)
    for item in body["labels"]:
        label = gatt.QrLabel.decode(item["label"])
        certificate = check_box_certificate(
            unb64(body["certificate"]), operator_keys=ring, label=label, now=api.clock.now
        )
        assert isinstance(certificate, BoxCertificate)
    certificate = BoxCertificate.verify(unb64(body["certificate"]), ring)
    assert [(o.number, o.rated_power_w) for o in certificate.outlets] == [(1, 3500), (2, 3500)]
    assert body["advertised_name"] == gatt.advertised_name("SITE7-0042")

    again = await api.error(
        "POST",
        "/v1/operator/boxes",
        token=await api.operator(),
        json={
            "box_id": "SITE7-0042",
            "public_key": key_hex(testing.ed25519_key("another")),
            "outlets": [{"number": 1, "rated_power_w": 1000}],
            "latitude_microdeg": 0,
            "longitude_microdeg": 0,
            "tariff_region": "X",
        },
        expect=409,
    )
    assert again == ErrorCode.API_CONFLICT


async def test_revocation_lists_and_tariff_tables_have_monotonic_signed_versions(api: Api) -> None:
    operator = await api.operator()
    user = await api.shared_user()
    ring = await operator_ring(api)
    assert (
        await api.error("GET", "/v1/tariffs/latest", token=user.token, expect=404) == ErrorCode.API_NOT_FOUND
    )

    first = await api.call(
        "POST", "/v1/operator/revocations", token=operator, json={"user_ids": [7]}, expect=201
    )
    second = await api.call(
        "POST",
        "/v1/operator/revocations",
        token=operator,
        json={"grant_ids": ["00112233445566aa"]},
        expect=201,
    )
    await api.set_tariff(100)
    await api.set_tariff(110, region_prices=[{"scope": "SH-01", "price_fen_per_kwh": 90}])

    assert (first["version"], second["version"]) == (1, 2)
    latest = RevocationList.verify(
        unb64((await api.call("GET", "/v1/revocations/latest", token=user.token))["signed"]), ring
    )
    assert (latest.version, latest.user_ids, latest.grant_ids) == (
        2,
        frozenset({7}),
        frozenset({bytes.fromhex("00112233445566aa")}),
    )
    table = TariffTable.verify(
        unb64((await api.call("GET", "/v1/tariffs/latest", token=user.token))["signed"]), ring
    )
    assert (table.version, table.price_for("BOX-1", "SH-01"), table.price_for("BOX-1", "BJ-02")) == (
        2,
        90,
        110,
    )


async def test_a_revoked_user_gets_no_more_grants(api: Api) -> None:
    user = await api.shared_user()
    phone = await api.user_device(user)
    await api.top_up(user, 1000)
    await api.call(
        "POST",
        "/v1/operator/revocations",
        token=await api.operator(),
        json={"user_ids": [user.user_id]},
        expect=201,
    )
    assert await api.grant_refused(user, phone, 100, expect=403) == ErrorCode.USER_REVOKED


async def test_reservations_do_not_overlap_and_are_signed_for_the_phone(api: Api) -> None:
    alice, bob = await api.shared_user(), await api.shared_user()
    alice_phone, bob_phone = await api.user_device(alice), await api.user_device(bob)
    await api.provision("BOX-R", testing.ed25519_key("reserved box"))
    start = api.clock.now + 600

    def body(phone_hex: str, starts_at: int, outlet: int = 1) -> dict[str, object]:
        return {
            "box_id": "BOX-R",
            "outlet": outlet,
            "phone_key": phone_hex,
            "starts_at": starts_at,
            "duration_seconds": 1800,
        }

    issued = await api.call(
        "POST", "/v1/me/reservations", token=alice.token, json=body(key_hex(alice_phone), start), expect=201
    )
    clash = await api.error(
        "POST", "/v1/me/reservations", token=bob.token, json=body(key_hex(bob_phone), start + 900), expect=409
    )
    other_outlet = await api.call(
        "POST",
        "/v1/me/reservations",
        token=bob.token,
        json=body(key_hex(bob_phone), start, outlet=2),
        expect=201,
    )
    later = await api.call(
        "POST",
        "/v1/me/reservations",
        token=bob.token,
        json=body(key_hex(bob_phone), start + 1800),
        expect=201,
    )

    assert clash == ErrorCode.OUTLET_RESERVED
    assert other_outlet["token_id"] != later["token_id"]
    reservation = Reservation.verify(unb64(issued["signed"]), await operator_ring(api))
    assert (reservation.box_id, reservation.outlet, reservation.not_before, reservation.user_id) == (
        "BOX-R",
        1,
        start,
        alice.user_id,
    )
    missing = await api.error(
        "POST",
        "/v1/me/reservations",
        token=alice.token,
        json=body(key_hex(alice_phone), start, outlet=9),
        expect=404,
    )
    assert missing == ErrorCode.API_NOT_FOUND


async def test_nearby_boxes_come_nearest_first_with_their_price(api: Api) -> None:
    user = await api.shared_user()
    # Along a meridian one microdegree of latitude is about 0.111 m.
    await api.provision("NEAR", testing.ed25519_key("near"), latitude=31_230_000 + 900)  # ~100 m
    await api.provision("NEARER", testing.ed25519_key("nearer"), latitude=31_230_000 + 90)  # ~10 m
    await api.provision("FAR", testing.ed25519_key("far"), latitude=31_230_000 + 90_000)  # ~10 km
    await api.set_tariff(120, box_prices=[{"scope": "NEAR", "price_fen_per_kwh": 99}])

    found = await api.call(
        "GET",
        "/v1/boxes/nearby",
        token=user.token,
        params={"latitude_microdeg": 31_230_000, "longitude_microdeg": 121_473_701, "radius_m": 1000},
    )

    assert [(b["box_id"], b["distance_m"], b["price_fen_per_kwh"]) for b in found] == [
        ("NEARER", 10, 120),
        ("NEAR", 100, 99),
    ]
    assert all(outlet["available"] is None for outlet in found[0]["outlets"])


async def test_grants_for_an_unknown_box_or_with_silly_terms_are_refused(api: Api) -> None:
    user = await api.shared_user()
    phone = await api.user_device(user)
    await api.top_up(user, 1000)
    base = {
        "phone_key": key_hex(phone),
        "amount_fen": 100,
        "max_price_fen_per_kwh": 200,
        "idempotency_key": "x",
    }
    cases: list[tuple[dict[str, object], int, ErrorCode]] = [
        ({"box_id": "NO-SUCH-BOX"}, 404, ErrorCode.API_NOT_FOUND),
        ({"amount_fen": 10**8}, 400, ErrorCode.API_MALFORMED),
        ({"valid_seconds": 5}, 400, ErrorCode.API_MALFORMED),
        ({"amount_fen": "100"}, 422, ErrorCode.API_MALFORMED),
        ({"amount_fen": 1.5}, 422, ErrorCode.API_MALFORMED),
    ]
    for changes, status, code in cases:
        assert (
            await api.error(
                "POST", "/v1/me/grants", token=user.token, json={**base, **changes}, expect=status
            )
            == code
        )
    assert await api.balances(user) == {"available_fen": 1000, "frozen_fen": 0, "arrears_fen": 0}
