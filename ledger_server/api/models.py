"""Request and response bodies of the HTTP API (docs/server-api.md), as pydantic models so FastAPI
validates them and publishes them in the OpenAPI document.

Encodings: signed objects, nonces, proofs and ledger entries are standard base64 (with padding);
ids (grant, session, reservation, token) and keys are lowercase hex; money integer fen, energy
integer Wh, times integer seconds since 1970 UTC.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=3_000_000)]
ShortBase64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=4096)]
IdHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
KeyHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
BoxIdText = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9-]{1,16}$")]
IdempotencyKey = Annotated[str, StringConstraints(pattern=r"^[\x21-\x7e]{1,64}$")]
Phone = Annotated[str, StringConstraints(pattern=r"^\+?[0-9]{6,15}$")]
Code = Annotated[str, StringConstraints(pattern=r"^[0-9]{6}$")]
Password = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Time = Annotated[int, Field(ge=0, le=2**32 - 1)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# --- errors ----------------------------------------------------------------------------------------


class ErrorDetail(Model):
    code: int = Field(description="protocol.errors.ErrorCode value")
    name: str
    detail: str


class ErrorBody(Model):
    error: ErrorDetail


# --- authentication --------------------------------------------------------------------------------


class SharedCodeRequest(Model):
    phone: Phone


class SharedTokenRequest(Model):
    phone: Phone
    code: Code


class AccountCodeRequest(Model):
    account_number: Annotated[str, StringConstraints(pattern=r"^[0-9A-Za-z-]{4,32}$")]
    password: Password


class AccountTokenRequest(AccountCodeRequest):
    code: Code


PlainText = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]*$", max_length=200)]


class StaffTokenRequest(Model):
    username: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.-]{2,63}$")]
    password: Password


class CodeSent(Model):
    expires_in: int


class TokenResponse(Model):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the scheme, not a secret)
    expires_at: int
    principal: Literal["user", "staff", "box"]
    subject: str
    role: Literal["user", "operator", "technician", "box"]


class BoxChallengeRequest(Model):
    box_id: BoxIdText


class BoxChallenge(Model):
    nonce: ShortBase64
    expires_at: int


class BoxTokenRequest(Model):
    box_id: BoxIdText
    nonce: ShortBase64
    proof: ShortBase64 = Field(description="COSE_Sign1 by the box key over [context, box_id, nonce]")


# --- operator keys ---------------------------------------------------------------------------------


class VerificationKey(Model):
    key_id: str
    public_key: KeyHex
    active: bool


class OperatorKeysResponse(Model):
    signing_keys: list[VerificationKey]
    encryption_key_id: str
    encryption_public_key: KeyHex


# --- users -----------------------------------------------------------------------------------------


class BalancesResponse(Model):
    available_fen: int
    frozen_fen: int
    arrears_fen: int


class MeResponse(Model):
    user_id: int
    kind: Literal["shared", "account"]
    phone: str
    electricity_account: str | None
    balances: BalancesResponse


class DeviceRequest(Model):
    public_key: KeyHex
    proof: ShortBase64 = Field(description="COSE_Sign1 by the device key over [context, '<kind>:<id>', h'']")


class DeviceResponse(Model):
    public_key: KeyHex
    registered_at: int


class PaymentRequest(Model):
    amount_fen: Annotated[int, Field(ge=1, le=10_000_000)]
    idempotency_key: IdempotencyKey


class PaymentResponse(Model):
    payment_id: int
    kind: str
    amount_fen: int
    provider_reference: str
    balances: BalancesResponse


class GrantRequestBody(Model):
    phone_key: KeyHex
    amount_fen: Annotated[int, Field(ge=1, le=10**9)]
    box_id: BoxIdText | None = None
    valid_seconds: Annotated[int, Field(ge=1, le=31 * 86_400)] = 86_400
    max_price_fen_per_kwh: Annotated[int, Field(ge=0, le=1_000_000)]
    max_session_seconds: Annotated[int, Field(ge=1, le=31 * 86_400)] = 12 * 3600
    idempotency_key: IdempotencyKey


class GrantResponse(Model):
    grant_id: IdHex
    signed_grant: Base64
    box_id: str | None
    amount_fen: int
    max_price_fen_per_kwh: int
    issued_at: int
    expires_at: int
    state: Literal["open", "settled", "released"]
    charged_fen: int
    captured_fen: int
    excess_fen: int
    released_fen: int


class ReservationRequest(Model):
    box_id: BoxIdText
    outlet: Annotated[int, Field(ge=1, le=99)]
    phone_key: KeyHex
    starts_at: Time
    duration_seconds: Annotated[int, Field(ge=1, le=86_400)]


class SignedTokenResponse(Model):
    token_id: IdHex
    signed: Base64
    not_before: int
    expires_at: int


class UnlockTokenRequest(Model):
    box_id: BoxIdText
    door: Literal["metering_box", "outlet"]
    outlet: Annotated[int, Field(ge=0, le=99)] = 0
    phone_key: KeyHex
    valid_seconds: Annotated[int, Field(ge=1, le=86_400)] = 3600


class StatementLineResponse(Model):
    time: int
    kind: str
    account: Literal["available", "frozen", "arrears"]
    amount_fen: int
    grant_id: IdHex | None
    box_id: str | None
    session_id: IdHex | None


class SessionResponse(Model):
    box_id: str
    session_id: IdHex
    outlet: int
    start_time: int
    end_time: int | None
    energy_wh: int | None
    cost_fen: int | None
    end_reason: str | None
    invoiced: bool


class StatementResponse(Model):
    user_id: int
    from_time: int
    to_time: int
    balances: BalancesResponse
    lines: list[StatementLineResponse]
    sessions: list[SessionResponse]


class SessionKey(Model):
    box_id: BoxIdText
    session_id: IdHex


class InvoiceRequest(Model):
    sessions: Annotated[list[SessionKey], Field(min_length=1, max_length=200)]


class InvoiceResponse(Model):
    number: str
    created_at: int
    total_fen: int
    energy_wh: int
    sessions: list[SessionResponse]
    html_url: str


class InvoiceSummary(Model):
    number: str
    created_at: int
    total_fen: int


# --- boxes and registry ----------------------------------------------------------------------------


class OutletStateResponse(Model):
    number: int
    rated_power_w: int
    available: bool | None
    reserved_now: bool


class NearbyBoxResponse(Model):
    box_id: str
    distance_m: int
    latitude_microdeg: int
    longitude_microdeg: int
    price_fen_per_kwh: int | None
    last_seen_at: int | None
    outlets: list[OutletStateResponse]


class SignedVersionResponse(Model):
    version: int
    issued_at: int
    signed: Base64


class OutletRequest(Model):
    number: Annotated[int, Field(ge=1, le=99)]
    rated_power_w: Annotated[int, Field(ge=1, le=100_000)]


class ProvisionRequest(Model):
    box_id: BoxIdText
    public_key: KeyHex
    outlets: Annotated[list[OutletRequest], Field(min_length=1, max_length=16)]
    latitude_microdeg: Annotated[int, Field(ge=-90_000_000, le=90_000_000)]
    longitude_microdeg: Annotated[int, Field(ge=-180_000_000, le=180_000_000)]
    tariff_region: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,32}$")]


class QrLabelResponse(Model):
    outlet: int
    label: str


class ProvisionedBoxResponse(Model):
    box_id: str
    certificate: Base64
    certificate_expires_at: int
    advertised_name: str
    labels: list[QrLabelResponse]


class BoxSummaryResponse(Model):
    box_id: str
    provisioned_at: int
    last_seen_at: int | None
    contiguous_sequence: int
    applied_sequence: int


class CommandRequest(Model):
    kind: Literal["remote_stop", "trip"]
    outlet: Annotated[int, Field(ge=1, le=99)]
    session_id: IdHex | None = None


class CommandResponse(Model):
    command_id: int
    box_id: str
    kind: Literal["remote_stop", "trip"]
    outlet: int
    session_id: IdHex | None
    created_at: int
    completed_at: int | None
    result: Literal["done", "failed"] | None
    detail: str | None


class RevokeRequest(Model):
    grant_ids: Annotated[list[IdHex], Field(max_length=1000)] = []
    phone_keys: Annotated[list[KeyHex], Field(max_length=1000)] = []
    user_ids: Annotated[list[Annotated[int, Field(ge=0, le=2**32 - 1)]], Field(max_length=1000)] = []


class ScopedPrice(Model):
    scope: Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]{1,32}$")]
    price_fen_per_kwh: Annotated[int, Field(ge=0, le=1_000_000)]


class TariffRequest(Model):
    default_price_fen_per_kwh: Annotated[int, Field(ge=0, le=1_000_000)]
    region_prices: Annotated[list[ScopedPrice], Field(max_length=1000)] = []
    box_prices: Annotated[list[ScopedPrice], Field(max_length=1000)] = []


class StaffRequest(Model):
    username: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.-]{2,63}$")]
    password: Annotated[str, StringConstraints(min_length=8, max_length=128)]
    role: Literal["operator", "technician"]


class StaffResponse(Model):
    staff_id: int
    username: str
    role: str


class AnomalyResponse(Model):
    anomaly_id: int
    kind: str
    code: int
    detail: str
    box_id: str | None
    sequence: int | None
    grant_id: IdHex | None
    user_id: int | None
    created_at: int
    resolved_at: int | None


class BooksResponse(Model):
    balanced: bool
    accounts: int
    transactions: int
    transfers: int
    total_fen: int
    problems: list[str]


class ReconcileResponse(Model):
    entries_applied: int
    boxes_settled: int
    grants_released: int
    gaps: int
    books: BooksResponse


class DailyFiguresResponse(Model):
    box_id: str
    day: str
    sessions: int
    energy_wh: int
    revenue_fen: int


# --- ledger and uplink -----------------------------------------------------------------------------


class LedgerBatchRequest(Model):
    entries: Annotated[list[ShortBase64], Field(min_length=1, max_length=10_000)]


class SealedBatchRequest(Model):
    sealed_batch: Base64


class BatchResultResponse(Model):
    box_id: str
    received: int
    stored: int
    duplicates: int
    forks: int
    waiting: int
    contiguous_sequence: int
    applied_sequence: int
    ledger_ack: Base64 | None


class CommandCompletionRequest(Model):
    command_id: Annotated[int, Field(ge=1, le=2**62)]
    result: Literal["done", "failed"]
    detail: PlainText = ""


class OutletAvailabilityRequest(Model):
    number: Annotated[int, Field(ge=1, le=99)]
    available: bool


class PollRequestBody(Model):
    revocation_version: Annotated[int, Field(ge=0, le=2**62)] = 0
    tariff_version: Annotated[int, Field(ge=0, le=2**62)] = 0
    ack_sequence: Annotated[int, Field(ge=0, le=2**62)] = 0
    known_reservations: Annotated[list[IdHex], Field(max_length=100)] = []
    received_commands: Annotated[list[Annotated[int, Field(ge=1, le=2**62)]], Field(max_length=100)] = []
    completed_commands: Annotated[list[CommandCompletionRequest], Field(max_length=100)] = []
    outlets: Annotated[list[OutletAvailabilityRequest], Field(max_length=100)] = []
    box_time: Time | None = None
    wait_seconds: Annotated[int, Field(ge=0, le=60)] = 0


class PollResponseBody(Model):
    revocation_list: SignedVersionResponse | None
    tariff_table: SignedVersionResponse | None
    ledger_ack: Base64 | None
    ack_sequence: int
    reservations: list[Base64] | None = Field(description="every current reservation; null when unchanged")
    commands: list[CommandResponse]
    server_time: int
