"""What every route needs: the server context, the caller, and conversions at the HTTP edge."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ledger_server import auth
from ledger_server.api import models
from ledger_server.auth import AccessToken, Principal, Role
from ledger_server.context import ServerContext
from ledger_server.errors import MalformedRequestError, UnauthenticatedError
from ledger_server.money import Balances
from ledger_server.registry import BoxCommand, SignedVersion

_bearer = HTTPBearer(auto_error=False, description="a token from one of the /v1/auth/*/token endpoints")


def get_context(request: Request) -> ServerContext:
    context = request.app.state.context
    assert isinstance(context, ServerContext)
    return context


Context = Annotated[ServerContext, Depends(get_context)]


async def get_bearer_token(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise UnauthenticatedError("a bearer token is needed")
    return credentials.credentials


BearerToken = Annotated[str, Depends(get_bearer_token)]


async def get_principal(context: Context, token: BearerToken) -> Principal:
    return await auth.authenticate(context, token)


Caller = Annotated[Principal, Depends(get_principal)]


def _role_dependency(*roles: Role) -> object:
    async def check(principal: Caller) -> Principal:
        principal.require(*roles)
        return principal

    return Depends(check)


UserCaller = Annotated[Principal, _role_dependency(Role.USER)]
OperatorCaller = Annotated[Principal, _role_dependency(Role.OPERATOR)]
StaffCaller = Annotated[Principal, _role_dependency(Role.OPERATOR, Role.TECHNICIAN)]
PersonCaller = Annotated[Principal, _role_dependency(Role.USER, Role.OPERATOR, Role.TECHNICIAN)]
BoxCaller = Annotated[Principal, _role_dependency(Role.BOX)]


def from_base64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedRequestError(f"{what} is not valid base64") from None


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def from_hex(text: str) -> bytes:
    return bytes.fromhex(text)  # the models' patterns admit only even-length lowercase hex


def token_response(token: AccessToken) -> models.TokenResponse:
    principal = token.principal
    return models.TokenResponse.model_validate(
        {
            "access_token": token.token,
            "expires_at": token.expires_at,
            "principal": str(principal.kind),
            "subject": principal.subject,
            "role": str(principal.role),
        }
    )


def balances_response(balances: Balances) -> models.BalancesResponse:
    return models.BalancesResponse(
        available_fen=balances.available_fen, frozen_fen=balances.frozen_fen, arrears_fen=balances.arrears_fen
    )


def signed_version_response(signed: SignedVersion) -> models.SignedVersionResponse:
    return models.SignedVersionResponse(
        version=signed.version, issued_at=signed.issued_at, signed=to_base64(signed.signed)
    )


def command_response(command: BoxCommand) -> models.CommandResponse:
    return models.CommandResponse.model_validate(
        {
            "command_id": command.command_id,
            "box_id": command.box_id,
            "kind": str(command.kind),
            "outlet": command.outlet,
            "session_id": None if command.session_id is None else command.session_id.hex(),
            "created_at": command.created_at,
            "completed_at": command.completed_at,
            "result": None if command.result is None else str(command.result),
            "detail": command.detail,
        }
    )
