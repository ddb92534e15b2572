"""Deterministic keys and sample objects for tests, vectors and the walk-through.

Never used by a running box, phone or server: their keys come from their own stores.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import cose
from protocol.tokens import BalanceGrant, BoxCertificate, OutletSpec


def seed(label: str) -> bytes:
    return hashlib.sha256(b"powerbox test key " + label.encode()).digest()


def ed25519_key(label: str) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(seed(label))


def x25519_key(label: str) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(seed(label))


def operator_key(label: str = "operator") -> cose.SigningKey:
    return cose.SigningKey.from_private_key(ed25519_key(label))


SAMPLE_TIME = 1_795_000_000  # 2026-11-18, a fixed "now" for vectors
SAMPLE_BOX_ID = "BOX-7F3A21"


def sample_certificate(box_key: Ed25519PrivateKey, *, box_id: str = SAMPLE_BOX_ID) -> BoxCertificate:
    return BoxCertificate(
        box_id=box_id,
        box_public_key=box_key.public_key(),
        outlets=tuple(OutletSpec(number=n, rated_power_w=3500) for n in (1, 2, 3, 4)),
        latitude_microdeg=31_230_416,
        longitude_microdeg=121_473_701,
        tariff_region="SH-01",
        issued_at=SAMPLE_TIME - 86_400,
        expires_at=SAMPLE_TIME + 5 * 365 * 86_400,
    )


def sample_grant(
    phone_key: Ed25519PrivateKey,
    *,
    grant_id: bytes = b"grant-01",
    amount_fen: int = 500,
    box_id: str | None = SAMPLE_BOX_ID,
    max_price_fen_per_kwh: int = 150,
    issued_at: int = SAMPLE_TIME - 3600,
    expires_at: int = SAMPLE_TIME + 7 * 86_400,
) -> BalanceGrant:
    return BalanceGrant(
        grant_id=grant_id,
        user_id=1001,
        box_id=box_id,
        phone_key=phone_key.public_key(),
        amount_fen=amount_fen,
        max_price_fen_per_kwh=max_price_fen_per_kwh,
        max_session_seconds=12 * 3600,
        issued_at=issued_at,
        expires_at=expires_at,
    )
