"""The box's checks on what a phone presents (S1) and the phone's check on a box (S2).

Pure functions: every fact they need (the clock, trusted keys, the newest revocation list, the
price, the spent-grant set) is passed in. docs/protocol.md §7.3 lists the order of the checks;
the first failing one gives the error code the phone sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocol import cose, gatt
from protocol.errors import ErrorCode, GrantError, TokenError
from protocol.tokens import (
    BalanceGrant,
    BoxCertificate,
    Reservation,
    RevocationList,
    UnlockToken,
    check_grant_size,
    same_key,
)


class SpentGrants(Protocol):
    """The box daemon's persistent set of grant ids already used at this box."""

    def is_spent(self, grant_id: bytes) -> bool: ...


def _check_revocation(
    revocations: RevocationList | None, *, grant_id: bytes | None, holder_key: Ed25519PublicKey, user_id: int
) -> None:
    if revocations is None:
        return
    if grant_id is not None and grant_id in revocations.grant_ids:
        raise GrantError("grant revoked", code=ErrorCode.GRANT_REVOKED)
    if cose.public_key_bytes(holder_key) in revocations.phone_keys:
        raise GrantError("phone key revoked", code=ErrorCode.PHONE_REVOKED)
    if user_id in revocations.user_ids:
        raise GrantError("user revoked", code=ErrorCode.USER_REVOKED)


def check_grant(
    signed_grant: bytes,
    *,
    operator_keys: Mapping[bytes, Ed25519PublicKey],
    box_id: str,
    connection_key: Ed25519PublicKey,
    now: int,
    revocations: RevocationList | None,
    price_fen_per_kwh: int,
    spent: SpentGrants,
) -> BalanceGrant:
    """S1: operator-signed, unexpired, for this box, unrevoked, held by this connection's key,
    at an accepted price, and not spent here before. Raises TokenError or GrantError."""
    check_grant_size(signed_grant)
    grant = BalanceGrant.verify(signed_grant, operator_keys)
    if now >= grant.expires_at:
        raise GrantError("grant expired", code=ErrorCode.GRANT_EXPIRED)
    if grant.box_id is not None and grant.box_id != box_id:
        raise GrantError("grant is for another box", code=ErrorCode.GRANT_WRONG_BOX)
    _check_revocation(revocations, grant_id=grant.grant_id, holder_key=grant.phone_key, user_id=grant.user_id)
    if not same_key(grant.phone_key, connection_key):
        raise GrantError("grant is bound to another phone", code=ErrorCode.GRANT_WRONG_HOLDER)
    if price_fen_per_kwh > grant.max_price_fen_per_kwh:
        raise GrantError("price above the grant's limit", code=ErrorCode.GRANT_PRICE_ABOVE_LIMIT)
    if grant.amount_fen == 0:
        raise GrantError("grant of zero", code=ErrorCode.GRANT_TOO_SMALL)
    if spent.is_spent(grant.grant_id):
        raise GrantError("grant already used at this box", code=ErrorCode.GRANT_SPENT)
    return grant


def check_unlock_token(
    signed_token: bytes,
    *,
    operator_keys: Mapping[bytes, Ed25519PublicKey],
    box_id: str,
    connection_key: Ed25519PublicKey,
    now: int,
    revocations: RevocationList | None,
) -> UnlockToken:
    """An UnlockToken opens its door only at its box, in its window, for its holder's key."""
    token = UnlockToken.verify(signed_token, operator_keys)
    if token.box_id != box_id:
        raise GrantError("token is for another box", code=ErrorCode.GRANT_WRONG_BOX)
    if now >= token.expires_at:
        raise GrantError("token expired", code=ErrorCode.GRANT_EXPIRED)
    if now < token.not_before:
        raise TokenError("token not valid yet", code=ErrorCode.TOKEN_NOT_YET_VALID)
    _check_revocation(
        revocations, grant_id=token.token_id, holder_key=token.holder_key, user_id=token.holder_id
    )
    if not same_key(token.holder_key, connection_key):
        raise GrantError("token is bound to another phone", code=ErrorCode.GRANT_WRONG_HOLDER)
    return token


def check_reservation(
    signed_reservation: bytes,
    *,
    operator_keys: Mapping[bytes, Ed25519PublicKey],
    box_id: str,
    outlet: int,
    connection_key: Ed25519PublicKey,
    now: int,
) -> Reservation:
    reservation = Reservation.verify(signed_reservation, operator_keys)
    if reservation.box_id != box_id or reservation.outlet != outlet:
        raise GrantError("reservation is for another outlet", code=ErrorCode.TOKEN_NOT_FOR_THIS_DOOR)
    if not reservation.not_before <= now < reservation.expires_at:
        raise GrantError("reservation outside its window", code=ErrorCode.GRANT_EXPIRED)
    if not same_key(reservation.phone_key, connection_key):
        raise GrantError("reservation is bound to another phone", code=ErrorCode.GRANT_WRONG_HOLDER)
    return reservation


def check_box_certificate(
    signed_certificate: bytes,
    *,
    operator_keys: Mapping[bytes, Ed25519PublicKey],
    label: gatt.QrLabel,
    now: int,
) -> BoxCertificate:
    """S2: the certificate is operator-signed, current, and names the box and key on the QR label."""
    certificate = BoxCertificate.verify(signed_certificate, operator_keys)
    if certificate.box_id != label.box_id:
        raise TokenError("certificate names another box", code=ErrorCode.EDHOC_WRONG_BOX)
    fingerprint = gatt.box_key_fingerprint(cose.public_key_bytes(certificate.box_public_key))
    if fingerprint != label.fingerprint:
        raise TokenError("box key does not match the label", code=ErrorCode.EDHOC_WRONG_BOX)
    if now >= certificate.expires_at:
        raise TokenError("box certificate expired", code=ErrorCode.TOKEN_EXPIRED)
    if certificate.outlet(label.outlet) is None:
        raise TokenError("the label names an outlet the box does not have", code=ErrorCode.OUTLET_UNKNOWN)
    return certificate


__all__ = [
    "SpentGrants",
    "check_box_certificate",
    "check_grant",
    "check_reservation",
    "check_unlock_token",
]
