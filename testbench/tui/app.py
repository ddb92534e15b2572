"""The test-bench TUI: the box, each phone and the server on one screen, driven from the keyboard.

The screen only renders a `BenchState` and turns keys into `Action`s; a `Bench` (testbench.tui.bench)
does the polling and the work. Each action and each poll runs as a worker, so the screen never
waits on the radio, a phone's CLI or the server, and a failed action only ever reaches the log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widgets import Footer, Header, RichLog, Sparkline, Static
from textual.worker import Worker, WorkerState

from . import render
from .bench import Bench
from .state import Action, ActionKind, BenchState, BoxView, OutletView, PhoneView, ServerView

PLANT_POLL_S = 0.5
SYSTEM_POLL_S = 2.0


class BoxPanel(Vertical):
    """The box: uplink, metering-box door, ledger, and per outlet its door, breaker, load, power,
    energy, session and a plot of its power."""

    def __init__(self, box: BoxView) -> None:
        super().__init__(id="box")
        self._outlets = [outlet.number for outlet in box.outlets]
        # what is on screen: only what changed is drawn again (each draw costs the event loop,
        # which also serves the simulated plant)
        self._shown_box: BoxView | None = None
        self._shown_outlets: dict[int, tuple[OutletView, bool]] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="box-summary")
        yield Static(
            render.OUTLET_HEADER.ljust(render.OUTLET_LINE_WIDTH) + "power, last 30 s", id="outlet-header"
        )
        for number in self._outlets:
            with Horizontal(classes="outlet-row"):
                yield Static(id=f"outlet-{number}", classes="outlet-line")
                yield Sparkline(id=f"power-{number}")

    def show(self, box: BoxView, *, selected_outlet: int) -> None:
        shown = self._shown_box
        if shown is None or render.box_title(shown) != render.box_title(box):
            self.border_title = render.box_title(box)
        summary = render.box_summary(box)
        if shown is None or render.box_summary(shown) != summary:
            self.query_one("#box-summary", Static).update(summary, layout=False)
        self._shown_box = box
        for outlet in box.outlets:
            selected = outlet.number == selected_outlet
            if outlet.number not in self._outlets or self._shown_outlets.get(outlet.number) == (
                outlet,
                selected,
            ):
                continue
            before = self._shown_outlets.get(outlet.number)
            self._shown_outlets[outlet.number] = (outlet, selected)
            self.query_one(f"#outlet-{outlet.number}", Static).update(
                render.outlet_line(outlet, selected=selected), layout=False
            )
            if before is None or before[0].power_history_w != outlet.power_history_w:
                # a leading zero pins the plot's floor at 0 W (Sparkline scales from the data's minimum)
                self.query_one(f"#power-{outlet.number}", Sparkline).data = (0, *outlet.power_history_w)


class PhonePanel(Vertical):
    """One phone: who it is logged in as, its grants, running sessions, receipts, last action."""

    def __init__(self, index: int) -> None:
        super().__init__(id=f"phone-{index + 1}", classes="phone")
        self._shown: tuple[PhoneView, bool] | None = None

    def compose(self) -> ComposeResult:
        yield Static(classes="phone-body")

    def show(self, phone: PhoneView, *, selected: bool) -> None:
        if self._shown == (phone, selected):
            return
        self._shown = (phone, selected)
        self.border_title = render.phone_title(phone, selected=selected)
        self.set_class(selected, "-selected")
        self.query_one(".phone-body", Static).update(render.phone_body(phone))


class ServerPanel(Vertical):
    """The settlement server: books, where each box's ledger stands, accounts, anomalies."""

    def __init__(self) -> None:
        super().__init__(id="server")
        self._shown: Text | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="server-body")

    def on_mount(self) -> None:
        self.border_title = "settlement server"

    def show(self, server: ServerView, box: BoxView) -> None:
        body = render.server_body(server, box)
        if body != self._shown:
            self._shown = body
            self.query_one("#server-body", Static).update(body)


def _action(kind: ActionKind) -> str:
    return f"act('{kind.name}')"


