"""`powerbox phone ...`: the phone as a command line, for field technicians and as the reference
for the mobile apps (DESIGN §5).

Everything at the box works with no network at all (scan, start, watch, top-up, stop, door,
unlock, visit); the server commands (login, deposit, grant request, nearby, reserve, sync,
statement, invoices) need one. Every command takes `--json` (one JSON object per line, each with
an "event" field) and `--wallet PATH`. Errors are one readable line with the box's or server's
code; exit status 1. A traceback only ever appears for a bug, and only with POWERBOX_DEBUG=1.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import json
import os
import re
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from phone_client import display
from phone_client.at_box import BoxVisit, LiveReading, SessionClosed, label_for_session
from phone_client.central import find_box, read_box_info
from phone_client.display import kwh, price, short, when, yuan
from phone_client.errors import (
    BoxRefusedError,
    BoxUnreachableError,
    LabelError,
    PhoneError,
    PrerequisiteError,
    ServerUnreachableError,
)
from phone_client.qr import read_label
from phone_client.server_api import AccessToken, ServerApi, check_server_url, new_idempotency_key
from phone_client.sync import sync
from phone_client.wallet import (
    GrantState,
    Login,
    SessionState,
    StoredToken,
    Wallet,
    WalletSession,
    default_wallet_path,
)
from protocol import cose, gatt, messages
from protocol.errors import ErrorCode, PowerboxError
from protocol.tokens import OutletSpec

# --- parameters -----------------------------------------------------------------------------------

_MONEY = re.compile(r"(?:¥|CNY\s*)?(\d{1,9})(?:\.(\d{1,2}))?")
_FEN = re.compile(r"(\d{1,10})\s*fen")
_DURATION = re.compile(r"(\d{1,7})\s*([smhd]?)")
_DEGREES = re.compile(r"(-?)(\d{1,3})(?:\.(\d{1,6}))?")


class Money(click.ParamType[int, Any]):
    """An amount in yuan ("12", "12.5", "¥12.50") or in fen ("1250fen"); integer fen inside."""

    name = "amount"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        if match := _FEN.fullmatch(text):
            fen = int(match.group(1))
        elif match := _MONEY.fullmatch(text):
            fen = int(match.group(1)) * 100 + int((match.group(2) or "0").ljust(2, "0"))
        else:
            self.fail(f"{text!r} is not an amount: write yuan like 12.50, or fen like 1250fen", param, ctx)
        if not 0 < fen <= 1_000_000_000:
            self.fail(f"{text!r}: the amount must be above zero and at most ¥10,000,000", param, ctx)
        return fen


class Duration(click.ParamType[int, Any]):
    """Seconds, or with a unit: 90s, 30m, 12h, 7d."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = _DURATION.fullmatch(str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a duration: write 90s, 30m, 12h or 7d", param, ctx)
        seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}[match.group(2)]
        if seconds <= 0:
            self.fail("the duration must be above zero", param, ctx)
        return seconds


class MicroDegrees(click.ParamType[int, Any]):
    """A latitude or longitude in degrees ("31.230416"), kept as integer microdegrees."""

    name = "degrees"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        match = _DEGREES.fullmatch(str(value).strip())
        if match is None:
            self.fail(f"{value!r} is not a position in degrees like 31.230416", param, ctx)
        sign = -1 if match.group(1) else 1
        return sign * (int(match.group(2)) * 1_000_000 + int((match.group(3) or "0").ljust(6, "0")))


MONEY = Money()
DURATION = Duration()
DEGREES = MicroDegrees()

# --- output ---------------------------------------------------------------------------------------


class Output:
    """Readable output on a terminal, or one JSON object per line for scripts (`--json`)."""

    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(highlight=False)
        self.errors = Console(stderr=True, highlight=False)

    def emit(self, event: str, data: dict[str, Any], *shown: RenderableType | str) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps({"event": event, **data}) + "\n")
            sys.stdout.flush()
            return
        for renderable in shown:
            self.console.print(renderable)

    def say(self, *shown: RenderableType | str) -> None:
        """Human-only text (a hint, a step); `--json` leaves it out."""
        if not self.as_json:
            for renderable in shown:
                self.console.print(renderable)

    @contextlib.contextmanager
    def working(self, text: str) -> Iterator[None]:
        """A spinner while waiting on the radio or the network, when a person is watching."""
        if self.as_json or not self.console.is_terminal:
            yield
            return
        with self.console.status(text):
            yield

    def error(self, error: PhoneError) -> None:
        if self.as_json:
            sys.stdout.write(json.dumps(display.error_json(error)) + "\n")
            sys.stdout.flush()
        else:
            self.errors.print(display.error_text(error))


@dataclass(frozen=True, slots=True, kw_only=True)
class RootOptions:
    wallet_path: Path | None
    server: str | None
    as_json: bool


@dataclass(slots=True, kw_only=True)
class Phone:
    """What every command body gets: the open wallet, the output, the options."""

    wallet: Wallet
    out: Output
    server: str | None
    scan_timeout_s: float = 10.0

    def now(self) -> int:
        return self.wallet.now()

    async def server_api(self, *, login_required: bool = True) -> ServerApi:
        """The configured server, with the saved login if it belongs to that server."""
        login = await self.wallet.login()
        url = self.server or await self.wallet.server_url() or (login.server_url if login else None)
        if url is None:
            raise PrerequisiteError(
                "no server configured: `powerbox phone server URL` (everything at the box works without one)"
            )
        url = check_server_url(url)
        token = login.access_token if login is not None and login.server_url == url else None
        if login_required:
            if token is None or login is None:
                raise PrerequisiteError(
                    f"not logged in to {url}: `powerbox phone login shared PHONE` (or account, staff)",
                    code=ErrorCode.API_UNAUTHENTICATED,
                )
            if login.expired(self.now()):
                raise PrerequisiteError(
                    "the login has expired: log in again", code=ErrorCode.API_UNAUTHENTICATED
                )
        return ServerApi(url, token=token)


CommandBody = Callable[..., Awaitable[None]]


def _run(options: RootOptions, body: Callable[[Phone], Awaitable[None]], *, scan_timeout_s: float) -> None:
    out = Output(as_json=options.as_json)

    async def main() -> None:
        async with Wallet.open(options.wallet_path or default_wallet_path()) as wallet:
            await body(Phone(wallet=wallet, out=out, server=options.server, scan_timeout_s=scan_timeout_s))

    try:
        asyncio.run(main())
    except PhoneError as exc:
        out.error(exc)
        sys.exit(1)
    except PowerboxError as exc:  # a protocol-level refusal that reached us unwrapped
        out.error(PhoneError(exc.detail, code=exc.code))
        sys.exit(1)
    except KeyboardInterrupt:
        out.say(Text("interrupted", style="dim"))
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line; the traceback only on request
        if os.environ.get("POWERBOX_DEBUG"):
            traceback.print_exc()
        out.error(PhoneError(f"internal error ({type(exc).__name__}: {exc}); POWERBOX_DEBUG=1 shows where"))
        sys.exit(70)


