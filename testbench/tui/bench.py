"""The TUI's backend: a `Bench` keeps a `BenchState` snapshot up to date and carries out `Action`s.

`LiveBench` drives a running system (testbench.system) through the same doors a person would use:
the plant's control registers (loads, doors), `powerbox box status|uplink`, the `powerbox phone
--json` CLI on each phone's node, and the server's operator API. Every failure, of an action or of
polling, becomes a log entry (with the wire error code when there is one); nothing raises into the
screen. `StaticBench` holds a fixed state, for rendering the screen without a system.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import httpx

from box_peripheral.config import BoxConfig, load_config
from box_peripheral.store import BoxStore
from box_peripheral.uplink import off_switch_path
from phone_client.display import kwh, yuan
from protocol.errors import PowerboxError
from testbench.app_process import AppProcessError
from testbench.plant import PlantControlError, PlantStatus
from testbench.system import (
    OperatorConsole,
    PhoneCli,
    PhoneCommandError,
    RunningBox,
    RunningSystem,
)

from .state import (
    AccountView,
    Action,
    ActionKind,
    AnomalyView,
    Balances,
    BenchState,
    BoxLedgerView,
    BoxView,
    GrantView,
    LogEntry,
    LogLevel,
    OutletView,
    PhoneView,
    ReceiptView,
    ServerView,
    SessionView,
)

DEPOSIT_YUAN = "20"
GRANT_YUAN = "5"
LOAD_W = 2000  # what `l` plugs in
LOAD_STEP_W = 500  # what `+` and `-` add and take away
POWER_HISTORY_SAMPLES = 60  # 30 s at the TUI's plant poll of 0.5 s
LOG_ENTRIES = 500
ANOMALIES_SHOWN = 3
ANOMALY_PAGE = 100


class Bench(Protocol):
    """What the screen needs: a snapshot, polling, and actions. No method raises."""

    @property
    def state(self) -> BenchState: ...

    async def poll_plant(self) -> None:
        """The fast poll: loads, power, energy, breakers, doors."""

    async def poll_system(self) -> None:
        """The slow poll: the box's ledger and uplink, the server's view."""

    async def refresh_phones(self) -> None:
        """Every phone's wallet."""

    async def act(self, action: Action) -> None:
        """Carry out `action`; its outcome goes to the log."""


class StaticBench:
    """A bench frozen at one state: the screen renders it, actions only say so in the log."""

    def __init__(self, state: BenchState) -> None:
        self._state = state

    @property
    def state(self) -> BenchState:
        return self._state

    async def poll_plant(self) -> None:
        return None

    async def poll_system(self) -> None:
        return None

    async def refresh_phones(self) -> None:
        return None

    async def act(self, action: Action) -> None:
        serial = max((entry.serial for entry in self._state.log), default=0) + 1
        entry = LogEntry(
            serial=serial,
            at_s=0,
            level=LogLevel.ERROR,
            source="bench",
            text=f"{action.kind.value}: this is a static view, there is no system to drive",
        )
        self._state = dataclasses.replace(self._state, log=(*self._state.log, entry))


