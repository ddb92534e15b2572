"""How the phone shows things: money, energy and meter units as text (integers only, no floats),
rich tables and the live meter, and the JSON shapes `--json` prints for scripts."""

from __future__ import annotations

import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from phone_client.errors import PhoneError
from phone_client.explain import code_name, explain
from phone_client.wallet import (
    CarriedBatch,
    KnownBox,
    StoredAck,
    StoredReceipt,
    StoredToken,
    WalletGrant,
    WalletSession,
)

# --- units ----------------------------------------------------------------------------------------


def yuan(fen: int) -> str:
    """Fen as yuan: 1234 -> ¥12.34."""
    sign = "-" if fen < 0 else ""
    return f"{sign}¥{abs(fen) // 100}.{abs(fen) % 100:02d}"


def kwh(wh: int) -> str:
    return f"{wh // 1000}.{wh % 1000:03d} kWh"


def volts(dv: int) -> str:
    return f"{dv // 10}.{dv % 10} V"


def amps(ma: int) -> str:
    return f"{ma // 1000}.{ma % 1000:03d} A"


def watts(w: int) -> str:
    return f"{w:,} W"


def price(fen_per_kwh: int) -> str:
    return f"{yuan(fen_per_kwh)}/kWh"


def when(timestamp: int | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: int) -> str:
    seconds = max(0, seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def short(identifier: bytes) -> str:
    """The first 8 hex digits: enough to name a grant or session to the CLI."""
    return identifier.hex()[:8]


# --- errors ---------------------------------------------------------------------------------------


def error_json(error: PhoneError) -> dict[str, Any]:
    code = error.wire_code
    return {
        "event": "error",
        "origin": error.origin.value,
        "code": None if code is None else int(code),
        "name": None if code is None else code_name(code),
        "message": error.detail,
        "explanation": None if code is None else explain(code),
    }


def error_text(error: PhoneError) -> Text:
    code = error.wire_code
    who = {
        "box": "the box refused",
        "radio": "Bluetooth",
        "server": "the server",
        "phone": "this phone",
    }[error.origin.value]
    text = Text()
    text.append("error: ", style="bold red")
    if code is None:
        text.append(error.detail, style="bold")
        text.append(f"  [{who}]", style="red")
        return text
    text.append(explain(code), style="bold")
    text.append(f"  [{int(code)} {code_name(code)}, {who}]", style="red")
    if error.detail and error.detail not in (code.name, code_name(code)):
        text.append(f"\n  {error.detail}", style="dim")
    return text


# --- JSON shapes ----------------------------------------------------------------------------------


def grant_json(grant: WalletGrant, now: int) -> dict[str, Any]:
    details = grant.grant
    return {
        "grant_id": grant.grant_id.hex(),
        "status": grant.status(now),
        "box_id": details.box_id,
        "amount_fen": details.amount_fen,
        "remaining_fen": grant.remaining_fen,
        "max_price_fen_per_kwh": details.max_price_fen_per_kwh,
        "max_session_seconds": details.max_session_seconds,
        "issued_at": details.issued_at,
        "expires_at": details.expires_at,
        "used_at_box": grant.used_at_box,
        "session_id": None if grant.session_id is None else grant.session_id.hex(),
        "refused_code": None if grant.refused_code is None else int(grant.refused_code),
        "charged_fen": grant.charged_fen,
    }


def session_json(session: WalletSession) -> dict[str, Any]:
    return {
        "box_id": session.box_id,
        "session_id": session.session_id.hex(),
        "outlet": session.outlet,
        "state": session.state.value,
        "start_time": session.start_time,
        "price_fen_per_kwh": session.price_fen_per_kwh,
        "tariff_version": session.tariff_version,
        "balance_fen": session.balance_fen,
        "energy_wh": session.energy_wh,
        "cost_fen": session.cost_fen,
        "remaining_fen": session.remaining_fen,
        "power_w": session.power_w,
        "voltage_dv": session.voltage_dv,
        "current_ma": session.current_ma,
        "reading_time": session.reading_time,
        "end_time": session.end_time,
        "end_reason": None if session.end_reason is None else session.end_reason.name,
        "grant_ids": [g.grant_id.hex() for g in session.grants],
    }


def receipt_json(stored: StoredReceipt) -> dict[str, Any]:
    receipt = stored.receipt
    return {
        "box_id": stored.box_id,
        "session_id": receipt.session_id.hex(),
        "sequence": stored.sequence,
        "outlet": receipt.outlet,
        "start_time": receipt.start_time,
        "end_time": receipt.end_time,
        "energy_wh": receipt.energy_wh,
        "price_fen_per_kwh": receipt.price_fen_per_kwh,
        "cost_fen": receipt.cost_fen,
        "end_reason": receipt.end_reason.name,
        "grant_ids": [g.hex() for g in receipt.grant_ids],
        "verified": True,  # only verified receipts are ever stored
        "signed": stored.signed.hex(),
    }


def box_json(box: KnownBox) -> dict[str, Any]:
    return {
        "box_id": box.box_id,
        "verified": box.public_key is not None,
        "public_key": None if box.public_key is None else box.public_key.hex(),
        "outlets": [{"number": o.number, "rated_power_w": o.rated_power_w} for o in box.outlets],
        "latitude_microdeg": box.latitude_microdeg,
        "longitude_microdeg": box.longitude_microdeg,
        "tariff_region": box.tariff_region,
        "price_fen_per_kwh": box.price_fen_per_kwh,
        "certificate_expires_at": box.certificate_expires_at,
        "verified_at": box.verified_at,
    }


def batch_json(batch: CarriedBatch) -> dict[str, Any]:
    return {
        "batch_id": batch.batch_id,
        "box_id": batch.box_id,
        "first_sequence": batch.first_sequence,
        "last_sequence": batch.last_sequence,
        "size": len(batch.sealed),
        "collected_at": batch.collected_at,
        "uploaded_at": batch.uploaded_at,
    }


def ack_json(ack: StoredAck) -> dict[str, Any]:
    return {"box_id": ack.box_id, "sequence": ack.sequence, "delivered": ack.delivered}


def token_json(token: StoredToken) -> dict[str, Any]:
    return {
        "token_id": token.token_id.hex(),
        "box_id": token.box_id,
        "door": token.door.name,
        "outlet": token.outlet,
        "not_before": token.not_before,
        "expires_at": token.expires_at,
    }


# --- tables ---------------------------------------------------------------------------------------


def grants_table(grants: list[WalletGrant], now: int) -> Table:
    table = Table("grant", "status", "box", "amount", "left", "max price", "expires", title="grants")
    for grant in grants:
        status = grant.status(now)
        style = {"available": "green", "expired": "dim", "refused": "red", "in_session": "yellow"}.get(
            status, ""
        )
        table.add_row(
            short(grant.grant_id),
            Text(status.replace("_", " "), style=style),
            grant.grant.box_id or "any box",
            yuan(grant.grant.amount_fen),
            yuan(grant.remaining_fen),
            price(grant.grant.max_price_fen_per_kwh),
            when(grant.grant.expires_at),
        )
    return table


def sessions_table(sessions: list[WalletSession]) -> Table:
    table = Table("session", "box", "outlet", "state", "started", "energy", "cost", "left", title="sessions")
    for session in sessions:
        table.add_row(
            short(session.session_id),
            session.box_id,
            str(session.outlet),
            session.state.value
            if session.end_reason is None
            else f"ended: {session.end_reason.name.lower()}",
            when(session.start_time),
            kwh(session.energy_wh),
            yuan(session.cost_fen),
            yuan(session.remaining_fen),
        )
    return table


def receipt_panel(stored: StoredReceipt) -> Panel:
    receipt = stored.receipt
    table = Table.grid(padding=(0, 2))
    table.add_row("box / outlet", f"{stored.box_id} / {receipt.outlet}")
    table.add_row("session", receipt.session_id.hex())
    table.add_row("from", when(receipt.start_time))
    table.add_row("to", when(receipt.end_time))
    table.add_row("energy", kwh(receipt.energy_wh))
    table.add_row("price", price(receipt.price_fen_per_kwh))
    table.add_row("cost", Text(yuan(receipt.cost_fen), style="bold"))
    table.add_row("ended by", receipt.end_reason.name.lower().replace("_", " "))
    table.add_row("grants", ", ".join(short(g) for g in receipt.grant_ids))
    table.add_row("signature", Text("verified with the box's certificate", style="green"))
    return Panel(table, title=f"receipt #{stored.sequence}", expand=False)


def meter_panel(session: WalletSession, *, now: int, note: str = "") -> RenderableType:
    """The live meter: what the box last reported for a running session."""
    table = Table.grid(padding=(0, 3))
    table.add_column(style="dim")
    table.add_column(justify="right", style="bold")
    table.add_row("energy", kwh(session.energy_wh))
    table.add_row("power", watts(session.power_w))
    table.add_row("voltage", volts(session.voltage_dv))
    table.add_row("current", amps(session.current_ma))
    table.add_row("cost", yuan(session.cost_fen))
    remaining_style = "red" if session.remaining_fen * 10 < session.balance_fen else "green"
    table.add_row("remaining", Text(yuan(session.remaining_fen), style=remaining_style))
    table.add_row("balance", yuan(session.balance_fen))
    table.add_row("price", price(session.price_fen_per_kwh))
    table.add_row("running for", duration((session.reading_time or now) - session.start_time))
    footer = Text(note or "Ctrl-C leaves the session running; `powerbox phone stop` ends it", style="dim")
    return Panel(
        Group(table, footer),
        title=f"{session.box_id} outlet {session.outlet} - session {short(session.session_id)}",
        expand=False,
    )