def command(
    group: click.Group, name: str | None = None, *, radio: bool = False
) -> Callable[[CommandBody], click.Command]:
    """Make an async `body(phone, **params)` a click command with `--json` and `--wallet`
    (and `--scan-timeout` for commands that use the radio)."""

    def decorate(body: CommandBody) -> click.Command:
        @functools.wraps(body)
        def callback(
            json_flag: bool, wallet_path: Path | None, scan_timeout: float = 10.0, **params: Any
        ) -> None:
            root = click.get_current_context().find_object(RootOptions) or RootOptions(
                wallet_path=None, server=None, as_json=False
            )
            options = RootOptions(
                wallet_path=wallet_path or root.wallet_path,
                server=root.server,
                as_json=json_flag or root.as_json,
            )
            _run(options, lambda phone: body(phone, **params), scan_timeout_s=scan_timeout)

        decorated: Any = callback
        if radio:
            decorated = click.option(
                "--scan-timeout",
                type=click.FloatRange(0.5, 120),
                default=10.0,
                show_default=True,
                help="Seconds to look for the box.",
            )(decorated)
        decorated = click.option("--json", "json_flag", is_flag=True, help="One JSON object per line.")(
            decorated
        )
        decorated = click.option(
            "--wallet",
            "wallet_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help="The wallet file (default: the user's data directory).",
        )(decorated)
        made: click.Command = group.command(name)(decorated)
        return made

    return decorate


@click.group()
@click.option(
    "--wallet",
    "wallet_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="POWERBOX_WALLET",
    default=None,
    help="The wallet file [env POWERBOX_WALLET; default: the user's data directory].",
)
@click.option("--server", envvar="POWERBOX_SERVER", default=None, help="Settlement server URL for this run.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, for scripts.")
@click.pass_context
def phone(ctx: click.Context, wallet_path: Path | None, server: str | None, as_json: bool) -> None:
    """The phone: unlock outlets over Bluetooth offline, carry ledgers, sync when online."""
    ctx.obj = RootOptions(wallet_path=wallet_path, server=server, as_json=as_json)


# --- the wallet itself ----------------------------------------------------------------------------


@command(phone)
async def status(phone: Phone) -> None:
    """What the wallet holds: key, login, grants, running sessions, things to carry."""
    wallet = phone.wallet
    now = phone.now()
    login = await wallet.login()
    grants = await wallet.grants()
    available = [g for g in grants if g.status(now) == "available"]
    running = await wallet.sessions(running_only=True)
    pending = await wallet.batches(pending_only=True)
    acks = [a for a in await wallet.acks() if not a.delivered]
    revocations = await wallet.update(messages.UpdateKind.REVOCATION_LIST)
    tariffs = await wallet.update(messages.UpdateKind.TARIFF_TABLE)
    snapshot = await wallet.statement()
    device_key = (await wallet.device_public_key()).hex()
    server_url = phone.server or await wallet.server_url()
    operator_keys = len(await wallet.operator_keys())
    available_fen = sum(g.remaining_fen for g in available)
    data: dict[str, Any] = {
        "wallet": str(wallet.path),
        "device_key": device_key,
        "server": server_url,
        "login": None
        if login is None
        else {
            "principal": login.principal,
            "subject": login.subject,
            "role": login.role,
            "expired": login.expired(now),
        },
        "operator_keys": operator_keys,
        "grants_available": len(available),
        "grants_available_fen": available_fen,
        "running_sessions": [display.session_json(s) for s in running],
        "batches_to_carry": len(pending),
        "acks_to_deliver": [display.ack_json(a) for a in acks],
        "revocation_version": None if revocations is None else revocations.version,
        "tariff_version": None if tariffs is None else tariffs.version,
        "balances": None
        if snapshot is None
        else {
            "available_fen": snapshot.statement.balances.available_fen,
            "frozen_fen": snapshot.statement.balances.frozen_fen,
            "arrears_fen": snapshot.statement.balances.arrears_fen,
            "as_of": snapshot.fetched_at,
        },
    }
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim")
    table.add_row("wallet", str(wallet.path))
    table.add_row("device key", device_key)
    table.add_row("server", server_url or "none (offline only)")
    table.add_row(
        "login",
        "none"
        if login is None
        else f"{login.principal} {login.subject} ({login.role})"
        + (" - expired" if login.expired(now) else ""),
    )
    table.add_row("operator keys", str(operator_keys))
    table.add_row("grants", f"{len(available)} available, {yuan(available_fen)}")
    table.add_row("running sessions", ", ".join(f"{s.box_id}/{s.outlet}" for s in running) or "none")
    table.add_row("to carry", f"{len(pending)} ledger batches, {len(acks)} acks for boxes")
    table.add_row("revocation list", "none" if revocations is None else f"v{revocations.version}")
    table.add_row("tariff table", "none" if tariffs is None else f"v{tariffs.version}")
    if snapshot is not None:
        balances = snapshot.statement.balances
        table.add_row(
            "deposit",
            f"{yuan(balances.available_fen)} available, {yuan(balances.frozen_fen)} in grants"
            + (f", {yuan(balances.arrears_fen)} owed" if balances.arrears_fen else "")
            + f" (as of {when(snapshot.fetched_at)})",
        )
    phone.out.emit("status", data, table)


@command(phone)
async def key(phone: Phone) -> None:
    """This phone's public key (the server binds grants to it)."""
    public = await phone.wallet.device_public_key()
    phone.out.emit("key", {"device_key": public.hex()}, public.hex())


@command(phone)
@click.argument("keys", nargs=-1)
async def trust(phone: Phone, keys: tuple[str, ...]) -> None:
    """Trust operator signing keys (hex); with no KEYS, list the trusted ones.

    `sync` and `login` fetch them from the server; this is for a phone set up offline."""
    for text in keys:
        try:
            public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(text.strip()))
        except ValueError:
            raise PrerequisiteError(f"{text!r} is not an Ed25519 public key in hex (64 digits)") from None
        added = await phone.wallet.trust_operator_key(public, source="manual")
        phone.out.say(f"{'trusting' if added else 'already trusted:'} {cose.key_id_for(public).hex()}")
    trusted = await phone.wallet.operator_keys()
    table = Table("key id", "public key", title="trusted operator keys")
    for kid, public in sorted(trusted.items()):
        table.add_row(kid.hex(), cose.public_key_bytes(public).hex())
    phone.out.emit(
        "operator_keys",
        {
            "operator_keys": [
                {"key_id": kid.hex(), "public_key": cose.public_key_bytes(k).hex()}
                for kid, k in sorted(trusted.items())
            ]
        },
        table,
    )


