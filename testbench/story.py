"""The offline story of issue 7, end to end, on embedded defaults (the start of `powerbox demo`).

Everything runs on this machine: the virtual radio and one org.bluez emulator node per device
(testbench.radio, testbench.bluez), the simulated Modbus plant (testbench.plant), the settlement
server on SQLite in a thread of this process (uvicorn), one box daemon (`powerbox box run`) with
four outlets provisioned through the server, and two phones, each the phone CLI
(`python -m powerbox_cli phone --json ...`) on its own node with its own wallet.

`run_offline_story` walks the story step by step, timing each step and calling
`report(step, data)` after it; any failure is raised as `StoryError` naming the step. Everything
is torn down at the end, on success or failure.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger_server import keys
from ledger_server.app import create_app
from ledger_server.auth import Role, create_staff
from ledger_server.config import ServerConfig
from ledger_server.providers import DevSmsProvider
from ledger_server.runtime import open_context
from protocol import cose
from protocol.tokens import BoxCertificate
from testbench.app_process import AppProcess
from testbench.bluez import BleNode
from testbench.box_setup import ProvisionedBox, write_box_directory
from testbench.plant import Plant, running_plant
from testbench.radio.process import RadioProcess
from testbench.testbed import BleTestbed, ControllerPool

Report = Callable[[str, dict[str, Any]], None]

BOX_ID = "BOX-DEMO-1"
OPERATOR_USERNAME = "operator"
PHONE_NUMBERS = ("+8613900000001", "+8613900000002")
PRICE_FEN_PER_KWH = 120
# a real second is a simulated minute at the meters, so a short session costs real money
PLANT_TIME_SCALE = 60.0
BOX_POLICY = {"idle_timeout_s": 120, "poll_interval_ms": 250}
RADIO_CONTROLLERS = 4  # the box and two phones, one spare
COMMAND_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 30.0


class StoryError(RuntimeError):
    """A step of the story failed; `step` names it."""

    def __init__(self, step: str, detail: str) -> None:
        super().__init__(f"step {step!r} failed: {detail}")
        self.step = step
        self.detail = detail


@dataclass(frozen=True, slots=True)
class StepTiming:
    name: str
    ms: float
    data: dict[str, Any]


@dataclass(slots=True)
class StoryResult:
    steps: list[StepTiming] = field(default_factory=list)
    scan_to_power_ms: float | None = None
    scan_to_power_source: str = ""
    statements: dict[str, dict[str, Any]] = field(default_factory=dict)
    operator_report: list[dict[str, Any]] = field(default_factory=list)
    books: dict[str, Any] = field(default_factory=dict)
    total_ms: float = 0.0

    def step(self, name: str) -> StepTiming:
        for timing in self.steps:
            if timing.name == name:
                return timing
        raise KeyError(name)


# --- the settlement server ---------------------------------------------------------------------


class _ServerThread:
    """uvicorn serving the server app in a thread, on a loopback socket bound before it starts."""

    def __init__(self, app: object) -> None:
        # IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so (else 40 ms delayed ACKs)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.bind(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))  # type: ignore[arg-type]
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    async def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the settlement server did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 30)
        self.socket.close()


@dataclass(slots=True)
class _Server:
    base_url: str
    sms: DevSmsProvider
    key_directory: Path
    operator_password: str  # made up for this run: the server lives as long as the story


@contextlib.asynccontextmanager
async def _running_server(directory: Path) -> AsyncIterator[_Server]:
    """`powerbox server init` (keys, migrated SQLite, the first operator), then the server."""
    key_directory = directory / "keys"
    keys.create_keys(key_directory)
    config = ServerConfig(
        database_url=f"sqlite+aiosqlite:///{directory / 'server.db'}",
        key_directory=key_directory,
        long_poll_interval_ms=100,
        verify_threads=2,
        verify_processes=0,
    )
    password = secrets.token_urlsafe(16)
    async with open_context(config) as context:
        await create_staff(context, username=OPERATOR_USERNAME, password=password, role=Role.OPERATOR)
    sms = DevSmsProvider()
    thread = _ServerThread(create_app(config, sms=sms))
    await thread.start()
    try:
        yield _Server(
            base_url=f"http://127.0.0.1:{thread.port}",
            sms=sms,
            key_directory=key_directory,
            operator_password=password,
        )
    finally:
        await thread.stop()


class _Operator:
    """The operator's console: the server's operator API over HTTP."""

    def __init__(self, client: httpx.AsyncClient, password: str) -> None:
        self._client = client
        self._password = password
        self._token: str | None = None

    async def call(
        self, method: str, path: str, *, json: Any = None, params: Any = None, expect: int = 200
    ) -> Any:
        if self._token is None:
            login = await self._client.post(
                "/v1/auth/staff/token", json={"username": OPERATOR_USERNAME, "password": self._password}
            )
            login.raise_for_status()
            self._token = str(login.json()["access_token"])
        response = await self._client.request(
            method, path, json=json, params=params, headers={"Authorization": f"Bearer {self._token}"}
        )
        if response.status_code != expect:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None


# --- the phones ---------------------------------------------------------------------------------


class _Phone:
    """`python -m powerbox_cli phone --wallet W --server S --json ...` on the phone's own node."""

    def __init__(self, name: str, testbed: BleTestbed, node: BleNode, wallet: Path, server: str) -> None:
        self.name = name
        self._testbed = testbed
        self._node = node
        self._wallet = wallet
        self._server = server

    async def spawn(self, *args: str) -> AppProcess:
        argv = [sys.executable, "-m", "powerbox_cli", "phone", "--wallet", str(self._wallet)]
        argv += ["--server", self._server, "--json", *args]
        return await self._testbed.spawn(self._node, argv, name=self.name)

    async def finish(self, process: AppProcess, args: Sequence[str], expect: str) -> dict[str, Any]:
        """The command's `expect` event, after it exits 0; its error otherwise."""
        event = await process.wait_for(
            lambda m: m.get("event") in (expect, "error"),
            within=COMMAND_TIMEOUT_S,
            what=f"{expect!r} or an error from `phone {' '.join(args)}`",
        )
        status = await process.wait(within=COMMAND_TIMEOUT_S)
        if event.get("event") != expect:
            raise RuntimeError(
                f"{self.name}: `phone {' '.join(args)}` failed: "
                f"{event.get('explanation') or event.get('message')}"
                f" [{event.get('code')} {event.get('name')}, origin {event.get('origin')}]"
            )
        if status.returncode != 0:
            raise RuntimeError(f"{self.name}: `phone {' '.join(args)}` exited {status.returncode}")
        return dict(event)

    async def run(self, *args: str, expect: str) -> dict[str, Any]:
        return await self.finish(await self.spawn(*args), args, expect)


