"""The FastAPI application factory: storage, keys and providers are chosen here, once.

Every error leaves as `{"error": {"code": <ErrorCode>, "name": ..., "detail": ...}}` with a 4xx for
anything the caller can fix and 503 when the database is away; nothing a client sends crashes the
process (DESIGN §7 S4).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ledger_server.api import boxes, operator, public, users
from ledger_server.api.models import ErrorBody
from ledger_server.config import Clock, ServerConfig, system_clock
from ledger_server.errors import ServerError
from ledger_server.providers import PaymentProvider, SmsProvider
from ledger_server.runtime import open_context
from protocol.errors import ErrorCode

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_STATUS_CODES = {
    401: ErrorCode.API_UNAUTHENTICATED,
    403: ErrorCode.API_FORBIDDEN,
    404: ErrorCode.API_NOT_FOUND,
    413: ErrorCode.API_TOO_LARGE,
}


def error_response(status: int, code: ErrorCode, detail: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        status_code=status,
        content={"error": {"code": int(code), "name": code.name, "detail": detail}},
        headers=headers,
    )


class BodyLimit:
    """Refuses a request body above `limit` bytes with 413 before any route reads it."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await error_response(413, ErrorCode.API_TOO_LARGE, f"bodies are at most {self.limit} bytes")(
                scope, receive, send
            )
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await error_response(413, ErrorCode.API_TOO_LARGE, f"bodies are at most {self.limit} bytes")(
                    scope, receive, send
                )
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(
    config: ServerConfig,
    *,
    clock: Clock = system_clock,
    sms: SmsProvider | None = None,
    payments: PaymentProvider | None = None,
    migrate: bool = True,
) -> FastAPI:
    """The server. `sms` and `payments` default to the development providers."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_context(config, clock=clock, sms=sms, payments=payments, migrate=migrate) as context:
            app.state.context = context
            yield

    app = FastAPI(
        title="powerbox settlement server",
        version="1",
        description="Accounts, grants, box registry, ledger ingest and settlement (docs/server-api.md).",
        lifespan=lifespan,
        responses={
            400: {"model": ErrorBody, "description": "malformed request or refused ledger batch"},
            401: {"model": ErrorBody, "description": "no valid bearer token, or wrong credentials"},
            403: {"model": ErrorBody, "description": "not allowed for this caller"},
            404: {"model": ErrorBody, "description": "not found (or not yours)"},
            409: {"model": ErrorBody, "description": "conflicts with the current state"},
            413: {"model": ErrorBody, "description": "body or batch too large"},
            422: {"model": ErrorBody, "description": "the body does not match the schema"},
            429: {"model": ErrorBody, "description": "too many attempts"},
            503: {"model": ErrorBody, "description": "database unavailable; retry"},
        },
    )

    @app.exception_handler(ServerError)
    async def on_server_error(request: Request, error: ServerError) -> JSONResponse:
        if error.status >= 500:
            log.error("%s %s failed: %s", request.method, request.url.path, error.detail, exc_info=error)
            detail = error.detail if error.status == 503 else "internal error"
            return error_response(error.status, error.code, detail)
        return error_response(error.status, error.code, error.detail)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        del request
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg', '')}"
            for item in error.errors()[:5]
        )
        return error_response(422, ErrorCode.API_MALFORMED, problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        del request
        code = _STATUS_CODES.get(error.status_code, ErrorCode.API_MALFORMED)
        return error_response(error.status_code, code, str(error.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s crashed", request.method, request.url.path, exc_info=error)
        return error_response(500, ErrorCode.INTERNAL, "internal error")

    app.include_router(public.router)
    app.include_router(users.router)
    app.include_router(operator.router)
    app.include_router(boxes.router)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    return app
