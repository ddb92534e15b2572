"""How the TUI writes each part of a `BenchState` as rich Text (no I/O, no clock: the same state
always gives the same text, which the snapshot test relies on)."""

from __future__ import annotations

from rich.text import Text

from phone_client.display import kwh, yuan

from .state import BoxView, LogEntry, LogLevel, OutletView, PhoneView, ServerView

OUTLET_LINE_WIDTH = 80  # the power plot starts after it (app.py's CSS says the same)
OUTLET_HEADER = "  #  door          breaker  load W   power W   energy Wh  session"
RECEIPTS_SHOWN = 3
GRANTS_SHOWN = 3


def box_title(box: BoxView) -> str:
    uplink = "4G on" if box.uplink_on else "4G OFF"
    door = "metering-box door closed" if box.metering_door_closed else "metering-box door OPEN"
    return f"{box.box_id} · {uplink} · {door}"


def box_summary(box: BoxView) -> Text:
    text = Text()
    text.append("4G uplink ")
    text.append("on" if box.uplink_on else "OFF", style="green" if box.uplink_on else "bold red")
    text.append("   metering-box door ")
    text.append(
        "closed" if box.metering_door_closed else "OPEN (outlets tripped)",
        style="green" if box.metering_door_closed else "bold red",
    )
    text.append("   ledger ")
    if box.last_sequence is None:
        text.append("-", style="dim")
    else:
        acked = "-" if box.acked_sequence is None else str(box.acked_sequence)
        written = "no entries" if not box.last_sequence else f"entries 1-{box.last_sequence}"
        text.append(f"{written}, acked up to {acked}")
    return text


def outlet_line(outlet: OutletView, *, selected: bool) -> Text:
    """One row of the outlet table; its power plot sits beside it."""
    text = Text()
    text.append("▶ " if selected else "  ", style="bold yellow")
    text.append(f"{outlet.number}  ", style="bold" if selected else "")
    door = Text("closed") if outlet.door_closed else Text("open", style="yellow")
    if outlet.lock_energized:
        door.append(" unlocked", style="yellow")
    door.pad_right(14 - len(door.plain))
    text.append_text(door)
    text.append(
        f"{'closed' if outlet.breaker_closed else 'open':<9}",
        style="bold green" if outlet.breaker_closed else "dim",
    )
    overload = outlet.rated_w and outlet.load_w > outlet.rated_w
    text.append(f"{outlet.load_w:>6,}", style="bold red" if overload else "")
    text.append(f"{outlet.power_w:>10,}", style="bold" if outlet.power_w else "dim")
    text.append(f"{outlet.energy_wh:>12,}  ")
    if outlet.session_id is None:
        text.append("-", style="dim")
    else:
        balance = "" if outlet.session_balance_fen is None else f" {yuan(outlet.session_balance_fen)}"
        text.append(f"{outlet.session_id}{balance}", style="cyan")
    return text


def phone_title(phone: PhoneView, *, selected: bool) -> str:
    busy = f" · {phone.busy}…" if phone.busy else ""
    return f"{'▶ ' if selected else ''}{phone.name} {phone.number}{busy}"


def phone_body(phone: PhoneView) -> Text:
    text = Text()
    if phone.user_id is None:
        text.append("not signed up", style="dim")
    else:
        text.append(f"user {phone.user_id}")
    if phone.balances is not None:
        b = phone.balances
        text.append(f"  deposit {yuan(b.available_fen)}, in grants {yuan(b.frozen_fen)}")
        if b.arrears_fen:
            text.append(f", owed {yuan(b.arrears_fen)}", style="red")
    text.append("\n")
    text.append("grants ", style="bold")
    text.append(f"{yuan(phone.grants_available_fen)} available\n")
    for grant in phone.grants[:GRANTS_SHOWN]:
        text.append(
            f"  {grant.grant_id} {grant.status.replace('_', ' '):<10} {yuan(grant.remaining_fen)} of "
            f"{yuan(grant.amount_fen)}\n"
        )
    text.append("sessions", style="bold")
    if not phone.sessions:
        text.append(" none\n", style="dim")
    else:
        text.append("\n")
        for session in phone.sessions:
            text.append(f"  {session.session_id} outlet {session.outlet} {session.state}\n", style="cyan")
            text.append(
                f"    {kwh(session.energy_wh)} {yuan(session.cost_fen)}, {yuan(session.remaining_fen)} left\n"
            )
    text.append("receipts", style="bold")
    if not phone.receipts:
        text.append(" none\n", style="dim")
    else:
        text.append(f" ({len(phone.receipts)})\n")
        for receipt in phone.receipts[-RECEIPTS_SHOWN:]:
            reason = receipt.end_reason.lower().replace("_", " ")
            text.append(f"  #{receipt.sequence} {receipt.session_id} outlet {receipt.outlet} {reason}\n")
            text.append(f"    {kwh(receipt.energy_wh)} {yuan(receipt.cost_fen)}\n")
    text.append(f"to carry: {phone.batches_to_carry} ledger batches\n", style="dim")
    if phone.last_result:
        text.append(phone.last_result, style="red" if " failed" in phone.last_result else "green")
    return text


