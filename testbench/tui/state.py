"""What the test-bench TUI shows, as plain frozen records: one `BenchState` snapshot of the box, the
phones, the server and the log, plus the `Action`s a key press asks for.

The records carry no I/O and no clock (integers only: fen, Wh, W, Unix seconds), so the screen can
be rendered from a made-up state (the snapshot test does) as well as from a running system.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# --- the box ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class OutletView:
    """One outlet as the plant's true state shows it, plus the box's session on it, if any."""

    number: int
    rated_w: int
    load_w: int  # what is plugged in draws this much (0: nothing plugged in)
    power_w: int  # what flows: the load, while the breaker is closed
    energy_wh: int  # everything the outlet ever delivered
    breaker_closed: bool
    door_closed: bool
    lock_energized: bool
    session_id: str | None = None  # the first 8 hex digits of the box's running session
    session_balance_fen: int | None = None
    power_history_w: tuple[int, ...] = ()  # oldest first, one sample per plant poll


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxView:
    box_id: str
    uplink_on: bool
    metering_door_closed: bool
    outlets: tuple[OutletView, ...]
    last_sequence: int | None = None  # the newest ledger entry the box wrote
    acked_sequence: int | None = None  # the newest one an operator-signed ack covers

    def outlet(self, number: int) -> OutletView:
        for outlet in self.outlets:
            if outlet.number == number:
                return outlet
        raise KeyError(f"{self.box_id} has no outlet {number}")


# --- the phones -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Balances:
    available_fen: int
    frozen_fen: int
    arrears_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class GrantView:
    grant_id: str  # first 8 hex digits
    status: str  # available, in_session, used, expired, refused, settled (phone_client.wallet)
    box_id: str | None
    amount_fen: int
    remaining_fen: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionView:
    session_id: str
    box_id: str
    outlet: int
    state: str
    energy_wh: int
    cost_fen: int
    remaining_fen: int
    power_w: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceiptView:
    sequence: int
    session_id: str
    box_id: str
    outlet: int
    energy_wh: int
    cost_fen: int
    end_reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PhoneView:
    """One phone's wallet as its CLI last reported it (`status`, `grant list`, `receipts`)."""

    name: str
    number: str
    user_id: str | None = None  # set once logged in
    grants_available_fen: int = 0
    grants: tuple[GrantView, ...] = ()
    sessions: tuple[SessionView, ...] = ()  # running ones
    receipts: tuple[ReceiptView, ...] = ()
    batches_to_carry: int = 0
    balances: Balances | None = None  # from the last statement the phone fetched (sync)
    busy: str | None = None  # the action running now
    last_result: str = ""  # what the last action came to


# --- the server -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BoxLedgerView:
    """Where the server stands with one box's ledger (GET /v1/operator/boxes)."""

    box_id: str
    last_seen_at: int | None
    contiguous_sequence: int
    applied_sequence: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountView:
    phone: str
    user_id: str
    balances: Balances


@dataclass(frozen=True, slots=True, kw_only=True)
class AnomalyView:
    anomaly_id: int
    kind: str
    code: int
    detail: str
    box_id: str | None
    resolved: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerView:
    base_url: str
    as_of: int | None = None  # Unix time of the last successful poll
    boxes: tuple[BoxLedgerView, ...] = ()
    accounts: tuple[AccountView, ...] = ()
    anomaly_count: int = 0
    anomalies: tuple[AnomalyView, ...] = ()  # the newest few
    books_balanced: bool | None = None
    journal_accounts: int = 0
    journal_transactions: int = 0


# --- the log ----------------------------------------------------------------------------------------


class LogLevel(enum.Enum):
    ACTION = "action"  # a key press asked for something
    OK = "ok"  # it worked
    ERROR = "error"  # it failed, or polling failed


@dataclass(frozen=True, slots=True, kw_only=True)
class LogEntry:
    serial: int  # increasing: the screen appends the entries it has not shown yet
    at_s: int  # seconds since the bench started
    level: LogLevel
    source: str  # phone1, BOX-DEMO-1, plant, server
    text: str
    code: int | None = None  # the wire error code of a refusal (protocol.errors.ErrorCode)
    code_name: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchState:
    box: BoxView
    phones: tuple[PhoneView, ...]
    server: ServerView
    log: tuple[LogEntry, ...] = ()


# --- what a key asks for ----------------------------------------------------------------------------


class ActionKind(enum.Enum):
    # the phone (the selected one)
    REGISTER = "register"  # sign up with a deposit if not logged in, then request a grant
    SCAN = "scan"
    START = "start"
    TOP_UP = "top up"
    STOP = "stop"
    OPEN_DOOR = "open door"
    VISIT = "visit"
    SYNC = "sync"
    # the box and its plant
    TOGGLE_UPLINK = "toggle 4G"
    TOGGLE_METERING_DOOR = "metering-box door"
    TOGGLE_OUTLET_DOOR = "outlet door by hand"
    TOGGLE_LOAD = "plug/unplug load"
    MORE_LOAD = "more load"
    LESS_LOAD = "less load"
    # the operator
    RECONCILE = "reconcile"


PHONE_ACTIONS = frozenset(
    {
        ActionKind.REGISTER,
        ActionKind.SCAN,
        ActionKind.START,
        ActionKind.TOP_UP,
        ActionKind.STOP,
        ActionKind.OPEN_DOOR,
        ActionKind.VISIT,
        ActionKind.SYNC,
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Action:
    kind: ActionKind
    phone: int = 0  # index into BenchState.phones
    outlet: int = 1

    @property
    def by_phone(self) -> bool:
        return self.kind in PHONE_ACTIONS
