"""Test helpers: a settable clock, an HTTP client that speaks the API like a phone, a box or an
operator would, and a box ledger that signs real entries (protocol.tokens.LedgerEntry)."""

from __future__ import annotations

import base64
import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger_server.providers import DevSmsProvider
from protocol import cose, proofs, tariff, testing, tokens
from protocol.errors import ErrorCode
from protocol.tokens import (
    BalanceGrant,
    BootBody,
    EndReason,
    EntryBody,
    EntryKind,
    LedgerEntry,
    SessionReceipt,
    SessionStartedBody,
    SessionToppedUpBody,
    TimeQuality,
)

START_TIME = testing.SAMPLE_TIME
OPERATOR_USERNAME = "operator"
OPERATOR_PASSWORD = "operator-password"
_phones = itertools.count(13_800_000_000)


class MutableClock:
    """The server's clock in tests: moved by the test, read by the server thread."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: int) -> None:
        self.now += seconds


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def key_hex(key: Ed25519PrivateKey) -> str:
    return cose.public_key_bytes(key.public_key()).hex()


@dataclass(frozen=True, slots=True, kw_only=True)
class User:
    token: str
    user_id: int
    phone: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Staff:
    token: str
    staff_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedGrant:
    grant_id: bytes
    signed: bytes
    grant: BalanceGrant
    body: dict[str, Any]


class ApiError(AssertionError):
    pass


@dataclass(slots=True, kw_only=True)
class Api:
    client: httpx.AsyncClient
    clock: MutableClock
    sms: DevSmsProvider
    _operator: str | None = None

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        params: dict[str, Any] | None = None,
        expect: int = 200,
    ) -> Any:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.client.request(method, path, json=json, params=params, headers=headers)
        if response.status_code != expect:
            raise ApiError(f"{method} {path}: {response.status_code} {response.text}")
        if response.status_code == 204 or not response.content:
            return None
        if response.headers.get("content-type", "").startswith("text/html"):
            return response.text
        return response.json()

    async def error(
        self, method: str, path: str, *, expect: int, token: str | None = None, json: Any = None
    ) -> int:
        """Call expecting a refusal; return its ErrorCode value (after checking the error body's shape)."""
        body = await self.call(method, path, token=token, json=json, expect=expect)
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"code", "name", "detail"}, body
        assert ErrorCode(body["error"]["code"]).name == body["error"]["name"]
        return int(body["error"]["code"])

    # --- people ---

    async def shared_user(self, phone: str | None = None) -> User:
        phone = phone or f"+86{next(_phones)}"
        await self.call("POST", "/v1/auth/shared/code", json={"phone": phone}, expect=202)
        code = self.sms.last_code(phone)
        assert code is not None
        body = await self.call("POST", "/v1/auth/shared/token", json={"phone": phone, "code": code})
        return User(token=body["access_token"], user_id=int(body["subject"]), phone=phone)

    async def operator(self) -> str:
        if self._operator is None:
            body = await self.call(
                "POST",
                "/v1/auth/staff/token",
                json={"username": OPERATOR_USERNAME, "password": OPERATOR_PASSWORD},
            )
            self._operator = str(body["access_token"])
        return self._operator

    async def staff(self, username: str, role: str) -> Staff:
        password = f"{username}-password"
        await self.call(
            "POST",
            "/v1/operator/staff",
            token=await self.operator(),
            json={"username": username, "password": password, "role": role},
            expect=201,
        )
        body = await self.call(
            "POST", "/v1/auth/staff/token", json={"username": username, "password": password}
        )
        return Staff(token=str(body["access_token"]), staff_id=int(body["subject"]))

    async def device(self, token: str, subject: str, label: str) -> Ed25519PrivateKey:
        key = testing.ed25519_key(label)
        proof = proofs.sign_possession(
            context=proofs.ProofContext.DEVICE_REGISTRATION,
            subject=subject,
            nonce=b"",
            key=cose.SigningKey.from_private_key(key),
        )
        await self.call(
            "POST",
            "/v1/me/devices",
            token=token,
            json={"public_key": key_hex(key), "proof": b64(proof)},
            expect=201,
        )
        return key

    async def user_device(self, user: User, label: str | None = None) -> Ed25519PrivateKey:
        return await self.device(user.token, f"user:{user.user_id}", label or f"phone of {user.phone}")

    async def top_up(self, user: User, amount_fen: int, key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = await self.call(
            "POST",
            "/v1/me/top-ups",
            token=user.token,
            json={"amount_fen": amount_fen, "idempotency_key": key or f"top-up-{next(_phones)}"},
        )
        return body

    async def balances(self, user: User) -> dict[str, int]:
        body = await self.call("GET", "/v1/me", token=user.token)
        return dict(body["balances"])

    async def grant(
        self,
        user: User,
        phone_key: Ed25519PrivateKey,
        amount_fen: int,
        *,
        box_id: str | None = None,
        valid_seconds: int = 86_400,
        max_price: int = 200,
        key: str | None = None,
    ) -> IssuedGrant:
        body = await self.call(
            "POST",
            "/v1/me/grants",
            token=user.token,
            json={
                "phone_key": key_hex(phone_key),
                "amount_fen": amount_fen,
                "box_id": box_id,
                "valid_seconds": valid_seconds,
                "max_price_fen_per_kwh": max_price,
                "idempotency_key": key or f"grant-{next(_phones)}",
            },
            expect=201,
        )
        signed = unb64(body["signed_grant"])
        return IssuedGrant(
            grant_id=bytes.fromhex(body["grant_id"]),
            signed=signed,
            grant=BalanceGrant.decode_unverified(signed),
            body=body,
        )

    async def grant_refused(
        self, user: User, phone_key: Ed25519PrivateKey, amount_fen: int, *, expect: int
    ) -> int:
        """Ask for a grant that must be refused; its ErrorCode value."""
        return await self.error(
            "POST",
            "/v1/me/grants",
            token=user.token,
            json={
                "phone_key": key_hex(phone_key),
                "amount_fen": amount_fen,
                "max_price_fen_per_kwh": 200,
                "idempotency_key": f"grant-{next(_phones)}",
            },
            expect=expect,
        )

    # --- operator ---

    async def provision(
        self,
        box_id: str,
        box_key: Ed25519PrivateKey,
        *,
        outlets: int = 4,
        latitude: int = 31_230_416,
        longitude: int = 121_473_701,
    ) -> dict[str, Any]:
        body: dict[str, Any] = await self.call(
            "POST",
            "/v1/operator/boxes",
            token=await self.operator(),
            json={
                "box_id": box_id,
                "public_key": key_hex(box_key),
                "outlets": [{"number": n, "rated_power_w": 3500} for n in range(1, outlets + 1)],
                "latitude_microdeg": latitude,
                "longitude_microdeg": longitude,
                "tariff_region": "SH-01",
            },
            expect=201,
        )
        return body

    async def set_tariff(self, default_price: int = 120, **scoped: Any) -> dict[str, Any]:
        body: dict[str, Any] = await self.call(
            "POST",
            "/v1/operator/tariffs",
            token=await self.operator(),
            json={"default_price_fen_per_kwh": default_price, **scoped},
            expect=201,
        )
        return body

    async def anomalies(self, kind: str | None = None) -> list[dict[str, Any]]:
        params = {"kind": kind} if kind else {}
        found: list[dict[str, Any]] = await self.call(
            "GET", "/v1/operator/anomalies", token=await self.operator(), params=params
        )
        return found

    async def books(self) -> dict[str, Any]:
        body: dict[str, Any] = await self.call("GET", "/v1/operator/books", token=await self.operator())
        return body

    async def reconcile(self) -> dict[str, Any]:
        body: dict[str, Any] = await self.call("POST", "/v1/operator/reconcile", token=await self.operator())
        return body

    # --- boxes ---

    async def box_token(self, box_id: str, box_key: Ed25519PrivateKey) -> str:
        challenge = await self.call("POST", "/v1/auth/box/challenge", json={"box_id": box_id})
        nonce = unb64(challenge["nonce"])
        proof = proofs.sign_possession(
            context=proofs.ProofContext.BOX_UPLINK,
            subject=box_id,
            nonce=nonce,
            key=cose.SigningKey.from_private_key(box_key),
        )
        body = await self.call(
            "POST",
            "/v1/auth/box/token",
            json={"box_id": box_id, "nonce": challenge["nonce"], "proof": b64(proof)},
        )
        return str(body["access_token"])

    async def upload(self, box_token: str, entries: list[bytes], *, expect: int = 200) -> Any:
        return await self.call(
            "POST",
            "/v1/box/ledger",
            token=box_token,
            json={"entries": [b64(e) for e in entries]},
            expect=expect,
        )


@dataclass(slots=True, kw_only=True)
class BoxLedger:
    """A box's signed, hash-chained ledger, written the way the box daemon writes it."""

    box_id: str
    key: Ed25519PrivateKey
    time: int = START_TIME
    entries: list[bytes] = field(default_factory=list)
    _session_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def signing_key(self) -> cose.SigningKey:
        return cose.SigningKey.from_private_key(self.key)

    def append(
        self,
        kind: EntryKind,
        body: EntryBody,
        *,
        quality: TimeQuality = TimeQuality.SYNCED,
        time: int | None = None,
    ) -> bytes:
        previous = tokens.entry_hash(self.entries[-1]) if self.entries else tokens.GENESIS_HASH
        entry = LedgerEntry(
            box_id=self.box_id,
            sequence=len(self.entries) + 1,
            previous_hash=previous,
            time=self.time if time is None else time,
            time_quality=quality,
            kind=kind,
            body=body,
        )
        signed = entry.sign(self.signing_key)
        self.entries.append(signed)
        return signed

    def boot(self) -> bytes:
        return self.append(EntryKind.BOOT, BootBody(software_version="test"))

    def session(
        self,
        grant: BalanceGrant,
        *,
        energy_wh: int,
        price: int = 120,
        tariff_version: int = 1,
        outlet: int = 1,
        top_ups: tuple[BalanceGrant, ...] = (),
        seconds: int = 600,
        claimed_cost: int | None = None,
        end_reason: EndReason = EndReason.USER_STOP,
    ) -> bytes:
        """A whole session: started, topped up, ended with its receipt. Returns the session id."""
        session_id = next(self._session_ids).to_bytes(8, "big")
        start = self.time
        self.append(
            EntryKind.SESSION_STARTED,
            SessionStartedBody(
                session_id=session_id,
                outlet=outlet,
                grant_id=grant.grant_id,
                user_id=grant.user_id,
                phone_key=cose.public_key_bytes(grant.phone_key),
                start_time=start,
                start_register_wh=100_000,
                tariff_version=tariff_version,
                price_fen_per_kwh=price,
                amount_fen=grant.amount_fen,
            ),
        )
        for top_up in top_ups:
            self.time += 1
            self.append(
                EntryKind.SESSION_TOPPED_UP,
                SessionToppedUpBody(
                    session_id=session_id, grant_id=top_up.grant_id, amount_fen=top_up.amount_fen
                ),
            )
        self.time = start + seconds
        balance = grant.amount_fen + sum(t.amount_fen for t in top_ups)
        cost = min(tariff.session_cost_fen(energy_wh, price), balance)
        self.append(
            EntryKind.SESSION_ENDED,
            SessionReceipt(
                session_id=session_id,
                grant_ids=(grant.grant_id, *(t.grant_id for t in top_ups)),
                outlet=outlet,
                start_time=start,
                end_time=self.time,
                start_register_wh=100_000,
                end_register_wh=100_000 + energy_wh,
                energy_wh=energy_wh,
                tariff_version=tariff_version,
                price_fen_per_kwh=price,
                cost_fen=cost if claimed_cost is None else claimed_cost,
                end_reason=end_reason,
            ),
        )
        self.time += 1
        return session_id