# --- helpers ------------------------------------------------------------------------------------


async def _eventually(check: Callable[[], Any], what: str, *, timeout_s: float | None = None) -> Any:
    """Poll the async `check` until it returns something truthy (within WAIT_TIMEOUT_S by default)."""
    timeout_s = WAIT_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


async def _box_cli(*args: str) -> str:
    """`powerbox box ...` (run on the box, no radio needed)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "powerbox_cli",
        "box",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    if process.returncode != 0:
        raise RuntimeError(f"`powerbox box {' '.join(args)}` exited {process.returncode}: {output.decode()}")
    return output.decode()


@contextlib.contextmanager
def _radio(directory: Path) -> Iterator[ControllerPool]:
    directory.mkdir(parents=True, exist_ok=True)
    with RadioProcess.start(controllers=RADIO_CONTROLLERS, log_path=directory / "radio.log") as radio:
        yield ControllerPool(radio.endpoints)


# --- the story ------------------------------------------------------------------------------------


class _Steps:
    """Times each step, reports it, and turns its failure into a StoryError naming it."""

    def __init__(self, result: StoryResult, report: Report) -> None:
        self._result = result
        self._report = report
        self.data: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def step(self, name: str) -> AsyncIterator[dict[str, Any]]:
        data: dict[str, Any] = {}
        started = time.perf_counter()
        try:
            yield data
        except StoryError:
            raise
        except Exception as exc:  # every failure names its step
            raise StoryError(name, f"{type(exc).__name__}: {exc}") from exc
        ms = (time.perf_counter() - started) * 1000
        timing = StepTiming(name=name, ms=round(ms, 1), data=data)
        self._result.steps.append(timing)
        self._report(name, {"ms": timing.ms, **data})


async def run_offline_story(workdir: Path, *, report: Report) -> StoryResult:
    """Bring everything up in `workdir`, walk the offline story, tear everything down."""
    result = StoryResult()
    steps = _Steps(result, report)
    began = time.perf_counter()
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        async with steps.step("start everything") as data:
            pool = stack.enter_context(_radio(workdir / "radio"))
            server = await stack.enter_async_context(_running_server(workdir / "server"))
            client = await stack.enter_async_context(httpx.AsyncClient(base_url=server.base_url, timeout=60))
            operator = _Operator(client, server.operator_password)
            plant = await stack.enter_async_context(running_plant(outlets=4, time_scale=PLANT_TIME_SCALE))
            # closed first: the box and the phones go before the plant, the server and the radio
            testbed = BleTestbed(pool, log_dir=workdir / "logs")
            stack.push_async_callback(testbed.aclose)
            box, labels = await _provision_box(operator, server, plant, workdir / "box")
            box_node = await testbed.start_node(name="box")
            box_process = await testbed.spawn(
                box_node,
                [sys.executable, "-m", "powerbox_cli", "box", "run", "--config", str(box.config_path)],
                name="box",
            )
            await box_process.wait_event("ready", within=COMMAND_TIMEOUT_S)
            phones = [
                _Phone(
                    f"phone{n}",
                    testbed,
                    await testbed.start_node(name=f"phone{n}"),
                    workdir / f"phone{n}" / "wallet.sqlite",
                    server.base_url,
                )
                for n in (1, 2)
            ]
            for phone in phones:
                (workdir / phone.name).mkdir(exist_ok=True)
            await _eventually(lambda: _box_seen(operator), "the box's first contact over 4G")
            data.update(server=server.base_url, box_id=BOX_ID, outlets=len(labels))
        phone1, phone2 = phones

        async with steps.step("online preparation") as data:
            for phone, number, deposit, grant in (
                (phone1, PHONE_NUMBERS[0], "10", "0.30"),
                (phone2, PHONE_NUMBERS[1], "10", "2"),
            ):
                await phone.run("register", "shared", number, expect="code_sent")
                code = server.sms.last_code(number)
                if code is None:
                    raise RuntimeError(f"no code texted to {number}")
                logged_in = await phone.run("login", "shared", number, "--code", code, expect="logged_in")
                deposited = await phone.run("deposit", deposit, expect="deposited")
                granted = await phone.run("grant", "request", grant, "--box", BOX_ID, expect="grant")
                data[phone.name] = {
                    "user": logged_in["subject"],
                    "available_fen": deposited["available_fen"],
                    "grant_fen": granted["amount_fen"],
                }
            steps.data["users"] = {p.name: data[p.name]["user"] for p in phones}

        async with steps.step("4G goes down") as data:
            await _box_cli("uplink", "off", "--config", str(box.config_path))
            data["switch"] = "powerbox box uplink off"

        async with steps.step("phone 1 unlocks outlet 1 from its label") as data:
            await plant.control.set_load(1, 3000)  # a big load: the small grant runs out in seconds
            args = ("start", labels[1], "--readings", "1")
            spawned = time.perf_counter()
            process = await phone1.spawn(*args)
            started = await process.wait_for(
                lambda m: m.get("event") in ("session_started", "error"),
                within=COMMAND_TIMEOUT_S,
                what="session_started",
            )
            powered_ms = (time.perf_counter() - spawned) * 1000
            outlet = (await plant.control.status()).outlet(1)
            if started.get("event") == "error":
                await phone1.finish(process, args, "session_started")  # raises with the box's refusal
            left = await process.wait_event("left_running", within=COMMAND_TIMEOUT_S)
            await process.wait(within=COMMAND_TIMEOUT_S)
            if not outlet.breaker_closed:
                raise RuntimeError("the box said power on but outlet 1's breaker is open")
            # the CLI's --json gives no timing of its own: wall time from spawning `phone start`
            # (interpreter start-up included) to its session_started line
            result.scan_to_power_ms = round(powered_ms, 1)
            result.scan_to_power_source = "wall time, spawn of `phone start` to its session_started event"
            steps.data["session1"] = started["session_id"]
            data.update(
                scan_to_power_ms=result.scan_to_power_ms,
                session=started["session_id"][:8],
                balance_fen=started["balance_fen"],
                walked_away=left["interrupted"] is False,
            )

        async with steps.step("the balance runs out and the breaker trips") as data:
            tripped_at = time.perf_counter()

            async def breaker_open() -> bool:
                return not (await plant.control.status()).outlet(1).breaker_closed

            await _eventually(breaker_open, "outlet 1's breaker to trip")
            data["waited_ms"] = round((time.perf_counter() - tripped_at) * 1000, 1)
            await plant.control.unplug(1)

        async with steps.step("phone 1 comes back") as data:
            came_back = await phone1.run("watch", expect="ended_while_away")
            # the box's SessionList carries no end reason (protocol SessionSummary), so the phone
            # cannot say why; a session that used up all it had ended at the balance
            if came_back["remaining_fen"] != 0:
                raise RuntimeError(
                    f"the session ended with {came_back['remaining_fen']} fen left: not the balance"
                )
            data.update(
                state=came_back["state"],
                remaining_fen=came_back["remaining_fen"],
                energy_wh=came_back["energy_wh"],
                cost_fen=came_back["cost_fen"],
            )
            steps.data["cost1"] = came_back["cost_fen"]

        async with steps.step("phone 2 uses outlet 2 and carries the ledger") as data:
            await plant.control.set_load(2, 2000)
            started2 = await phone2.run("start", labels[2], "--readings", "3", expect="session_started")
            ended2 = await phone2.run("stop", expect="session_ended")
            await plant.control.unplug(2)
            carried = await phone2.run("visit", BOX_ID, expect="visited")
            batch = carried["batch"]
            if batch is None:
                raise RuntimeError("the box handed phone 2 no ledger entries")
            data.update(
                session=started2["session_id"][:8],
                cost_fen=ended2["cost_fen"],
                energy_wh=ended2["energy_wh"],
                verified=ended2["verified"],
                entries=f"{batch['first_sequence']}-{batch['last_sequence']}",
            )
            steps.data["cost2"] = ended2["cost_fen"]
            steps.data["last_sequence"] = batch["last_sequence"]

        async with steps.step("phone 2 syncs with the server") as data:
            synced = await phone2.run("sync", expect="synced")
            outcomes = synced["batches"]
            if not outcomes or outcomes[-1]["acked_sequence"] != steps.data["last_sequence"]:
                raise RuntimeError(f"the server did not ack the carried batch: {outcomes}")
            data.update(
                acked_sequence=outcomes[-1]["acked_sequence"], grants_settled=synced["grants_settled"]
            )

        async with steps.step("4G returns") as data:
            await _box_cli("uplink", "on", "--config", str(box.config_path))
            on_at = time.time()
            await _eventually(
                lambda: _box_seen(operator, since=on_at), "the box to reach the server over 4G again"
            )
            data["switch"] = "powerbox box uplink on"

        async with steps.step("the server reconciles") as data:
            reconciled = await operator.call("POST", "/v1/operator/reconcile")
            data.update(
                {k: reconciled[k] for k in ("entries_applied", "boxes_settled", "grants_released", "gaps")}
            )

        async with steps.step("statements, operator report, books") as data:
            for phone in phones:
                await phone.run("sync", expect="synced")
                statement = await phone.run("statement", expect="statement")
                result.statements[phone.name] = statement
                data[phone.name] = {
                    "available_fen": statement["available_fen"],
                    "sessions": len(statement["sessions"]),
                }
            expected = {"phone1": steps.data["cost1"], "phone2": steps.data["cost2"]}
            for name, cost in expected.items():
                charged = [s["cost_fen"] for s in result.statements[name]["sessions"]]
                if charged != [cost]:
                    raise RuntimeError(f"{name}'s statement charges {charged}, the box said {cost}")
            now = int(time.time())
            result.operator_report = await operator.call(
                "GET",
                "/v1/operator/reports/daily",
                params={"from_time": now - 86_400, "to_time": now + 86_400},
            )
            result.books = await operator.call("GET", "/v1/operator/books")
            if not result.books["balanced"]:
                raise RuntimeError(f"the money journal does not balance: {result.books['problems']}")
            anomalies = await operator.call("GET", "/v1/operator/anomalies")
            data.update(
                report=result.operator_report,
                books_balanced=result.books["balanced"],
                anomalies=len(anomalies),
            )

        async with steps.step("tear down"):
            await stack.aclose()
    result.total_ms = round((time.perf_counter() - began) * 1000, 1)
    return result


async def _provision_box(
    operator: _Operator, server: _Server, plant: Plant, directory: Path
) -> tuple[ProvisionedBox, dict[int, str]]:
    """The operator registers the box and its outlets; its directory gets the certificate."""
    await operator.call(
        "POST", "/v1/operator/tariffs", json={"default_price_fen_per_kwh": PRICE_FEN_PER_KWH}, expect=201
    )
    box_key = Ed25519PrivateKey.generate()
    provisioned = await operator.call(
        "POST",
        "/v1/operator/boxes",
        json={
            "box_id": BOX_ID,
            "public_key": cose.public_key_bytes(box_key.public_key()).hex(),
            "outlets": [{"number": n, "rated_power_w": 3500} for n in range(1, 5)],
            "latitude_microdeg": 31_230_416,
            "longitude_microdeg": 121_473_701,
            "tariff_region": "SH-01",
        },
        expect=201,
    )
    operator_keys = keys.load_keys(server.key_directory)
    certificate = BoxCertificate.verify(
        base64.b64decode(provisioned["certificate"]), operator_keys.verification_keys
    )
    box = write_box_directory(
        directory,
        box_key=box_key,
        certificate=certificate,
        operator=operator_keys.signer,
        operator_encryption_key=operator_keys.encryption_public_key,
        hardware={"kind": "modbus-tcp", "host": plant.endpoint.host, "port": plant.endpoint.port},
        policy=BOX_POLICY,
        uplink={"server": server.base_url, "poll_seconds": 1},
    )
    return box, {int(label["outlet"]): str(label["label"]) for label in provisioned["labels"]}


async def _box_seen(operator: _Operator, *, since: float = 0.0) -> bool:
    boxes = await operator.call("GET", "/v1/operator/boxes")
    for box in boxes:
        if box["box_id"] == BOX_ID and box["last_seen_at"] is not None:
            return bool(box["last_seen_at"] >= since)
    return False