# --- the server -----------------------------------------------------------------------------------


@command(phone)
@click.argument("url", required=False)
@click.option("--forget", is_flag=True, help="Forget the server: the phone stays offline.")
async def server(phone: Phone, url: str | None, forget: bool) -> None:
    """Show or set the settlement server this wallet talks to."""
    if forget:
        await phone.wallet.set_server_url(None)
    elif url is not None:
        await phone.wallet.set_server_url(check_server_url(url))
    current = await phone.wallet.server_url()
    phone.out.emit("server", {"server": current}, f"server: {current or 'none (offline only)'}")


async def _logged_in(phone: Phone, api: ServerApi, token: AccessToken) -> None:
    """Keep the login, trust the operator's keys, register this phone's key with the account."""
    await phone.wallet.save_login(
        Login(
            server_url=api.base_url,
            access_token=token.access_token,
            expires_at=token.expires_at,
            principal=token.principal,
            subject=token.subject,
            role=token.role,
            device_registered=False,
        )
    )
    if await phone.wallet.server_url() is None:
        await phone.wallet.set_server_url(api.base_url)
    for operator_key in (await api.operator_keys()).signing_keys:
        await phone.wallet.trust_operator_key(operator_key, source=api.base_url)
    await api.register_device(await phone.wallet.device_key(), token)
    await phone.wallet.mark_device_registered()
    phone.out.emit(
        "logged_in",
        {
            "principal": token.principal,
            "subject": token.subject,
            "role": token.role,
            "expires_at": token.expires_at,
        },
        Text.assemble(
            ("logged in ", "green"),
            f"as {token.principal} {token.subject} ({token.role}) until {when(token.expires_at)}; "
            "this phone's key is registered",
        ),
    )


def _code_sent(phone: Phone, to: str, seconds: int) -> None:
    phone.out.emit(
        "code_sent",
        {"to": to, "expires_in": seconds},
        f"a one-time code was texted to {to}; it is good for {seconds // 60} minutes. "
        "Run the same command again with --code CODE.",
    )


@click.group()
def login() -> None:
    """Sign up or log in (shared user, electricity-account user, or staff)."""


phone.add_command(login)


@command(login, "shared")
@click.argument("phone_number")
@click.option("--code", help="The one-time code texted to the phone (leave out to have one sent).")
async def login_shared(phone: Phone, phone_number: str, code: str | None) -> None:
    """A shared user: pays from a deposit, logs in with a code texted to PHONE_NUMBER."""
    async with await phone.server_api(login_required=False) as api:
        if code is None:
            with phone.out.working("asking for a code"):
                _code_sent(phone, phone_number, await api.request_shared_code(phone_number))
            return
        with phone.out.working("logging in"):
            token = await api.login_shared(phone_number, code.strip())
            await _logged_in(phone, api, token)


@command(login, "account")
@click.argument("account_number")
@click.option("--password", prompt=True, hide_input=True, help="The electricity account's password.")
@click.option("--code", help="The code texted to the account's phone (leave out to have one sent).")
async def login_account(phone: Phone, account_number: str, password: str, code: str | None) -> None:
    """A user who binds an electricity account and pays from it."""
    async with await phone.server_api(login_required=False) as api:
        if code is None:
            with phone.out.working("checking the account"):
                _code_sent(
                    phone, "the account's phone", await api.request_account_code(account_number, password)
                )
            return
        with phone.out.working("logging in"):
            token = await api.login_account(account_number, password, code.strip())
            await _logged_in(phone, api, token)


@command(login, "staff")
@click.argument("username")
@click.option("--password", prompt=True, hide_input=True)
async def login_staff(phone: Phone, username: str, password: str) -> None:
    """An operator or technician (unlock tokens for metering-box doors)."""
    async with await phone.server_api(login_required=False) as api:
        with phone.out.working("logging in"):
            await _logged_in(phone, api, await api.login_staff(username, password))


@click.group()
def register() -> None:
    """Sign up (the same as `login`: the first login makes the account)."""


phone.add_command(register)
register.add_command(login_shared, "shared")
register.add_command(login_account, "account")


@command(phone)
async def logout(phone: Phone) -> None:
    """End the login on the server and forget it here."""
    login_record = await phone.wallet.login()
    if login_record is not None and not login_record.expired(phone.now()):
        with contextlib.suppress(PhoneError):  # forgetting it here is what matters
            async with await phone.server_api() as api:
                await api.logout()
    await phone.wallet.forget_login()
    phone.out.emit("logged_out", {}, "logged out")


@command(phone, "device-register")
async def device_register(phone: Phone) -> None:
    """Register this phone's key with the account (login does it; this repeats it)."""
    login_record = await phone.wallet.login()
    async with await phone.server_api() as api:
        assert login_record is not None
        registered = await api.register_device(
            await phone.wallet.device_key(),
            AccessToken(
                access_token=login_record.access_token,
                expires_at=login_record.expires_at,
                principal=login_record.principal,
                subject=login_record.subject,
                role=login_record.role,
            ),
        )
    await phone.wallet.mark_device_registered()
    public = (await phone.wallet.device_public_key()).hex()
    phone.out.emit(
        "device_registered", {"device_key": public, "registered_at": registered}, f"registered {public}"
    )


@command(phone)
async def balance(phone: Phone) -> None:
    """The account and its deposit: available, frozen in grants, owed."""
    async with await phone.server_api() as api:
        with phone.out.working("asking the server"):
            me = await api.me()
    b = me.balances
    phone.out.emit(
        "balance",
        {
            "user_id": me.user_id,
            "kind": me.kind,
            "phone": me.phone,
            "electricity_account": me.electricity_account,
            "available_fen": b.available_fen,
            "frozen_fen": b.frozen_fen,
            "arrears_fen": b.arrears_fen,
        },
        f"user {me.user_id} ({me.kind}"
        + (f", account {me.electricity_account})" if me.electricity_account else ")"),
        f"available {yuan(b.available_fen)}, in grants {yuan(b.frozen_fen)}"
        + (f", owed {yuan(b.arrears_fen)}" if b.arrears_fen else ""),
    )


@command(phone)
@click.argument("amount", type=MONEY)
async def deposit(phone: Phone, amount: int) -> None:
    """Top up the deposit by AMOUNT (yuan, e.g. 50 or 12.50; or fen, e.g. 1250fen)."""
    async with await phone.server_api() as api:
        with phone.out.working("paying"):
            payment = await api.top_up(amount, new_idempotency_key())
    b = payment.balances
    phone.out.emit(
        "deposited",
        {
            "amount_fen": payment.amount_fen,
            "payment_id": payment.payment_id,
            "available_fen": b.available_fen,
            "frozen_fen": b.frozen_fen,
        },
        f"paid in {yuan(payment.amount_fen)}; available {yuan(b.available_fen)}",
    )