class BenchApp(App[None]):
    """The whole system on one screen (docs/testbench.md, "The test-bench TUI")."""

    TITLE = "powerbox test bench"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    Screen { layout: vertical; }
    #box { height: auto; border: round $primary; border-title-style: bold; padding: 0 1; }
    #outlet-header { color: $text-muted; }
    .outlet-row { height: 1; }
    .outlet-line { width: 80; }  /* render.OUTLET_LINE_WIDTH */
    .outlet-row Sparkline { width: 1fr; }
    #middle { height: 18; }
    .phone, #server { width: 1fr; border: round $panel-lighten-2; padding: 0 1; }
    .phone.-selected { border: round $accent; border-title-style: bold; }
    #server { width: 1.2fr; }
    #log { height: 1fr; min-height: 5; border: round $panel-lighten-2; padding: 0 1; }
    #help { height: 1; padding: 0 1; }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        *(Binding(str(n), f"select_outlet({n})", f"outlet {n}", show=False) for n in range(1, 5)),
        Binding("tab", "next_phone", "next phone", show=False, priority=True),
        Binding("p", "next_phone", "phone"),
        Binding("g", _action(ActionKind.TOGGLE_UPLINK), "4G"),
        Binding("m", _action(ActionKind.TOGGLE_METERING_DOOR), "meter door"),
        Binding("o", _action(ActionKind.TOGGLE_OUTLET_DOOR), "door by hand"),
        Binding("l", _action(ActionKind.TOGGLE_LOAD), "load"),
        Binding("plus", _action(ActionKind.MORE_LOAD), "+500 W", show=False),
        Binding("minus", _action(ActionKind.LESS_LOAD), "-500 W", show=False),
        Binding("r", _action(ActionKind.REGISTER), "grant"),
        Binding("c", _action(ActionKind.SCAN), "scan"),
        Binding("s", _action(ActionKind.START), "start"),
        Binding("t", _action(ActionKind.TOP_UP), "top up"),
        Binding("x", _action(ActionKind.STOP), "stop"),
        Binding("d", _action(ActionKind.OPEN_DOOR), "unlock"),
        Binding("v", _action(ActionKind.VISIT), "visit"),
        Binding("y", _action(ActionKind.SYNC), "sync"),
        Binding("a", _action(ActionKind.RECONCILE), "reconcile"),
    ]

    selected_phone: reactive[int] = reactive(0, init=False)
    selected_outlet: reactive[int] = reactive(1, init=False)

    def __init__(
        self, bench: Bench, *, plant_poll_s: float = PLANT_POLL_S, system_poll_s: float = SYSTEM_POLL_S
    ) -> None:
        super().__init__()
        self.bench = bench
        self._plant_poll_s = plant_poll_s
        self._system_poll_s = system_poll_s
        self._polls_running: set[str] = set()
        self._log_shown = 0  # the serial of the last log entry written to the log pane
        self._help_shown: Text | None = None
        initial = bench.state
        self._box = BoxPanel(initial.box)
        self._phones = [PhonePanel(index) for index in range(len(initial.phones))]
        self._server = ServerPanel()

    def compose(self) -> ComposeResult:
        yield Header(icon="⚡")
        yield self._box
        with Horizontal(id="middle"):
            yield from self._phones
            yield self._server
        yield RichLog(id="log", max_lines=500, wrap=True, markup=False)
        yield Static(id="help")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        log = self.query_one("#log", RichLog)
        log.border_title = "log"
        log.can_focus = False
        self._show()
        self._poll("phones", self.bench.refresh_phones)
        self._poll("plant", self.bench.poll_plant)
        self._poll("system", self.bench.poll_system)
        self.set_interval(self._plant_poll_s, lambda: self._poll("plant", self.bench.poll_plant))
        self.set_interval(self._system_poll_s, lambda: self._poll("system", self.bench.poll_system))

    # --- showing the state ---

    @property
    def state(self) -> BenchState:
        return self.bench.state

    def _show(self) -> None:
        state = self.bench.state
        self._box.show(state.box, selected_outlet=self.selected_outlet)
        for index, (panel, phone) in enumerate(zip(self._phones, state.phones, strict=True)):
            panel.show(phone, selected=index == self.selected_phone)
        self._server.show(state.server, state.box)
        log = self.query_one("#log", RichLog)
        for entry in state.log:
            if entry.serial > self._log_shown:
                log.write(render.log_line(entry), expand=True)
                self._log_shown = entry.serial
        selected = state.phones[self.selected_phone] if state.phones else None
        help_line = render.help_line(selected, state.box, self.selected_outlet)
        if help_line != self._help_shown:
            self._help_shown = help_line
            self.query_one("#help", Static).update(help_line, layout=False)

    def watch_selected_phone(self) -> None:
        self._show()

    def watch_selected_outlet(self) -> None:
        self._show()

    # --- background work ---

    def _poll(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Start a poll unless the same one still runs (a slow system must not pile them up)."""
        if name in self._polls_running:
            return
        self._polls_running.add(name)

        async def poll() -> None:
            try:
                await work()
            finally:
                self._polls_running.discard(name)
                self._show()

        self.run_worker(poll(), name=f"poll {name}", group="poll", exit_on_error=False)

    def _run_action(self, action: Action) -> None:
        async def run() -> None:
            try:
                await self.bench.act(action)
            finally:
                self._show()
                self._poll("system", self.bench.poll_system)

        self.run_worker(run(), name=action.kind.value, group="actions", exit_on_error=False)
        self.call_after_refresh(self._show)  # the action's log line and the phone's "busy" mark

    @on(Worker.StateChanged)
    def _worker_failed(self, event: Worker.StateChanged) -> None:
        """A bench never raises; should it, say so in the log rather than end the app."""
        if event.state is WorkerState.ERROR:
            self.query_one("#log", RichLog).write(
                f"internal error in {event.worker.name}: {event.worker.error!r}"
            )

    # --- key actions ---

    def action_act(self, kind_name: str) -> None:
        self._run_action(
            Action(kind=ActionKind[kind_name], phone=self.selected_phone, outlet=self.selected_outlet)
        )

    def action_select_outlet(self, number: int) -> None:
        if any(outlet.number == number for outlet in self.bench.state.box.outlets):
            self.selected_outlet = number

    def action_next_phone(self) -> None:
        count = len(self.bench.state.phones)
        if count:
            self.selected_phone = (self.selected_phone + 1) % count