class ActionFailedError(RuntimeError):
    """An action or a poll failed: the operator API refused, the box has no such outlet...; `code`
    when the refusal has a wire code."""

    def __init__(self, text: str, *, code: int | None = None, code_name: str | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.code = code
        self.code_name = code_name


def _failure(error: Exception) -> ActionFailedError:
    """Any failure of a part of the system as one readable line, with its wire code if it has one."""
    match error:
        case ActionFailedError():
            return error
        case PhoneCommandError():
            event = error.event
            code = event.get("code")
            text = str(event.get("explanation") or event.get("message") or "failed")
            message = event.get("message")
            if message and message != text:
                text = f"{text} ({message})"
            return ActionFailedError(
                text, code=code if isinstance(code, int) else None, code_name=event.get("name")
            )
        case PowerboxError():
            return ActionFailedError(error.detail, code=int(error.code), code_name=error.code.name)
        case httpx.HTTPError():
            return ActionFailedError(f"the server did not answer ({type(error).__name__}: {error})")
        case PlantControlError() | AppProcessError() | RuntimeError() | OSError() | ValueError():
            return ActionFailedError(str(error) or type(error).__name__)
    return ActionFailedError(f"{type(error).__name__}: {error}")


def _short(hex_id: str) -> str:
    return hex_id[:8]


class LiveBench:
    """A bench over a running system (its first box and all its phones); `LiveBench.open(system)`."""

    def __init__(
        self,
        system: RunningSystem,
        operator: OperatorConsole,
        *,
        deposit_yuan: str = DEPOSIT_YUAN,
        grant_yuan: str = GRANT_YUAN,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._system = system
        self._operator = operator
        self._box: RunningBox = system.box()
        self._box_config: BoxConfig = load_config(self._box.config_path)
        uplink = self._box_config.uplink
        self._uplink_configured = uplink.server is not None and uplink.enabled
        self._uplink_off_switch = off_switch_path(self._box_config.database)
        self._deposit_yuan = deposit_yuan
        self._grant_yuan = grant_yuan
        self._monotonic = monotonic
        self._began = monotonic()
        self._phone_locks = [asyncio.Lock() for _ in system.phones]
        self._history: dict[int, collections.deque[int]] = {
            outlet: collections.deque([0] * POWER_HISTORY_SAMPLES, maxlen=POWER_HISTORY_SAMPLES)
            for outlet in self._box.labels
        }
        self._running_by_outlet: dict[int, tuple[str, int]] = {}  # session id, balance in fen
        self._plant: PlantStatus | None = None
        self._box_view = BoxView(
            box_id=self._box.box_id,
            uplink_on=self._uplink_on(),
            metering_door_closed=True,
            outlets=tuple(
                OutletView(
                    number=outlet,
                    rated_w=0,
                    load_w=0,
                    power_w=0,
                    energy_wh=0,
                    breaker_closed=False,
                    door_closed=True,
                    lock_energized=False,
                )
                for outlet in sorted(self._box.labels)
            ),
        )
        self._phones = [PhoneView(name=phone.name, number=phone.number) for phone in system.phones]
        self._server = ServerView(base_url=system.server.base_url)
        self._log: collections.deque[LogEntry] = collections.deque(maxlen=LOG_ENTRIES)
        self._serial = 0
        self._poll_errors: dict[str, str] = {}  # the last failure of each poll, logged once

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, system: RunningSystem, *, deposit_yuan: str = DEPOSIT_YUAN, grant_yuan: str = GRANT_YUAN
    ) -> AsyncIterator[LiveBench]:
        """A bench over `system`, using its operator console (one kept-alive HTTP client)."""
        yield cls(system, system.operator, deposit_yuan=deposit_yuan, grant_yuan=grant_yuan)

    # --- the snapshot ---

    @property
    def state(self) -> BenchState:
        return BenchState(
            box=self._box_view, phones=tuple(self._phones), server=self._server, log=tuple(self._log)
        )

    def _note(
        self,
        level: LogLevel,
        source: str,
        text: str,
        *,
        code: int | None = None,
        code_name: str | None = None,
    ) -> None:
        self._serial += 1
        self._log.append(
            LogEntry(
                serial=self._serial,
                at_s=int(self._monotonic() - self._began),
                level=level,
                source=source,
                text=text,
                code=code,
                code_name=code_name,
            )
        )

    @contextlib.contextmanager
    def _polling(self, source: str) -> Iterator[None]:
        """A failing poll is logged when it starts failing (and when it recovers), not every time."""
        try:
            yield
        except Exception as error:  # polling must go on whatever a part of the system does
            failure = _failure(error)
            if self._poll_errors.get(source) != failure.text:
                self._poll_errors[source] = failure.text
                self._note(LogLevel.ERROR, source, f"polling failed: {failure.text}", code=failure.code)
        else:
            if self._poll_errors.pop(source, None) is not None:
                self._note(LogLevel.OK, source, "polling works again")

    # --- polling ---

    async def poll_plant(self) -> None:
        with self._polling("plant"):
            self._plant = await self._box.plant.control.status()
            for outlet in self._plant.outlets:
                history = self._history.setdefault(
                    outlet.outlet, collections.deque(maxlen=POWER_HISTORY_SAMPLES)
                )
                history.append(outlet.load_w if outlet.breaker_closed else 0)
            self._rebuild_box()

    async def poll_system(self) -> None:
        with self._polling(self._box.box_id):
            # what `powerbox box status` reads, read here: a process every poll costs too much CPU
            config = self._box_config
            async with BoxStore.open(
                config.database, box_id=config.certificate.box_id, box_key=config.box_key
            ) as store:
                running = await store.running_sessions()
                last_sequence = await store.last_sequence()
                acked_sequence = await store.acked_sequence()
            self._running_by_outlet = {s.outlet: (_short(s.session_id.hex()), s.balance_fen) for s in running}
            self._box_view = dataclasses.replace(
                self._box_view, last_sequence=last_sequence, acked_sequence=acked_sequence
            )
        self._box_view = dataclasses.replace(self._box_view, uplink_on=self._uplink_on())
        self._rebuild_box()
        with self._polling("server"):
            self._server = await self._server_view()

    def _rebuild_box(self) -> None:
        if self._plant is None:
            return
        outlets = []
        for outlet in self._plant.outlets:
            running = self._running_by_outlet.get(outlet.outlet)
            session_id, balance_fen = (None, None) if running is None else running
            outlets.append(
                OutletView(
                    number=outlet.outlet,
                    rated_w=outlet.rated_w,
                    load_w=outlet.load_w,
                    power_w=outlet.load_w if outlet.breaker_closed else 0,
                    energy_wh=outlet.delivered_mwh // 1000,
                    breaker_closed=outlet.breaker_closed,
                    door_closed=outlet.door_closed,
                    lock_energized=outlet.lock_energized,
                    session_id=session_id,
                    session_balance_fen=balance_fen,
                    power_history_w=tuple(self._history.get(outlet.outlet, ())),
                )
            )
        self._box_view = dataclasses.replace(
            self._box_view,
            metering_door_closed=self._plant.metering_door_closed,
            outlets=tuple(outlets),
        )

    def _uplink_on(self) -> bool:
        """The box's 4G switch: configured in box.toml and no `uplink-off` file (box_peripheral.uplink)."""
        return self._uplink_configured and not self._uplink_off_switch.exists()

    async def _server_view(self) -> ServerView:
        operator = self._operator
        boxes = await operator.call("GET", "/v1/operator/boxes")
        anomalies = await self._anomalies()
        books = await operator.call("GET", "/v1/operator/books")
        accounts = []
        for phone in self._phones:
            if phone.user_id is not None:
                statement = await operator.call("GET", f"/v1/operator/users/{phone.user_id}/statement")
                accounts.append(
                    AccountView(
                        phone=phone.name, user_id=phone.user_id, balances=_balances(statement["balances"])
                    )
                )
        return ServerView(
            base_url=self._system.server.base_url,
            as_of=int(time.time()),
            boxes=tuple(
                BoxLedgerView(
                    box_id=str(box["box_id"]),
                    last_seen_at=box["last_seen_at"],
                    contiguous_sequence=int(box["contiguous_sequence"]),
                    applied_sequence=int(box["applied_sequence"]),
                )
                for box in boxes
            ),
            accounts=tuple(accounts),
            anomaly_count=len(anomalies),
            anomalies=tuple(
                AnomalyView(
                    anomaly_id=int(a["anomaly_id"]),
                    kind=str(a["kind"]),
                    code=int(a["code"]),
                    detail=str(a["detail"]),
                    box_id=a["box_id"],
                    resolved=a["resolved_at"] is not None,
                )
                for a in anomalies[-ANOMALIES_SHOWN:]
            ),
            books_balanced=bool(books["balanced"]),
            journal_accounts=int(books["accounts"]),
            journal_transactions=int(books["transactions"]),
        )

    async def _anomalies(self) -> list[dict[str, Any]]:
        """Every anomaly, oldest first (the route pages by id)."""
        found: list[dict[str, Any]] = []
        while True:
            after = found[-1]["anomaly_id"] if found else 0
            page = await self._operator.call(
                "GET", "/v1/operator/anomalies", params={"after_id": after, "limit": ANOMALY_PAGE}
            )
            found.extend(page)
            if len(page) < ANOMALY_PAGE:
                return found

    async def refresh_phones(self) -> None:
        await asyncio.gather(*(self._refresh_phone(index) for index in range(len(self._phones))))

    async def _refresh_phone(self, index: int) -> None:
        async with self._phone_locks[index]:
            await self._read_wallet(index)

    async def _read_wallet(self, index: int) -> None:
        """The phone's wallet by its CLI (the caller holds the phone's lock)."""
        phone = self._system.phones[index]
        with self._polling(phone.name):
            # one after the other: the first command on a new wallet creates it (two at once race),
            # and three at once are a burst of CPU the box's meter polling can do without
            status = await phone.run("status", expect="status")
            grants = await phone.run("grant", "list", expect="grants")
            receipts = await phone.run("receipts", expect="receipts")
            login = status["login"]
            balances = status["balances"]
            self._phones[index] = dataclasses.replace(
                self._phones[index],
                user_id=None if login is None else str(login["subject"]),
                grants_available_fen=int(status["grants_available_fen"]),
                grants=tuple(
                    GrantView(
                        grant_id=_short(g["grant_id"]),
                        status=str(g["status"]),
                        box_id=g["box_id"],
                        amount_fen=int(g["amount_fen"]),
                        remaining_fen=int(g["remaining_fen"]),
                    )
                    for g in grants["grants"]
                ),
                sessions=tuple(
                    SessionView(
                        session_id=_short(s["session_id"]),
                        box_id=str(s["box_id"]),
                        outlet=int(s["outlet"]),
                        state=str(s["state"]),
                        energy_wh=int(s["energy_wh"]),
                        cost_fen=int(s["cost_fen"]),
                        remaining_fen=int(s["remaining_fen"]),
                        power_w=int(s["power_w"]),
                    )
                    for s in status["running_sessions"]
                ),
                receipts=tuple(
                    ReceiptView(
                        sequence=int(r["sequence"]),
                        session_id=_short(r["session_id"]),
                        box_id=str(r["box_id"]),
                        outlet=int(r["outlet"]),
                        energy_wh=int(r["energy_wh"]),
                        cost_fen=int(r["cost_fen"]),
                        end_reason=str(r["end_reason"]),
                    )
                    for r in receipts["receipts"]
                ),
                batches_to_carry=int(status["batches_to_carry"]),
                balances=None if balances is None else _balances(balances),
            )

    # --- actions ---

    async def act(self, action: Action) -> None:
        if action.by_phone:
            await self._phone_action(action)
            return
        source = "server" if action.kind is ActionKind.RECONCILE else self._box.box_id
        self._note(LogLevel.ACTION, source, _describe(action))
        try:
            result = await self._box_action(action)
        except Exception as error:  # an action's failure is news for the log, never a crash
            failure = _failure(error)
            self._note(LogLevel.ERROR, source, failure.text, code=failure.code, code_name=failure.code_name)
        else:
            self._note(LogLevel.OK, source, result)
        await self.poll_plant()  # show the doors and loads as they are now

    async def _phone_action(self, action: Action) -> None:
        index = action.phone
        phone = self._system.phones[index]
        self._note(LogLevel.ACTION, phone.name, _describe(action))
        async with self._phone_locks[index]:
            self._phones[index] = dataclasses.replace(self._phones[index], busy=action.kind.value)
            try:
                result = await self._run_phone_action(phone, action)
            except Exception as error:  # an action's failure is news for the log, never a crash
                failure = _failure(error)
                self._note(
                    LogLevel.ERROR, phone.name, failure.text, code=failure.code, code_name=failure.code_name
                )
                code = f" [{failure.code} {failure.code_name}]" if failure.code is not None else ""
                outcome = f"{action.kind.value} failed{code}: {failure.text}"
            else:
                self._note(LogLevel.OK, phone.name, result)
                outcome = f"{action.kind.value}: {result}"
            await self._read_wallet(index)
            # done only now, so that a finished action always shows the wallet it left behind
            self._phones[index] = dataclasses.replace(self._phones[index], busy=None, last_result=outcome)

    async def _run_phone_action(self, phone: PhoneCli, action: Action) -> str:
        box = self._box
        match action.kind:
            case ActionKind.REGISTER:
                return await self._register(phone)
            case ActionKind.SCAN:
                event = await phone.run("scan", self._label(action.outlet), expect="scan")
                free = [str(o["outlet"]) for o in event["outlets"] if o["available"]]
                return (
                    f"found {event['advertised_name']} ({event['box_reports']}); "
                    f"free outlets {', '.join(free) or 'none'}"
                )
            case ActionKind.START:
                return await self._start(phone, action.outlet)
            case ActionKind.TOP_UP:
                event = await phone.run("top-up", expect="topped_up")
                return f"balance {yuan(event['balance_fen'])}, {yuan(event['remaining_fen'])} left"
            case ActionKind.STOP:
                event = await phone.run("stop", expect=("session_ended", "ended_while_away"))
                if event["event"] == "ended_while_away":
                    return (
                        f"session {_short(event['session_id'])} had ended already: "
                        f"{kwh(event['energy_wh'])}, {yuan(event['cost_fen'])}"
                    )
                return (
                    f"session {_short(event['session_id'])} ended: {kwh(event['energy_wh'])}, "
                    f"{yuan(event['cost_fen'])}, receipt #{event['sequence']} verified"
                )
            case ActionKind.OPEN_DOOR:
                event = await phone.run("door", expect="door_opened")
                return f"the door of outlet {event['outlet']} is unlocked"
            case ActionKind.VISIT:
                event = await phone.run("visit", box.box_id, expect="visited")
                batch = event["batch"]
                if batch is None:
                    return f"{box.box_id} verified; nothing new to carry"
                entries = f"{batch['first_sequence']}-{batch['last_sequence']}"
                return f"carrying {box.box_id}'s entries {entries} (sealed)"
            case ActionKind.SYNC:
                event = await phone.run("sync", expect="synced")
                handed = [
                    f"{b['first_sequence']}-{b['last_sequence']}"
                    + (f" acked {b['acked_sequence']}" if b["acked_sequence"] is not None else " refused")
                    for b in event["batches"]
                ]
                return (
                    f"handed in {', '.join(handed) or 'no entries'}; "
                    f"{event['grants_settled']} grants settled, {event['grants_added']} added"
                )
        raise ActionFailedError(f"{action.kind.value} is not something a phone does")

    async def _register(self, phone: PhoneCli) -> str:
        """Sign up with a deposit unless logged in already, then freeze part of it into a grant."""
        status = await phone.run("status", expect="status")
        login = status["login"]
        said = []
        if login is None or login["expired"]:
            logged_in = await phone.sign_up(self._system.server, deposit_yuan=self._deposit_yuan)
            said.append(
                f"signed up as user {logged_in['subject']}, {yuan(logged_in['available_fen'])} deposited"
            )
        granted = await phone.run(
            "grant", "request", self._grant_yuan, "--box", self._box.box_id, expect="grant"
        )
        said.append(f"grant {_short(granted['grant_id'])} of {yuan(granted['amount_fen'])}")
        return "; ".join(said)

    async def _start(self, phone: PhoneCli, outlet: int) -> str:
        args = ("start", self._label(outlet), "--readings", "1")
        process, started = await phone.spawn_until(*args, first="session_started")
        await phone.finish(process, args, ("left_running", "session_ended"))
        return (
            f"power on at outlet {started['outlet']}: session {_short(started['session_id'])}, "
            f"{yuan(started['balance_fen'])}"
        )

    def _label(self, outlet: int) -> str:
        try:
            return self._box.labels[outlet]
        except KeyError:
            raise ActionFailedError(f"{self._box.box_id} has no outlet {outlet}") from None

    async def _box_action(self, action: Action) -> str:
        control = self._box.plant.control
        match action.kind:
            case ActionKind.TOGGLE_UPLINK:
                on = not self._uplink_on()
                await self._box.uplink(on)
                self._box_view = dataclasses.replace(self._box_view, uplink_on=self._uplink_on())
                return f"4G {'on' if self._box_view.uplink_on else 'off'}"
            case ActionKind.TOGGLE_METERING_DOOR:
                if (await control.status()).metering_door_closed:
                    await control.open_door(0)
                    return "the metering-box door is open"
                await control.close_door(0)
                return "the metering-box door is closed"
            case ActionKind.TOGGLE_OUTLET_DOOR:
                if (await control.status()).outlet(action.outlet).door_closed:
                    await control.open_door(action.outlet)
                    return f"the door of outlet {action.outlet} is open"
                await control.close_door(action.outlet)
                return f"the door of outlet {action.outlet} is closed"
            case ActionKind.TOGGLE_LOAD:
                if (await control.status()).outlet(action.outlet).load_w:
                    await control.unplug(action.outlet)
                    return f"outlet {action.outlet}: unplugged"
                await control.set_load(action.outlet, LOAD_W)
                return f"outlet {action.outlet}: a {LOAD_W:,} W load plugged in"
            case ActionKind.MORE_LOAD | ActionKind.LESS_LOAD:
                step = LOAD_STEP_W if action.kind is ActionKind.MORE_LOAD else -LOAD_STEP_W
                load = max(0, (await control.status()).outlet(action.outlet).load_w + step)
                await control.set_load(action.outlet, load)
                return f"outlet {action.outlet}: the load draws {load:,} W"
            case ActionKind.RECONCILE:
                done = await self._operator.call("POST", "/v1/operator/reconcile")
                balanced = "balanced" if done["books"]["balanced"] else "NOT balanced"
                return (
                    f"reconciled: {done['entries_applied']} entries applied, "
                    f"{done['boxes_settled']} boxes settled, {done['grants_released']} grants released, "
                    f"{done['gaps']} gaps; books {balanced}"
                )
        raise ActionFailedError(f"{action.kind.value} is not something the box or server does")


_OUTLET_ACTIONS = frozenset(
    {
        ActionKind.SCAN,
        ActionKind.START,
        ActionKind.TOGGLE_LOAD,
        ActionKind.TOGGLE_OUTLET_DOOR,
        ActionKind.MORE_LOAD,
        ActionKind.LESS_LOAD,
    }
)


def _describe(action: Action) -> str:
    if action.kind in _OUTLET_ACTIONS:
        return f"{action.kind.value} (outlet {action.outlet})"
    return action.kind.value


def _balances(data: dict[str, Any]) -> Balances:
    return Balances(
        available_fen=int(data["available_fen"]),
        frozen_fen=int(data["frozen_fen"]),
        arrears_fen=int(data["arrears_fen"]),
    )
