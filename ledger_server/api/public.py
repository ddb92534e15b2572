"""Routes anyone may call: health, the operator's public keys, and logging in."""

from __future__ import annotations

from fastapi import APIRouter, status

from ledger_server import auth
from ledger_server.api import models
from ledger_server.api.deps import BearerToken, Caller, Context, from_base64, to_base64, token_response
from protocol import cose, sealing

router = APIRouter()


@router.get("/healthz", tags=["public"])
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/v1/operator-keys", tags=["public"])
async def operator_keys(context: Context) -> models.OperatorKeysResponse:
    """The keys boxes and phones trust: every signing key still in rotation, and the key to seal to."""
    keys = context.keys
    return models.OperatorKeysResponse(
        signing_keys=[
            models.VerificationKey(
                key_id=kid.hex(),
                public_key=cose.public_key_bytes(key.public_key).hex(),
                active=kid == keys.active_signing_kid,
            )
            for kid, key in sorted(keys.signing_keys.items())
        ],
        encryption_key_id=keys.active_encryption_kid.hex(),
        encryption_public_key=sealing.x25519_public_bytes(keys.encryption_public_key).hex(),
    )


@router.post("/v1/auth/shared/code", status_code=status.HTTP_202_ACCEPTED, tags=["auth"])
async def shared_code(context: Context, body: models.SharedCodeRequest) -> models.CodeSent:
    """Text a one-time code to a shared user's phone."""
    return models.CodeSent(expires_in=await auth.request_shared_code(context, body.phone))


@router.post("/v1/auth/shared/token", tags=["auth"])
async def shared_token(context: Context, body: models.SharedTokenRequest) -> models.TokenResponse:
    """Sign up or log in as a shared user with the code texted to the phone."""
    return token_response(await auth.login_shared_user(context, body.phone, body.code))


@router.post("/v1/auth/account/code", status_code=status.HTTP_202_ACCEPTED, tags=["auth"])
async def account_code(context: Context, body: models.AccountCodeRequest) -> models.CodeSent:
    """Check an electricity account's password; text a code to the account's phone."""
    return models.CodeSent(
        expires_in=await auth.request_account_code(context, body.account_number, body.password)
    )


@router.post("/v1/auth/account/token", tags=["auth"])
async def account_token(context: Context, body: models.AccountTokenRequest) -> models.TokenResponse:
    """Bind an electricity account (number, password, code) and log in as its user."""
    return token_response(
        await auth.login_account_user(context, body.account_number, body.password, body.code)
    )


@router.post("/v1/auth/staff/token", tags=["auth"])
async def staff_token(context: Context, body: models.StaffTokenRequest) -> models.TokenResponse:
    return token_response(await auth.login_staff(context, body.username, body.password))


@router.post("/v1/auth/box/challenge", tags=["auth"])
async def box_challenge(context: Context, body: models.BoxChallengeRequest) -> models.BoxChallenge:
    """A nonce for the box to sign with its key (protocol.proofs, context BOX_UPLINK)."""
    nonce, expires_at = await auth.box_challenge(context, body.box_id)
    return models.BoxChallenge(nonce=to_base64(nonce), expires_at=expires_at)


@router.post("/v1/auth/box/token", tags=["auth"])
async def box_token(context: Context, body: models.BoxTokenRequest) -> models.TokenResponse:
    nonce = from_base64(body.nonce, "nonce")
    proof = from_base64(body.proof, "proof")
    return token_response(await auth.login_box(context, body.box_id, nonce, proof))


@router.post("/v1/auth/logout", status_code=status.HTTP_204_NO_CONTENT, tags=["auth"])
async def logout(context: Context, caller: Caller, token: BearerToken) -> None:
    """End this bearer token now (it would expire on its own)."""
    del caller  # proves the token is live
    await auth.revoke_token(context, token)