@click.group()
def grant() -> None:
    """Grants: prepaid amounts bound to this phone that a box takes offline."""


phone.add_command(grant)


@command(grant, "request")
@click.argument("amount", type=MONEY)
@click.option("--box", "box_id", help="Good only at this box (default: any box).")
@click.option("--max-price", type=MONEY, default="2.00", show_default=True, help="Most you accept per kWh.")
@click.option("--valid", "valid_seconds", type=DURATION, default="1d", show_default=True)
@click.option("--max-session", "max_session_seconds", type=DURATION, default="12h", show_default=True)
async def grant_request(
    phone: Phone,
    amount: int,
    box_id: str | None,
    max_price: int,
    valid_seconds: int,
    max_session_seconds: int,
) -> None:
    """Freeze AMOUNT of the deposit into a grant for this phone (online, before going to the box)."""
    if box_id is not None and not gatt.is_valid_box_id(box_id):
        raise PrerequisiteError(f"{box_id!r} is not a box id (1-16 of A-Z, 0-9, '-')")
    async with await phone.server_api() as api:
        with phone.out.working("asking for a grant"):
            issued = await api.request_grant(
                phone_key=(await phone.wallet.device_key()).public_key(),
                amount_fen=amount,
                box_id=box_id,
                valid_seconds=valid_seconds,
                max_price_fen_per_kwh=max_price,
                max_session_seconds=max_session_seconds,
                idempotency_key=new_idempotency_key(),
            )
    stored = await phone.wallet.add_grant(issued.signed_grant)
    phone.out.emit(
        "grant",
        display.grant_json(stored, phone.now()),
        f"grant {short(stored.grant_id)}: {yuan(stored.grant.amount_fen)} "
        f"at {stored.grant.box_id or 'any box'}, up to {price(stored.grant.max_price_fen_per_kwh)}, "
        f"until {when(stored.grant.expires_at)}",
    )


def _token_bytes(text: str) -> bytes:
    """A signed token as hex, base64, or @FILE (raw bytes or either text form)."""
    given = text.strip()
    if given.startswith("@"):
        try:
            raw = Path(given[1:]).expanduser().read_bytes()
        except OSError as exc:
            raise PrerequisiteError(f"cannot read {given[1:]}: {exc.strerror}") from None
        try:
            given = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            return raw  # the signed bytes themselves
    with contextlib.suppress(ValueError):
        return bytes.fromhex(given)
    try:
        return base64.b64decode(given, validate=True)
    except (binascii.Error, ValueError):
        raise PrerequisiteError("not a token: give it as hex, base64 or @FILE") from None


@command(grant, "import")
@click.argument("token")
async def grant_import(phone: Phone, token: str) -> None:
    """Add a grant given some other way (hex, base64 or @FILE); it must be for this phone."""
    stored = await phone.wallet.add_grant(_token_bytes(token))
    phone.out.emit(
        "grant",
        display.grant_json(stored, phone.now()),
        f"grant {short(stored.grant_id)}: {yuan(stored.grant.amount_fen)} "
        f"at {stored.grant.box_id or 'any box'}",
    )


async def _list_grants(phone: Phone, show_all: bool) -> None:
    now = phone.now()
    grants = [
        g
        for g in await phone.wallet.grants()
        if show_all
        or (g.state in (GrantState.AVAILABLE, GrantState.IN_SESSION) and g.status(now) != "expired")
    ]
    phone.out.emit(
        "grants",
        {"grants": [display.grant_json(g, now) for g in grants]},
        display.grants_table(grants, now) if grants else "no grants (`--all` shows used and expired ones)",
    )


@command(grant, "list")
@click.option("--all", "show_all", is_flag=True, help="Also used, expired, refused and settled grants.")
async def grant_list(phone: Phone, show_all: bool) -> None:
    """The grants in the wallet and what is left of them."""
    await _list_grants(phone, show_all)


@command(phone)
@click.option("--all", "show_all", is_flag=True, help="Also used, expired, refused and settled grants.")
async def grants(phone: Phone, show_all: bool) -> None:
    """The grants in the wallet and what is left of them (same as `grant list`)."""
    await _list_grants(phone, show_all)


@command(phone)
@click.option("--lat", "latitude", type=DEGREES, required=True, help="Latitude in degrees.")
@click.option("--lon", "longitude", type=DEGREES, required=True, help="Longitude in degrees.")
@click.option("--radius", "radius_m", type=click.IntRange(1, 50_000), default=2000, show_default=True)
async def nearby(phone: Phone, latitude: int, longitude: int, radius_m: int) -> None:
    """Boxes near a place, nearest first, with price and free outlets (kept in the box directory)."""
    async with await phone.server_api() as api:
        with phone.out.working("asking the server"):
            boxes = await api.nearby(
                latitude_microdeg=latitude, longitude_microdeg=longitude, radius_m=radius_m
            )
    for box in boxes:
        await phone.wallet.remember_listed_box(
            box_id=box.box_id,
            outlets=[OutletSpec(number=o.number, rated_power_w=o.rated_power_w) for o in box.outlets],
            latitude_microdeg=box.latitude_microdeg,
            longitude_microdeg=box.longitude_microdeg,
            price_fen_per_kwh=box.price_fen_per_kwh,
        )
    table = Table("box", "distance", "price", "free outlets", "last seen", title="nearby boxes")
    for box in boxes:
        free = [str(o.number) for o in box.outlets if o.available and not o.reserved_now]
        table.add_row(
            box.box_id,
            f"{box.distance_m} m",
            "-" if box.price_fen_per_kwh is None else price(box.price_fen_per_kwh),
            ", ".join(free) or "none",
            when(box.last_seen_at),
        )
    phone.out.emit(
        "nearby",
        {
            "boxes": [
                {
                    "box_id": b.box_id,
                    "distance_m": b.distance_m,
                    "latitude_microdeg": b.latitude_microdeg,
                    "longitude_microdeg": b.longitude_microdeg,
                    "price_fen_per_kwh": b.price_fen_per_kwh,
                    "last_seen_at": b.last_seen_at,
                    "outlets": [
                        {
                            "number": o.number,
                            "rated_power_w": o.rated_power_w,
                            "available": o.available,
                            "reserved_now": o.reserved_now,
                        }
                        for o in b.outlets
                    ],
                }
                for b in boxes
            ]
        },
        table if boxes else f"no boxes within {radius_m} m",
    )


