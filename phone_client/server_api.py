"""The settlement server's HTTP API as the phone uses it (httpx), with typed answers.

Every answer is read strictly into frozen records; httpx errors, HTTP error bodies
(`{"error": {"code", "name", "detail"}}`) and unreadable answers become `ServerUnreachableError`,
`ServerRefusedError` (with the server's code) and `ServerAnswerError`, so nothing of httpx leaves
this module. Encodings follow the server: signed objects base64, ids and keys lowercase hex,
money integer fen, times integer seconds.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from phone_client.errors import (
    PrerequisiteError,
    ServerAnswerError,
    ServerRefusedError,
    ServerUnreachableError,
)
from protocol import cose, proofs
from protocol.errors import ErrorCode

DEFAULT_TIMEOUT_S = 15.0

# What each HTTP status means when the body does not say (a proxy's page, a newer server's code).
_STATUS_CODES = {
    400: ErrorCode.API_MALFORMED,
    401: ErrorCode.API_UNAUTHENTICATED,
    402: ErrorCode.PAYMENT_FAILED,
    403: ErrorCode.API_FORBIDDEN,
    404: ErrorCode.API_NOT_FOUND,
    409: ErrorCode.API_CONFLICT,
    413: ErrorCode.API_TOO_LARGE,
    422: ErrorCode.API_MALFORMED,
    429: ErrorCode.API_RATE_LIMITED,
}


# --- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AccessToken:
    access_token: str
    expires_at: int
    principal: str  # "user", "staff"
    subject: str  # user id or staff id
    role: str  # "user", "operator", "technician"

    @property
    def device_subject(self) -> str:
        """What the device key signs to register for this login (docs/server-api.md)."""
        return f"{self.principal}:{self.subject}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Balances:
    available_fen: int
    frozen_fen: int
    arrears_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UserProfile:
    user_id: int
    kind: str  # "shared" or "account"
    phone: str
    electricity_account: str | None
    balances: Balances


@dataclass(frozen=True, slots=True, kw_only=True)
class Payment:
    payment_id: int
    kind: str
    amount_fen: int
    provider_reference: str
    balances: Balances


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerGrant:
    """A grant as the server sees it: its signed bytes and how settlement has treated it."""

    grant_id: bytes
    signed_grant: bytes
    box_id: str | None
    amount_fen: int
    max_price_fen_per_kwh: int
    issued_at: int
    expires_at: int
    state: str  # "open", "settled", "released"
    charged_fen: int
    captured_fen: int
    excess_fen: int
    released_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class OutletState:
    number: int
    rated_power_w: int
    available: bool | None
    reserved_now: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class NearbyBox:
    box_id: str
    distance_m: int
    latitude_microdeg: int
    longitude_microdeg: int
    price_fen_per_kwh: int | None
    last_seen_at: int | None
    outlets: tuple[OutletState, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedVersion:
    """The newest revocation list or tariff table."""

    version: int
    issued_at: int
    signed: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SignedToken:
    """A reservation or an unlock token."""

    token_id: bytes
    signed: bytes
    not_before: int
    expires_at: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BatchResult:
    """The server's answer for one box's entries in an uploaded batch, with its ack to carry back."""

    box_id: str
    received: int
    stored: int
    duplicates: int
    forks: int
    waiting: int
    contiguous_sequence: int
    applied_sequence: int
    ledger_ack: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class StatementLine:
    time: int
    kind: str
    account: str
    amount_fen: int
    grant_id: bytes | None
    box_id: str | None
    session_id: bytes | None


@dataclass(frozen=True, slots=True, kw_only=True)
class SettledSession:
    box_id: str
    session_id: bytes
    outlet: int
    start_time: int
    end_time: int | None
    energy_wh: int | None
    cost_fen: int | None
    end_reason: str | None
    invoiced: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class Statement:
    user_id: int
    from_time: int
    to_time: int
    balances: Balances
    lines: tuple[StatementLine, ...]
    sessions: tuple[SettledSession, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceSummary:
    number: str
    created_at: int
    total_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Invoice:
    number: str
    created_at: int
    total_fen: int
    energy_wh: int
    sessions: tuple[SettledSession, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class OperatorKeys:
    signing_keys: tuple[Ed25519PublicKey, ...]


# --- reading answers strictly ----------------------------------------------------------------------


class _Object:
    """One JSON object of an answer; every getter checks the type or raises ServerAnswerError."""

    def __init__(self, value: object, what: str) -> None:
        if not isinstance(value, dict):
            raise ServerAnswerError(f"{what}: expected an object")
        self._value: dict[str, Any] = value
        self._what = what

    def _get(self, name: str) -> object:
        if name not in self._value:
            raise ServerAnswerError(f"{self._what}: no {name!r}")
        return self._value[name]

    def integer(self, name: str) -> int:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ServerAnswerError(f"{self._what}: {name!r} is not an integer")
        return value

    def optional_integer(self, name: str) -> int | None:
        return None if self._value.get(name) is None else self.integer(name)

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise ServerAnswerError(f"{self._what}: {name!r} is not text")
        return value

    def optional_text(self, name: str) -> str | None:
        return None if self._value.get(name) is None else self.text(name)

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise ServerAnswerError(f"{self._what}: {name!r} is not true or false")
        return value

    def optional_flag(self, name: str) -> bool | None:
        return None if self._value.get(name) is None else self.flag(name)

    def b64bytes(self, name: str) -> bytes:
        try:
            return base64.b64decode(self.text(name), validate=True)
        except (binascii.Error, ValueError):
            raise ServerAnswerError(f"{self._what}: {name!r} is not base64") from None

    def optional_b64bytes(self, name: str) -> bytes | None:
        return None if self._value.get(name) is None else self.b64bytes(name)

    def hex_bytes(self, name: str) -> bytes:
        try:
            return bytes.fromhex(self.text(name))
        except ValueError:
            raise ServerAnswerError(f"{self._what}: {name!r} is not hex") from None

    def optional_hex_bytes(self, name: str) -> bytes | None:
        return None if self._value.get(name) is None else self.hex_bytes(name)

    def object(self, name: str) -> _Object:
        return _Object(self._get(name), f"{self._what}.{name}")

    def objects(self, name: str) -> Iterator[_Object]:
        return _objects(self._get(name), f"{self._what}.{name}")


def _objects(value: object, what: str) -> Iterator[_Object]:
    if not isinstance(value, list):
        raise ServerAnswerError(f"{what}: expected a list")
    return (_Object(item, f"{what}[{index}]") for index, item in enumerate(value))


def _balances(body: _Object) -> Balances:
    return Balances(
        available_fen=body.integer("available_fen"),
        frozen_fen=body.integer("frozen_fen"),
        arrears_fen=body.integer("arrears_fen"),
    )


def _access_token(body: _Object) -> AccessToken:
    return AccessToken(
        access_token=body.text("access_token"),
        expires_at=body.integer("expires_at"),
        principal=body.text("principal"),
        subject=body.text("subject"),
        role=body.text("role"),
    )


def _grant(body: _Object) -> ServerGrant:
    return ServerGrant(
        grant_id=body.hex_bytes("grant_id"),
        signed_grant=body.b64bytes("signed_grant"),
        box_id=body.optional_text("box_id"),
        amount_fen=body.integer("amount_fen"),
        max_price_fen_per_kwh=body.integer("max_price_fen_per_kwh"),
        issued_at=body.integer("issued_at"),
        expires_at=body.integer("expires_at"),
        state=body.text("state"),
        charged_fen=body.integer("charged_fen"),
        captured_fen=body.integer("captured_fen"),
        excess_fen=body.integer("excess_fen"),
        released_fen=body.integer("released_fen"),
    )


def _signed_version(body: _Object) -> SignedVersion:
    return SignedVersion(
        version=body.integer("version"), issued_at=body.integer("issued_at"), signed=body.b64bytes("signed")
    )


def _signed_token(body: _Object) -> SignedToken:
    return SignedToken(
        token_id=body.hex_bytes("token_id"),
        signed=body.b64bytes("signed"),
        not_before=body.integer("not_before"),
        expires_at=body.integer("expires_at"),
    )


def _session(body: _Object) -> SettledSession:
    return SettledSession(
        box_id=body.text("box_id"),
        session_id=body.hex_bytes("session_id"),
        outlet=body.integer("outlet"),
        start_time=body.integer("start_time"),
        end_time=body.optional_integer("end_time"),
        energy_wh=body.optional_integer("energy_wh"),
        cost_fen=body.optional_integer("cost_fen"),
        end_reason=body.optional_text("end_reason"),
        invoiced=body.flag("invoiced"),
    )


def _statement(body: _Object) -> Statement:
    return Statement(
        user_id=body.integer("user_id"),
        from_time=body.integer("from_time"),
        to_time=body.integer("to_time"),
        balances=_balances(body.object("balances")),
        lines=tuple(
            StatementLine(
                time=line.integer("time"),
                kind=line.text("kind"),
                account=line.text("account"),
                amount_fen=line.integer("amount_fen"),
                grant_id=line.optional_hex_bytes("grant_id"),
                box_id=line.optional_text("box_id"),
                session_id=line.optional_hex_bytes("session_id"),
            )
            for line in body.objects("lines")
        ),
        sessions=tuple(_session(item) for item in body.objects("sessions")),
    )


def _invoice(body: _Object) -> Invoice:
    return Invoice(
        number=body.text("number"),
        created_at=body.integer("created_at"),
        total_fen=body.integer("total_fen"),
        energy_wh=body.integer("energy_wh"),
        sessions=tuple(_session(item) for item in body.objects("sessions")),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def new_idempotency_key() -> str:
    """One per intent: a retry of the same payment or grant reuses it, so it happens once."""
    return secrets.token_hex(16)


def check_server_url(url: str) -> str:
    """The base URL as httpx wants it, or PrerequisiteError with what is wrong."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise PrerequisiteError(f"{url!r} is not a URL", code=ErrorCode.API_MALFORMED) from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise PrerequisiteError(
            f"{url!r} is not an http:// or https:// address", code=ErrorCode.API_MALFORMED
        )
    return str(parsed).rstrip("/")