def server_body(server: ServerView, box: BoxView) -> Text:
    text = Text()
    text.append(server.base_url, style="dim")
    if server.as_of is None:
        text.append("\nnot polled yet", style="dim")
        return text
    text.append("\nbooks ")
    if server.books_balanced:
        text.append("balanced", style="green")
    else:
        text.append("NOT balanced", style="bold red")
    text.append(f", {server.journal_accounts} accounts, {server.journal_transactions} transactions\n")
    text.append("ledgers\n", style="bold")
    for ledger in server.boxes:
        seen = (
            "never seen"
            if ledger.last_seen_at is None
            else f"seen {server.as_of - ledger.last_seen_at} s ago"
        )
        held = "nothing" if not ledger.contiguous_sequence else f"1-{ledger.contiguous_sequence}"
        text.append(f"  {ledger.box_id}: has {held}, applied {ledger.applied_sequence}; {seen}\n")
        if ledger.box_id == box.box_id and box.last_sequence is not None:
            behind = box.last_sequence - ledger.contiguous_sequence
            text.append(
                f"    box wrote {box.last_sequence}: "
                + (f"{behind} to sync" if behind > 0 else "in sync")
                + "\n",
                style="yellow" if behind > 0 else "green",
            )
    text.append("accounts", style="bold")
    if not server.accounts:
        text.append(" none\n", style="dim")
    else:
        text.append("\n")
        for account in server.accounts:
            b = account.balances
            text.append(
                f"  {account.phone} (user {account.user_id}): {yuan(b.available_fen)} available, "
                f"{yuan(b.frozen_fen)} frozen"
                + (f", owed {yuan(b.arrears_fen)}" if b.arrears_fen else "")
                + "\n"
            )
    text.append("anomalies", style="bold")
    if not server.anomaly_count:
        text.append(" none", style="dim")
    else:
        text.append(f" {server.anomaly_count}", style="bold red")
        for anomaly in server.anomalies:
            resolved = " (resolved)" if anomaly.resolved else ""
            text.append(
                f"\n  #{anomaly.anomaly_id} {anomaly.kind} [{anomaly.code}]{resolved}: {anomaly.detail}"
            )
    return text


_LEVEL_STYLES = {LogLevel.ACTION: "bold", LogLevel.OK: "green", LogLevel.ERROR: "bold red"}
_LEVEL_MARKS = {LogLevel.ACTION: "»", LogLevel.OK: "✓", LogLevel.ERROR: "✗"}


def log_line(entry: LogEntry) -> Text:
    text = Text()
    text.append(f"{entry.at_s:>5} s ", style="dim")
    text.append(f"{entry.source:<11} ", style="cyan")
    text.append(f"{_LEVEL_MARKS[entry.level]} ", style=_LEVEL_STYLES[entry.level])
    if entry.code is not None:
        text.append(f"[{entry.code} {entry.code_name or ''}] ".replace(" ]", "]"), style="red")
    text.append(entry.text, style="red" if entry.level is LogLevel.ERROR else "")
    return text


def help_line(phone: PhoneView | None, box: BoxView, outlet: int) -> Text:
    text = Text()
    text.append("selected ", style="dim")
    text.append("no phone" if phone is None else f"{phone.name} ({phone.number})", style="bold")
    text.append(", ", style="dim")
    text.append(f"outlet {outlet} of {box.box_id}", style="bold")
    text.append("    1-4 choose the outlet · tab/p the phone · +/- load ±500 W", style="dim")
    return text