@command(phone)
@click.argument("box_id")
@click.argument("outlet", type=click.IntRange(1, 99))
@click.option("--in", "starts_in", type=DURATION, default=None, help="Start later (default: now).")
@click.option("--for", "duration_seconds", type=DURATION, default="30m", show_default=True)
async def reserve(
    phone: Phone, box_id: str, outlet: int, starts_in: int | None, duration_seconds: int
) -> None:
    """Hold an outlet for this phone; `start` sends the reservation along by itself."""
    async with await phone.server_api() as api:
        with phone.out.working("reserving"):
            issued = await api.reserve(
                box_id=box_id,
                outlet=outlet,
                phone_key=(await phone.wallet.device_key()).public_key(),
                starts_at=phone.now() + (starts_in or 0),
                duration_seconds=duration_seconds,
            )
    stored = await phone.wallet.add_reservation(issued.signed)
    phone.out.emit(
        "reserved",
        display.token_json(stored),
        f"outlet {outlet} of {box_id} is yours from {when(stored.not_before)} to {when(stored.expires_at)}",
    )


def _statement_view(phone: Phone, snapshot_time: int, statement: Any, offline: bool) -> None:
    b = statement.balances
    table = Table("time", "what", "account", "amount", "box", "session", title="statement")
    for line in statement.lines:
        table.add_row(
            when(line.time),
            line.kind,
            line.account,
            yuan(line.amount_fen),
            line.box_id or "",
            "" if line.session_id is None else short(line.session_id),
        )
    sessions = Table(
        "box", "session", "outlet", "started", "energy", "cost", "ended", "invoiced", title="sessions"
    )
    for s in statement.sessions:
        sessions.add_row(
            s.box_id,
            short(s.session_id),
            str(s.outlet),
            when(s.start_time),
            "-" if s.energy_wh is None else kwh(s.energy_wh),
            "-" if s.cost_fen is None else yuan(s.cost_fen),
            s.end_reason or "-",
            "yes" if s.invoiced else "",
        )
    phone.out.emit(
        "statement",
        {
            "offline": offline,
            "fetched_at": snapshot_time,
            "available_fen": b.available_fen,
            "frozen_fen": b.frozen_fen,
            "arrears_fen": b.arrears_fen,
            "lines": [
                {
                    "time": line.time,
                    "kind": line.kind,
                    "account": line.account,
                    "amount_fen": line.amount_fen,
                    "grant_id": None if line.grant_id is None else line.grant_id.hex(),
                    "box_id": line.box_id,
                    "session_id": None if line.session_id is None else line.session_id.hex(),
                }
                for line in statement.lines
            ],
            "sessions": [
                {
                    "box_id": s.box_id,
                    "session_id": s.session_id.hex(),
                    "outlet": s.outlet,
                    "start_time": s.start_time,
                    "end_time": s.end_time,
                    "energy_wh": s.energy_wh,
                    "cost_fen": s.cost_fen,
                    "end_reason": s.end_reason,
                    "invoiced": s.invoiced,
                }
                for s in statement.sessions
            ],
        },
        table,
        sessions,
        f"available {yuan(b.available_fen)}, in grants {yuan(b.frozen_fen)}"
        + (f", owed {yuan(b.arrears_fen)}" if b.arrears_fen else "")
        + (f"  (offline: as fetched {when(snapshot_time)})" if offline else ""),
    )


@command(phone)
async def statement(phone: Phone) -> None:
    """Money in and out and settled sessions; offline, the copy from the last sync."""
    try:
        async with await phone.server_api() as api:
            with phone.out.working("fetching the statement"):
                fetched = await api.statement()
        await phone.wallet.save_statement(fetched)
        _statement_view(phone, phone.now(), fetched, offline=False)
    except (ServerUnreachableError, PrerequisiteError) as exc:
        kept = await phone.wallet.statement()
        if kept is None:
            raise
        phone.out.say(Text(f"({exc.detail})", style="dim"))
        _statement_view(phone, kept.fetched_at, kept.statement, offline=True)


@click.group()
def invoice() -> None:
    """Invoices for settled sessions."""


phone.add_command(invoice)


@command(invoice, "create")
@click.argument("sessions", nargs=-1, required=True)
async def invoice_create(phone: Phone, sessions: tuple[str, ...]) -> None:
    """Invoice settled sessions, named by (the start of) their ids from `statement`."""
    kept = await phone.wallet.statement()
    if kept is None:
        raise PrerequisiteError("no statement yet: run `powerbox phone sync` first")
    chosen = []
    for prefix in sessions:
        matches = [s for s in kept.statement.sessions if s.session_id.hex().startswith(prefix.lower())]
        if len(matches) != 1:
            raise PrerequisiteError(f"{prefix!r} names {len(matches)} settled sessions; give more of its id")
        chosen.append((matches[0].box_id, matches[0].session_id))
    async with await phone.server_api() as api:
        made = await api.create_invoice(chosen)
    phone.out.emit(
        "invoice",
        {
            "number": made.number,
            "created_at": made.created_at,
            "total_fen": made.total_fen,
            "energy_wh": made.energy_wh,
        },
        f"invoice {made.number}: {yuan(made.total_fen)} for {kwh(made.energy_wh)}",
    )


@command(invoice, "list")
async def invoice_list(phone: Phone) -> None:
    """The invoices of this account."""
    async with await phone.server_api() as api:
        found = await api.invoices()
    table = Table("number", "date", "total", title="invoices")
    for item in found:
        table.add_row(item.number, when(item.created_at), yuan(item.total_fen))
    phone.out.emit(
        "invoices",
        {
            "invoices": [
                {"number": i.number, "created_at": i.created_at, "total_fen": i.total_fen} for i in found
            ]
        },
        table if found else "no invoices",
    )


@command(invoice, "show")
@click.argument("number")
@click.option(
    "--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), help="Save the printable page."
)
async def invoice_show(phone: Phone, number: str, html_path: Path | None) -> None:
    """One invoice; --html FILE saves the printable page."""
    async with await phone.server_api() as api:
        found = await api.invoice(number)
        if html_path is not None:
            page = await api.invoice_html(number)
            try:
                await asyncio.to_thread(html_path.write_text, page)
            except OSError as exc:
                raise PrerequisiteError(f"cannot write {html_path}: {exc.strerror}") from None
    phone.out.emit(
        "invoice",
        {
            "number": found.number,
            "created_at": found.created_at,
            "total_fen": found.total_fen,
            "energy_wh": found.energy_wh,
            "sessions": [s.session_id.hex() for s in found.sessions],
        },
        f"invoice {found.number} of {when(found.created_at)}: "
        f"{yuan(found.total_fen)} for {kwh(found.energy_wh)}, "
        f"{len(found.sessions)} sessions" + (f"; saved {html_path}" if html_path else ""),
    )