class ServerApi:
    """One server, one optional bearer token. Use `async with ServerApi(url, token=...) as api`."""

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = check_server_url(base_url)
        self.token = token
        self._client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=transport)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with contextlib.suppress(httpx.HTTPError):  # a pool whose connections broke: nothing to save
            await self._client.aclose()

    # --- the one place httpx is called ---

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json: object = None,
        params: dict[str, int] | None = None,
        authenticated: bool = True,
        retry: bool = False,
    ) -> object:
        """The decoded JSON answer (None for an empty one). `retry`: the request is idempotent
        (GET, or a POST with an idempotency key), so one lost answer is retried once."""
        headers: dict[str, str] = {}
        if authenticated:
            if self.token is None:
                raise PrerequisiteError(
                    "not logged in: `powerbox phone login ...` first", code=ErrorCode.API_UNAUTHENTICATED
                )
            headers["Authorization"] = f"Bearer {self.token}"
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            try:
                response = await self._client.request(method, path, json=json, params=params, headers=headers)
                break
            except httpx.TimeoutException:
                failure = ServerUnreachableError(f"{self.base_url} did not answer in time")
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
                failure = ServerUnreachableError(f"cannot reach {self.base_url}: {exc or type(exc).__name__}")
            if attempt == attempts - 1:
                raise failure
        if response.status_code >= 400:
            raise _refusal(response)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ServerAnswerError(f"{method} {path}: the answer is not JSON") from None

    # --- public ---

    async def operator_keys(self) -> OperatorKeys:
        body = _Object(await self._call("GET", "/v1/operator-keys", authenticated=False, retry=True), "keys")
        keys = []
        for item in body.objects("signing_keys"):
            raw = item.hex_bytes("public_key")
            try:
                keys.append(Ed25519PublicKey.from_public_bytes(raw))
            except ValueError:
                raise ServerAnswerError("an operator key is not an Ed25519 key") from None
        return OperatorKeys(signing_keys=tuple(keys))

    async def request_shared_code(self, phone: str) -> int:
        """Text a one-time code to `phone`; the seconds it stays valid."""
        body = await self._call("POST", "/v1/auth/shared/code", json={"phone": phone}, authenticated=False)
        return _Object(body, "code").integer("expires_in")

    async def login_shared(self, phone: str, code: str) -> AccessToken:
        """Sign up or log in as a shared user (deposit-paying) with the texted code."""
        body = await self._call(
            "POST", "/v1/auth/shared/token", json={"phone": phone, "code": code}, authenticated=False
        )
        return self._adopt(_access_token(_Object(body, "token")))

    async def request_account_code(self, account_number: str, password: str) -> int:
        body = await self._call(
            "POST",
            "/v1/auth/account/code",
            json={"account_number": account_number, "password": password},
            authenticated=False,
        )
        return _Object(body, "code").integer("expires_in")

    async def login_account(self, account_number: str, password: str, code: str) -> AccessToken:
        """Bind an electricity account (it pays) and log in as its user."""
        body = await self._call(
            "POST",
            "/v1/auth/account/token",
            json={"account_number": account_number, "password": password, "code": code},
            authenticated=False,
        )
        return self._adopt(_access_token(_Object(body, "token")))

    async def login_staff(self, username: str, password: str) -> AccessToken:
        body = await self._call(
            "POST",
            "/v1/auth/staff/token",
            json={"username": username, "password": password},
            authenticated=False,
        )
        return self._adopt(_access_token(_Object(body, "token")))

    def _adopt(self, token: AccessToken) -> AccessToken:
        self.token = token.access_token
        return token

    async def logout(self) -> None:
        await self._call("POST", "/v1/auth/logout")

    # --- users ---

    async def me(self) -> UserProfile:
        body = _Object(await self._call("GET", "/v1/me", retry=True), "me")
        return UserProfile(
            user_id=body.integer("user_id"),
            kind=body.text("kind"),
            phone=body.text("phone"),
            electricity_account=body.optional_text("electricity_account"),
            balances=_balances(body.object("balances")),
        )

    async def register_device(self, device_key: Ed25519PrivateKey, login: AccessToken) -> int:
        """Register the phone's key (grants get bound to it), proving possession; when it was registered."""
        proof = proofs.sign_possession(
            context=proofs.ProofContext.DEVICE_REGISTRATION,
            subject=login.device_subject,
            nonce=b"",
            key=cose.SigningKey.from_private_key(device_key),
        )
        body = await self._call(
            "POST",
            "/v1/me/devices",
            json={
                "public_key": cose.public_key_bytes(device_key.public_key()).hex(),
                "proof": _b64(proof),
            },
            retry=True,
        )
        return _Object(body, "device").integer("registered_at")

    async def top_up(self, amount_fen: int, idempotency_key: str) -> Payment:
        """Add to the deposit through the payment provider."""
        body = _Object(
            await self._call(
                "POST",
                "/v1/me/top-ups",
                json={"amount_fen": amount_fen, "idempotency_key": idempotency_key},
                retry=True,
            ),
            "payment",
        )
        return Payment(
            payment_id=body.integer("payment_id"),
            kind=body.text("kind"),
            amount_fen=body.integer("amount_fen"),
            provider_reference=body.text("provider_reference"),
            balances=_balances(body.object("balances")),
        )

    async def request_grant(
        self,
        *,
        phone_key: Ed25519PublicKey,
        amount_fen: int,
        box_id: str | None,
        valid_seconds: int,
        max_price_fen_per_kwh: int,
        max_session_seconds: int,
        idempotency_key: str,
    ) -> ServerGrant:
        """Freeze `amount_fen` of the deposit into a signed grant bound to `phone_key`."""
        body = await self._call(
            "POST",
            "/v1/me/grants",
            json={
                "phone_key": cose.public_key_bytes(phone_key).hex(),
                "amount_fen": amount_fen,
                "box_id": box_id,
                "valid_seconds": valid_seconds,
                "max_price_fen_per_kwh": max_price_fen_per_kwh,
                "max_session_seconds": max_session_seconds,
                "idempotency_key": idempotency_key,
            },
            retry=True,
        )
        return _grant(_Object(body, "grant"))

    async def grants(self) -> list[ServerGrant]:
        return [
            _grant(item) for item in _objects(await self._call("GET", "/v1/me/grants", retry=True), "grants")
        ]

    async def nearby(
        self, *, latitude_microdeg: int, longitude_microdeg: int, radius_m: int, limit: int = 20
    ) -> list[NearbyBox]:
        body = await self._call(
            "GET",
            "/v1/boxes/nearby",
            params={
                "latitude_microdeg": latitude_microdeg,
                "longitude_microdeg": longitude_microdeg,
                "radius_m": radius_m,
                "limit": limit,
            },
            retry=True,
        )
        return [
            NearbyBox(
                box_id=item.text("box_id"),
                distance_m=item.integer("distance_m"),
                latitude_microdeg=item.integer("latitude_microdeg"),
                longitude_microdeg=item.integer("longitude_microdeg"),
                price_fen_per_kwh=item.optional_integer("price_fen_per_kwh"),
                last_seen_at=item.optional_integer("last_seen_at"),
                outlets=tuple(
                    OutletState(
                        number=outlet.integer("number"),
                        rated_power_w=outlet.integer("rated_power_w"),
                        available=outlet.optional_flag("available"),
                        reserved_now=outlet.flag("reserved_now"),
                    )
                    for outlet in item.objects("outlets")
                ),
            )
            for item in _objects(body, "nearby")
        ]

    async def reserve(
        self, *, box_id: str, outlet: int, phone_key: Ed25519PublicKey, starts_at: int, duration_seconds: int
    ) -> SignedToken:
        body = await self._call(
            "POST",
            "/v1/me/reservations",
            json={
                "box_id": box_id,
                "outlet": outlet,
                "phone_key": cose.public_key_bytes(phone_key).hex(),
                "starts_at": starts_at,
                "duration_seconds": duration_seconds,
            },
        )
        return _signed_token(_Object(body, "reservation"))

    async def unlock_token(
        self, *, box_id: str, door: str, outlet: int, phone_key: Ed25519PublicKey, valid_seconds: int
    ) -> SignedToken:
        """Staff only: an UnlockToken for one door (`door` is "metering_box" or "outlet")."""
        body = await self._call(
            "POST",
            "/v1/technician/unlock-tokens",
            json={
                "box_id": box_id,
                "door": door,
                "outlet": outlet,
                "phone_key": cose.public_key_bytes(phone_key).hex(),
                "valid_seconds": valid_seconds,
            },
        )
        return _signed_token(_Object(body, "unlock token"))

    async def latest_revocations(self) -> SignedVersion | None:
        """The newest revocation list, or None if the operator has issued none yet."""
        return await self._latest("/v1/revocations/latest")

    async def latest_tariff(self) -> SignedVersion | None:
        return await self._latest("/v1/tariffs/latest")

    async def _latest(self, path: str) -> SignedVersion | None:
        try:
            body = await self._call("GET", path, retry=True)
        except ServerRefusedError as exc:
            if exc.code is ErrorCode.API_NOT_FOUND:
                return None
            raise
        return _signed_version(_Object(body, path))

    async def upload_sealed_batch(self, sealed_batch: bytes) -> list[BatchResult]:
        """Hand in a batch carried from a box; the answer holds an ack per box to carry back.

        Ingest is idempotent, so a batch whose answer was lost is simply sent again."""
        body = await self._call(
            "POST", "/v1/ledger/sealed", json={"sealed_batch": _b64(sealed_batch)}, retry=True
        )
        return [
            BatchResult(
                box_id=item.text("box_id"),
                received=item.integer("received"),
                stored=item.integer("stored"),
                duplicates=item.integer("duplicates"),
                forks=item.integer("forks"),
                waiting=item.integer("waiting"),
                contiguous_sequence=item.integer("contiguous_sequence"),
                applied_sequence=item.integer("applied_sequence"),
                ledger_ack=item.optional_b64bytes("ledger_ack"),
            )
            for item in _objects(body, "batch results")
        ]

    async def statement(self, *, from_time: int = 0, to_time: int | None = None) -> Statement:
        params = {"from_time": from_time}
        if to_time is not None:
            params["to_time"] = to_time
        body = await self._call("GET", "/v1/me/statement", params=params, retry=True)
        return _statement(_Object(body, "statement"))

    async def create_invoice(self, sessions: list[tuple[str, bytes]]) -> Invoice:
        body = await self._call(
            "POST",
            "/v1/me/invoices",
            json={"sessions": [{"box_id": box, "session_id": sid.hex()} for box, sid in sessions]},
        )
        return _invoice(_Object(body, "invoice"))

    async def invoices(self) -> list[InvoiceSummary]:
        return [
            InvoiceSummary(
                number=item.text("number"),
                created_at=item.integer("created_at"),
                total_fen=item.integer("total_fen"),
            )
            for item in _objects(await self._call("GET", "/v1/me/invoices", retry=True), "invoices")
        ]

    async def invoice(self, number: str) -> Invoice:
        return _invoice(_Object(await self._call("GET", f"/v1/me/invoices/{number}", retry=True), "invoice"))

    async def invoice_html(self, number: str) -> str:
        """The printable invoice page, exactly as issued."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = await self._client.get(f"/v1/me/invoices/{number}/html", headers=headers)
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise ServerUnreachableError(f"cannot reach {self.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise _refusal(response)
        return response.text


def _refusal(response: httpx.Response) -> ServerRefusedError | ServerUnreachableError:
    """The server's error body as our error; a body without one is judged by its HTTP status."""
    status = response.status_code
    try:
        error = _Object(response.json(), "error body").object("error")
        number, detail = error.integer("code"), error.text("detail")
    except (ValueError, ServerAnswerError):
        number, detail = None, response.reason_phrase or f"HTTP {status}"
    if number is not None and number in ErrorCode._value2member_map_:
        code = ErrorCode(number)
    elif status in _STATUS_CODES:
        code = _STATUS_CODES[status]
    elif status >= 500:
        # a proxy's page or a crashed server: nothing the user can fix but to retry later
        return ServerUnreachableError(f"the server failed (HTTP {status}): {detail}")
    else:
        code = ErrorCode.API_MALFORMED
    return ServerRefusedError(detail, code=code, status=status)