@command(phone, "sync")
async def sync_command(phone: Phone) -> None:
    """Hand in carried ledger batches, take back acks, refresh keys, lists, grants, statement."""
    async with await phone.server_api(login_required=False) as api:
        with _steps(phone.out) as progress:
            report = await sync(phone.wallet, api, progress=progress)
    phone.out.emit(
        "synced",
        {
            "operator_keys_added": report.operator_keys_added,
            "revocation_version": report.revocation_version,
            "tariff_version": report.tariff_version,
            "batches": [
                {
                    "box_id": b.box_id,
                    "first_sequence": b.first_sequence,
                    "last_sequence": b.last_sequence,
                    "acked_sequence": b.acked_sequence,
                    "refused_code": None if b.refused_code is None else int(b.refused_code),
                }
                for b in report.batches
            ],
            "grants_added": report.grants_added,
            "grants_settled": report.grants_settled,
            "statement_fetched": report.statement_fetched,
            "notes": list(report.notes),
        },
        *(
            f"handed in {b.box_id} entries {b.first_sequence}-{b.last_sequence}"
            + (f": acknowledged up to {b.acked_sequence}" if b.acked_sequence is not None else "")
            + (f": refused ({b.refused_code.name})" if b.refused_code is not None else "")
            for b in report.batches
        ),
        f"revocation list v{report.revocation_version or '-'}, tariff v{report.tariff_version or '-'}, "
        f"{report.grants_added} new grants, {report.grants_settled} settled",
        *(Text(note, style="yellow") for note in report.notes),
    )


@contextlib.contextmanager
def _steps(out: Output) -> Iterator[Callable[[str], None]]:
    """A progress line per sync step on a terminal."""
    if out.as_json or not out.console.is_terminal:
        yield lambda step: None
        return
    with out.console.status("syncing") as spinner:
        yield lambda step: spinner.update(f"syncing: {step}")


@click.group()
def token() -> None:
    """Unlock tokens (technicians): open a box's doors without a session."""


phone.add_command(token)


@command(token, "request")
@click.argument("box_id")
@click.option(
    "--door", type=click.Choice(["metering-box", "outlet"]), default="metering-box", show_default=True
)
@click.option("--outlet", type=click.IntRange(0, 99), default=0)
@click.option("--valid", "valid_seconds", type=DURATION, default="1h", show_default=True)
async def token_request(phone: Phone, box_id: str, door: str, outlet: int, valid_seconds: int) -> None:
    """Ask the server (staff login) for an unlock token bound to this phone."""
    async with await phone.server_api() as api:
        issued = await api.unlock_token(
            box_id=box_id,
            door=door.replace("-", "_"),
            outlet=outlet,
            phone_key=(await phone.wallet.device_key()).public_key(),
            valid_seconds=valid_seconds,
        )
    stored = await phone.wallet.add_unlock_token(issued.signed)
    phone.out.emit(
        "unlock_token", display.token_json(stored), f"unlock token {short(stored.token_id)} for {box_id}"
    )


@command(token, "import")
@click.argument("signed")
async def token_import(phone: Phone, signed: str) -> None:
    """Add an unlock token given some other way (hex, base64 or @FILE)."""
    stored = await phone.wallet.add_unlock_token(_token_bytes(signed))
    phone.out.emit(
        "unlock_token",
        display.token_json(stored),
        f"unlock token {short(stored.token_id)} for {stored.box_id}",
    )


# --- at the box (no network needed) -----------------------------------------------------------------


async def _target_label(phone: Phone, target: str) -> gatt.QrLabel:
    """A QR label (text or photo), or the id of a box this phone verified before (its first outlet)."""
    known = await phone.wallet.box(target.strip()) if gatt.is_valid_box_id(target.strip()) else None
    if known is not None and known.public_key is not None and known.outlets:
        return known.label(known.outlets[0].number)
    try:
        return read_label(target)
    except LabelError:
        if gatt.is_valid_box_id(target.strip()):
            raise PrerequisiteError(
                f"box {target.strip()} was never verified by this phone: give its QR label (text or photo)"
            ) from None
        raise


@contextlib.asynccontextmanager
async def _visit(phone: Phone, label: gatt.QrLabel, **options: Any) -> AsyncIterator[BoxVisit]:
    """A visit, with a spinner while the box is found, connected and verified."""
    async with contextlib.AsyncExitStack() as stack:
        with phone.out.working(f"looking for {gatt.advertised_name(label.box_id)} ({label.box_id})"):
            visit = await stack.enter_async_context(
                BoxVisit.open(phone.wallet, label, scan_timeout_s=phone.scan_timeout_s, **options)
            )
        for push in visit.pushes:
            phone.out.say(
                Text(
                    f"gave the box {push.kind.name.lower().replace('_', ' ')} {push.version}"
                    if push.accepted
                    else f"the box already has {push.kind.name.lower().replace('_', ' ')} "
                    f"{push.version} or newer",
                    style="dim",
                )
            )
        yield visit


def _pushes_json(visit: BoxVisit) -> list[dict[str, Any]]:
    return [
        {
            "kind": p.kind.name.lower(),
            "version": p.version,
            "accepted": p.accepted,
            "refused_code": None if p.refused_code is None else int(p.refused_code),
        }
        for p in visit.pushes
    ]


async def _watch(
    phone: Phone, visit: BoxVisit, session: WalletSession, *, readings: int | None, seconds: int | None
) -> None:
    """Show live readings until the session ends, `readings` arrived, `seconds` passed or Ctrl-C
    (which leaves the session running)."""
    out = phone.out
    deadline = None if seconds is None else time.monotonic() + seconds
    count = 0
    current = session
    live = (
        None
        if out.as_json
        else Live(display.meter_panel(current, now=phone.now()), console=out.console, auto_refresh=False)
    )
    interrupted = False
    try:
        with live if live is not None else contextlib.nullcontext():
            while readings is None or count < readings:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                event = await visit.next_event(left)
                if isinstance(event, LiveReading) and event.session.session_id == session.session_id:
                    count += 1
                    current = event.session
                    out.emit("reading", display.session_json(current))
                    if live is not None:
                        live.update(display.meter_panel(current, now=phone.now()), refresh=True)
                elif (
                    isinstance(event, SessionClosed)
                    and event.receipt.receipt.session_id == session.session_id
                ):
                    if live is not None:
                        live.update(
                            display.meter_panel(current, now=phone.now(), note="the box ended the session"),
                            refresh=True,
                        )
                    _show_receipt(phone, visit, event.receipt, by_box=True)
                    return
    except asyncio.CancelledError:
        interrupted = True  # Ctrl-C: the user walks away; the session runs on
    except BoxUnreachableError as exc:
        raise BoxUnreachableError(
            f"{exc.detail}; the session keeps running on the box: `powerbox phone watch` to come back"
        ) from None
    finally:
        if live is not None and not out.console.is_terminal:
            out.console.line()  # a live display off a terminal ends without its newline
    out.emit(
        "left_running",
        {"session_id": session.session_id.hex(), "box_id": session.box_id, "interrupted": interrupted},
        Text(
            f"the session keeps running at {session.box_id} outlet {session.outlet}: "
            "`powerbox phone watch` to come back, `powerbox phone stop` to end it",
            style="dim",
        ),
    )


def _show_receipt(phone: Phone, visit: BoxVisit, receipt: Any, *, by_box: bool) -> None:
    phone.out.emit(
        "session_ended",
        {**display.receipt_json(receipt), "ended_by_box": by_box},
        display.receipt_panel(receipt),
    )


@command(phone, radio=True)
@click.argument("label")
async def scan(phone: Phone, label: str) -> None:
    """Read a label (text or photo), find its box and show which outlets are free (no handshake)."""
    target = await _target_label(phone, label)
    with phone.out.working(f"looking for {gatt.advertised_name(target.box_id)}"):
        found = await find_box(target, timeout_s=phone.scan_timeout_s)
        info = await read_box_info(found)
    known = await phone.wallet.box(target.box_id)
    free = [o.outlet for o in info.outlets if o.available]
    phone.out.emit(
        "scan",
        {
            "box_id": target.box_id,
            "outlet": target.outlet,
            "advertised_name": found.name,
            "rssi": found.rssi,
            "box_reports": info.box_id,
            "protocol_versions": list(info.protocol_versions),
            "outlets": [{"outlet": o.outlet, "available": o.available} for o in info.outlets],
            "verified_before": known is not None and known.public_key is not None,
        },
        f"label: box {target.box_id}, outlet {target.outlet}",
        f"found {found.name} (RSSI {found.rssi} dBm) in {found.scan_ms} ms; it says: box {info.box_id}, "
        f"protocol {', '.join(map(str, info.protocol_versions))}",
        f"free outlets: {', '.join(map(str, free)) or 'none'}"
        + ("" if target.outlet in free else f" (outlet {target.outlet} is not free)"),
        Text("unverified until `start` or `visit` checks the box's certificate", style="dim"),
    )


@command(phone, radio=True)
@click.argument("label")
@click.option("--grant", "grant_prefix", help="Pay with this grant (id or its start); default: the best one.")
@click.option(
    "--watch/--no-watch", default=True, show_default=True, help="Show live readings after starting."
)
@click.option(
    "--readings", type=click.IntRange(1), default=None, help="Stop watching after this many readings."
)
@click.option("--for", "seconds", type=DURATION, default=None, help="Stop watching after this long.")
async def start(
    phone: Phone, label: str, grant_prefix: str | None, watch: bool, readings: int | None, seconds: int | None
) -> None:
    """Scan LABEL (its text, or a photo of it), verify the box and start a session on its outlet."""
    target = await _target_label(phone, label)
    chosen = await phone.wallet.choose_grant(box_id=target.box_id, grant_prefix=grant_prefix)
    scanning = time.perf_counter()  # the label is read: from here on it is scan-to-power
    async with _visit(phone, target, start_grant=chosen) as visit:
        scan_to_power_ms = round((time.perf_counter() - scanning) * 1000, 1)
        session = visit.started
        assert session is not None
        phone.out.emit(
            "session_started",
            {
                **display.session_json(session),
                "grant_id": chosen.grant_id.hex(),
                "pushes": _pushes_json(visit),
                "scan_to_power_ms": scan_to_power_ms,
            },
            Text.assemble(
                ("power on: ", "bold green"),
                f"{session.box_id} outlet {session.outlet}, session {short(session.session_id)}, "
                f"{yuan(session.balance_fen)} at {price(session.price_fen_per_kwh)} "
                f"(grant {short(chosen.grant_id)}); the outlet door is unlocked",
                (f" ({scan_to_power_ms:.0f} ms from label to power)", "dim"),
            ),
        )
        if watch:
            await _watch(phone, visit, session, readings=readings, seconds=seconds)


async def _session_visit(
    phone: Phone, session_prefix: str | None, *, running: bool = True
) -> tuple[WalletSession, gatt.QrLabel]:
    session = await phone.wallet.find_session(session_prefix=session_prefix, running=running)
    return session, await label_for_session(phone.wallet, session)


async def _still_running(phone: Phone, visit: BoxVisit, session: WalletSession) -> WalletSession | None:
    """Ask the box about this phone's sessions; the session if it still runs, else say how it ended."""
    for seen in await visit.list_sessions():
        if seen.session_id == session.session_id:
            if seen.state is SessionState.RUNNING:
                return seen
            stored = await phone.wallet.receipt(seen.box_id, seen.session_id)
            if stored is None:  # the box did not have it: the server's statement will
                phone.out.emit(
                    "ended_while_away",
                    {**display.session_json(seen), "receipt": None},
                    f"session {short(seen.session_id)} ended while you were away: {kwh(seen.energy_wh)}, "
                    f"{yuan(seen.cost_fen)}; the box had no receipt to give, your statement will show it",
                )
                return None
            phone.out.emit(
                "ended_while_away",
                {**display.session_json(seen), "receipt": display.receipt_json(stored)},
                Group(
                    Text(f"session {short(seen.session_id)} ended while you were away"),
                    display.receipt_panel(stored),
                ),
            )
            return None
    raise BoxRefusedError(
        f"the box does not know session {short(session.session_id)}", code=ErrorCode.SESSION_UNKNOWN
    )


@command(phone, radio=True)
@click.option("--session", "session_prefix", help="Which running session (default: the only one).")
@click.option("--readings", type=click.IntRange(1), default=None, help="Stop after this many readings.")
@click.option("--for", "seconds", type=DURATION, default=None, help="Stop after this long.")
async def watch(phone: Phone, session_prefix: str | None, readings: int | None, seconds: int | None) -> None:
    """Come back to a running session: reconnect and show it live (no label needed)."""
    session, label = await _session_visit(phone, session_prefix)
    async with _visit(phone, label) as visit:
        current = await _still_running(phone, visit, session)
        if current is not None:
            phone.out.emit("reconnected", display.session_json(current))
            await _watch(phone, visit, current, readings=readings, seconds=seconds)


@command(phone, "top-up", radio=True)
@click.option("--session", "session_prefix", help="Which running session (default: the only one).")
@click.option("--grant", "grant_prefix", help="Add this grant (default: the best one for the box).")
async def top_up(phone: Phone, session_prefix: str | None, grant_prefix: str | None) -> None:
    """Add another grant to a running session."""
    session, label = await _session_visit(phone, session_prefix)
    chosen = await phone.wallet.choose_grant(box_id=session.box_id, grant_prefix=grant_prefix)
    async with _visit(phone, label) as visit:
        updated = await visit.top_up(session, chosen)
    phone.out.emit(
        "topped_up",
        {**display.session_json(updated), "grant_id": chosen.grant_id.hex()},
        f"added {yuan(chosen.grant.amount_fen)} (grant {short(chosen.grant_id)}): "
        f"balance {yuan(updated.balance_fen)}, "
        f"{yuan(updated.remaining_fen)} left",
    )


@command(phone, radio=True)
@click.option("--session", "session_prefix", help="Which running session (default: the only one).")
async def stop(phone: Phone, session_prefix: str | None) -> None:
    """Stop a running session and keep its signed receipt (verified with the box's certificate)."""
    session, label = await _session_visit(phone, session_prefix)
    async with _visit(phone, label) as visit:
        try:
            receipt = await visit.stop(session)
        except BoxRefusedError as exc:
            if exc.code is not ErrorCode.SESSION_UNKNOWN:
                raise
            await _still_running(phone, visit, session)  # it ended already: say how
            return
        _show_receipt(phone, visit, receipt, by_box=False)
        phone.out.say(Text("`powerbox phone door` opens the outlet door to unplug", style="dim"))


@command(phone, radio=True)
@click.option("--session", "session_prefix", help="Which session (default: the running one, else the last).")
async def door(phone: Phone, session_prefix: str | None) -> None:
    """Open the outlet door of your running or just-ended session (to plug in or unplug)."""
    try:
        session = await phone.wallet.find_session(session_prefix=session_prefix, running=True)
    except PrerequisiteError:
        if session_prefix is not None:
            raise
        ended = await phone.wallet.sessions()
        if not ended:
            raise
        session = max(ended, key=lambda s: (s.end_time or s.start_time, s.start_time))
    label = await label_for_session(phone.wallet, session)
    async with _visit(phone, label) as visit:
        opened = await visit.open_outlet_door(session)
    phone.out.emit(
        "door_opened",
        {"box_id": session.box_id, "door": opened.door.name, "outlet": opened.outlet},
        f"the door of outlet {opened.outlet} at {session.box_id} is unlocked",
    )


@command(phone, radio=True)
@click.argument("target")
@click.option("--token", "token_prefix", help="Which unlock token (default: the one valid now for the box).")
async def unlock(phone: Phone, target: str, token_prefix: str | None) -> None:
    """Open a door with an unlock token (technicians): TARGET is a label, its photo, or a box id."""
    label = await _target_label(phone, target)
    now = phone.now()
    candidates: list[StoredToken] = [
        t
        for t in await phone.wallet.unlock_tokens(label.box_id)
        if (token_prefix is None and t.not_before <= now < t.expires_at)
        or (token_prefix is not None and t.token_id.hex().startswith(token_prefix.lower()))
    ]
    if not candidates:
        raise PrerequisiteError(
            f"no unlock token for {label.box_id} valid now: `powerbox phone token request`"
        )
    chosen = candidates[0]
    async with _visit(phone, label) as visit:
        opened = await visit.unlock(chosen)
    door_name = "metering-box door" if opened.outlet == 0 else f"door of outlet {opened.outlet}"
    phone.out.emit(
        "door_opened",
        {
            "box_id": label.box_id,
            "door": opened.door.name,
            "outlet": opened.outlet,
            "token_id": chosen.token_id.hex(),
        },
        f"the {door_name} at {label.box_id} is unlocked",
    )


@command(phone, radio=True)
@click.argument("target")
@click.option(
    "--carry/--no-carry", default=True, show_default=True, help="Take the box's ledger entries along."
)
async def visit(phone: Phone, target: str, carry: bool) -> None:
    """Pass by a box without a session: give it newer revocations, tariffs and acks, take its
    ledger entries to carry, refresh this phone's sessions there. TARGET: label, photo or box id."""
    label = await _target_label(phone, target)
    async with _visit(phone, label) as box_visit:
        sessions = await box_visit.list_sessions()
        batch = await box_visit.collect_entries() if carry else None
    phone.out.emit(
        "visited",
        {
            "box_id": box_visit.box_id,
            "pushes": _pushes_json(box_visit),
            "sessions": [display.session_json(s) for s in sessions],
            "batch": None if batch is None else display.batch_json(batch),
        },
        f"{box_visit.box_id} verified; "
        + (
            f"carrying its entries {batch.first_sequence}-{batch.last_sequence} "
            f"({len(batch.sealed)} bytes, sealed)"
            if batch is not None
            else "nothing new to carry"
        ),
        *([display.sessions_table(sessions)] if sessions else []),
    )


@command(phone)
@click.option("--all", "show_all", is_flag=True, help="Also ended sessions.")
async def sessions(phone: Phone, show_all: bool) -> None:
    """This phone's sessions, as last seen (no radio)."""
    found = await phone.wallet.sessions(running_only=not show_all)
    phone.out.emit(
        "sessions",
        {"sessions": [display.session_json(s) for s in found]},
        display.sessions_table(found) if found else "no running sessions (`--all` shows ended ones)",
    )


@command(phone)
async def receipts(phone: Phone) -> None:
    """The signed receipts of this phone's sessions."""
    found = await phone.wallet.receipts()
    table = Table("#", "box", "session", "ended", "energy", "cost", "why", title="receipts")
    for item in found:
        r = item.receipt
        table.add_row(
            str(item.sequence),
            item.box_id,
            short(r.session_id),
            when(r.end_time),
            kwh(r.energy_wh),
            yuan(r.cost_fen),
            r.end_reason.name.lower().replace("_", " "),
        )
    phone.out.emit(
        "receipts", {"receipts": [display.receipt_json(r) for r in found]}, table if found else "no receipts"
    )


@command(phone)
async def boxes(phone: Phone) -> None:
    """The box directory: boxes verified at the box, and boxes from `nearby`."""
    found = await phone.wallet.boxes()
    table = Table("box", "verified", "outlets", "position", "region / price", title="boxes")
    for box in found:
        table.add_row(
            box.box_id,
            when(box.verified_at) if box.verified_at else "no",
            ", ".join(str(o.number) for o in box.outlets),
            f"{_degrees(box.latitude_microdeg)}, {_degrees(box.longitude_microdeg)}",
            box.tariff_region or ("-" if box.price_fen_per_kwh is None else price(box.price_fen_per_kwh)),
        )
    phone.out.emit(
        "boxes", {"boxes": [display.box_json(b) for b in found]}, table if found else "no boxes yet"
    )


def _degrees(microdegrees: int) -> str:
    sign = "-" if microdegrees < 0 else ""
    return f"{sign}{abs(microdegrees) // 1_000_000}.{abs(microdegrees) % 1_000_000:06d}"
