"""The whole system on one machine, on embedded defaults: what `powerbox demo`, `powerbox tui` and the
end-to-end tests run.

`running_system(workdir)` brings up the virtual radio (testbench.radio), the settlement server on
SQLite in a thread of this process (uvicorn), one simulated Modbus plant per box (testbench.plant),
the boxes (`powerbox box run`, each on its own org.bluez emulator node, provisioned through the
server's operator API) and the phones (the `powerbox phone --json` CLI, each on its own node with
its own wallet). Everything is torn down when the block ends, boxes and phones first.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
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
from testbench.plant import PlantProcess, plant_process
from testbench.radio.process import RadioProcess
from testbench.server_thread import ServerThread
from testbench.testbed import BleTestbed, ControllerPool

OPERATOR_USERNAME = "operator"
DEFAULT_BOX_IDS = ("BOX-DEMO-1",)
DEFAULT_PHONES = 2
OUTLETS_PER_BOX = 4
RATED_POWER_W = 3500
PRICE_FEN_PER_KWH = 120
# a real second is a simulated minute at the meters, so a short session costs real money
PLANT_TIME_SCALE = 60.0
BOX_POLICY: dict[str, Any] = {"idle_timeout_s": 120, "poll_interval_ms": 250}
SPARE_CONTROLLERS = 1
COMMAND_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 30.0
# Shanghai, where the demo boxes stand (nearby search needs a place)
LATITUDE_MICRODEG = 31_230_416
LONGITUDE_MICRODEG = 121_473_701


def phone_number(n: int) -> str:
    """The made-up mobile number of phone `n` (1-based)."""
    return f"+86139000000{n:02d}"


# --- the settlement server ---------------------------------------------------------------------


class RunningServer:
    """The settlement server of the system: SQLite in its directory, served on a loopback port.

    `restart()` stops it and serves the same database and keys again on the same port, as an
    operator restarting the service would."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key_directory = directory / "keys"
        self.sms = DevSmsProvider()
        self.operator_password = secrets.token_urlsafe(16)  # made up: the server lives as long as the system
        self.config = ServerConfig(
            database_url=f"sqlite+aiosqlite:///{directory / 'server.db'}",
            key_directory=self.key_directory,
            long_poll_interval_ms=100,
            verify_threads=2,
            verify_processes=0,
        )
        self._thread: ServerThread | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def init(self) -> None:
        """`powerbox server init`: keys, the migrated database, the first operator."""
        await asyncio.to_thread(keys.create_keys, self.key_directory)
        async with open_context(self.config) as context:
            await create_staff(
                context, username=OPERATOR_USERNAME, password=self.operator_password, role=Role.OPERATOR
            )

    async def start(self) -> None:
        thread = ServerThread(create_app(self.config, sms=self.sms), port=self.port)
        await asyncio.to_thread(thread.start)
        self._thread = thread
        self.port = thread.port

    async def stop(self) -> None:
        if self._thread is not None:
            thread, self._thread = self._thread, None
            await asyncio.to_thread(thread.stop)

    async def restart(self) -> None:
        await self.stop()
        await self.start()


class OperatorConsole:
    """The operator's console: the server's operator API over HTTP, on one kept-alive client (a
    server restart keeps its port, so the client survives it)."""

    def __init__(self, server: RunningServer) -> None:
        self._server = server
        self._token: str | None = None
        self._client = httpx.AsyncClient(base_url=server.base_url, timeout=60)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(
        self, method: str, path: str, *, json: Any = None, params: Any = None, expect: int = 200
    ) -> Any:
        response = await self._send(method, path, json=json, params=params)
        if response.status_code == 401:  # the token expired (after 15 minutes): log in again, once
            self._token = None
            response = await self._send(method, path, json=json, params=params)
        if response.status_code != expect:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else None

    async def _send(self, method: str, path: str, *, json: Any, params: Any) -> httpx.Response:
        if self._token is None:
            login = await self._client.post(
                "/v1/auth/staff/token",
                json={"username": OPERATOR_USERNAME, "password": self._server.operator_password},
            )
            login.raise_for_status()
            self._token = str(login.json()["access_token"])
        return await self._client.request(
            method, path, json=json, params=params, headers={"Authorization": f"Bearer {self._token}"}
        )

    async def box(self, box_id: str) -> dict[str, Any]:
        for box in await self.call("GET", "/v1/operator/boxes"):
            if box["box_id"] == box_id:
                return dict(box)
        raise RuntimeError(f"the server does not know {box_id}")

    async def box_seen(self, box_id: str, *, since: float = 0.0) -> bool:
        """Whether the box reached the server over its uplink at or after `since` (Unix time)."""
        seen = (await self.box(box_id))["last_seen_at"]
        return seen is not None and bool(seen >= since)


# --- the phones ---------------------------------------------------------------------------------


class PhoneCli:
    """`python -m powerbox_cli phone --wallet W --server S --json ...` on the phone's own node."""

    def __init__(
        self, name: str, number: str, testbed: BleTestbed, node: BleNode, wallet: Path, server: RunningServer
    ) -> None:
        self.name = name
        self.number = number
        self.testbed = testbed
        self.node = node
        self.wallet = wallet
        self._server = server

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "powerbox_cli", "phone",
            "--wallet", str(self.wallet), "--server", self._server.base_url, "--json", *args,
        ]  # fmt: skip

    async def spawn(self, *args: str) -> AppProcess:
        return await self.testbed.spawn(self.node, self.argv(*args), name=self.name)

    async def finish(
        self, process: AppProcess, args: Sequence[str], expect: str | Sequence[str]
    ) -> dict[str, Any]:
        """The command's first `expect` event (one name, or any of several), after it exits 0; its
        error otherwise."""
        wanted = (expect,) if isinstance(expect, str) else tuple(expect)
        event = await process.wait_for(
            lambda m: m.get("event") in (*wanted, "error"),
            within=COMMAND_TIMEOUT_S,
            what=f"{' or '.join(wanted)} or an error from `phone {' '.join(args)}`",
        )
        status = await process.wait(within=COMMAND_TIMEOUT_S)
        if event.get("event") not in wanted:
            raise PhoneCommandError(self.name, args, event)
        if status.returncode != 0:
            raise RuntimeError(f"{self.name}: `phone {' '.join(args)}` exited {status.returncode}")
        return dict(event)

    async def run(self, *args: str, expect: str | Sequence[str]) -> dict[str, Any]:
        return await self.finish(await self.spawn(*args), args, expect)

    async def spawn_until(self, *args: str, first: str) -> tuple[AppProcess, dict[str, Any]]:
        """A command that keeps running (`start`, `watch`): the process and its `first` event;
        PhoneCommandError, once it exited, if it answered with an error."""
        process = await self.spawn(*args)
        event = await process.wait_for(
            lambda m: m.get("event") in (first, "error"),
            within=COMMAND_TIMEOUT_S,
            what=f"{first} or an error from `phone {' '.join(args)}`",
        )
        if event["event"] != first:
            await process.wait(within=COMMAND_TIMEOUT_S)
            raise PhoneCommandError(self.name, args, event)
        return process, dict(event)

    async def sign_up(self, server: RunningServer, *, deposit_yuan: str) -> dict[str, Any]:
        """Register as a shared user with the texted code, log in and deposit: the login event with
        `available_fen` after the deposit."""
        await self.run("register", "shared", self.number, expect="code_sent")
        code = server.sms.last_code(self.number)
        if code is None:
            raise RuntimeError(f"no code texted to {self.number}")
        logged_in = await self.run("login", "shared", self.number, "--code", code, expect="logged_in")
        deposited = await self.run("deposit", deposit_yuan, expect="deposited")
        return {**logged_in, "available_fen": deposited["available_fen"]}


class PhoneCommandError(RuntimeError):
    """A phone command answered with an error event; `event` holds its code and origin."""

    def __init__(self, phone: str, args: Sequence[str], event: dict[str, Any]) -> None:
        super().__init__(
            f"{phone}: `phone {' '.join(args)}` failed: {event.get('explanation') or event.get('message')}"
            f" [{event.get('code')} {event.get('name')}, origin {event.get('origin')}]"
        )
        self.event = event


# --- the boxes ----------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class RunningBox:
    """One box daemon on its node, its plant and where it was provisioned."""

    box_id: str
    provisioned: ProvisionedBox
    labels: dict[int, str]
    plant: PlantProcess  # a child process: the event loop of the caller (a TUI) cannot stall it
    node: BleNode
    testbed: BleTestbed
    process: AppProcess | None = None  # the daemon, while it runs

    @property
    def config_path(self) -> Path:
        return self.provisioned.config_path

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "powerbox_cli", "box", "run", "--config", str(self.config_path)]

    async def start(self) -> None:
        self.process = await self.testbed.spawn(self.node, self.argv(), name=self.box_id)
        await self.process.wait_event("ready", within=COMMAND_TIMEOUT_S)

    async def kill(self) -> None:
        """Power cut: the daemon and its node die at once (the plant keeps its state)."""
        if self.process is not None:
            process, self.process = self.process, None
            process.kill()
            await process.wait(within=COMMAND_TIMEOUT_S)
        await self.testbed.kill_node(self.node)

    async def restart(self) -> None:
        """Power back: a new node on the same controller, the daemon on the same directory."""
        self.node = await self.testbed.restart_node(self.node, name=self.box_id)
        await self.start()

    async def cli(self, *args: str) -> str:
        """`powerbox box ARGS --config C` on the box (no radio needed); its output."""
        return await box_cli(*args, "--config", str(self.config_path))

    async def uplink(self, on: bool) -> None:
        """Switch the box's 4G uplink (`powerbox box uplink on|off`)."""
        await self.cli("uplink", "on" if on else "off")


async def box_cli(*args: str) -> str:
    """`powerbox box ...` as a process; its output, or RuntimeError with it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "powerbox_cli", "box", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), COMMAND_TIMEOUT_S)
    if process.returncode != 0:
        raise RuntimeError(f"`powerbox box {' '.join(args)}` exited {process.returncode}: {output.decode()}")
    return output.decode()


async def provision_box(
    operator: OperatorConsole,
    server: RunningServer,
    plant: PlantProcess,
    directory: Path,
    *,
    box_id: str,
    policy: dict[str, Any] | None = None,
) -> tuple[ProvisionedBox, dict[int, str]]:
    """The operator registers the box and its outlets; its directory gets the certificate."""
    box_key = Ed25519PrivateKey.generate()
    provisioned = await operator.call(
        "POST",
        "/v1/operator/boxes",
        json={
            "box_id": box_id,
            "public_key": cose.public_key_bytes(box_key.public_key()).hex(),
            "outlets": [{"number": n, "rated_power_w": RATED_POWER_W} for n in range(1, OUTLETS_PER_BOX + 1)],
            "latitude_microdeg": LATITUDE_MICRODEG,
            "longitude_microdeg": LONGITUDE_MICRODEG,
            "tariff_region": "SH-01",
        },
        expect=201,
    )
    operator_keys = await asyncio.to_thread(keys.load_keys, server.key_directory)
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
        policy=BOX_POLICY if policy is None else policy,
        uplink={"server": server.base_url, "poll_seconds": 1},
    )
    return box, {int(label["outlet"]): str(label["label"]) for label in provisioned["labels"]}


# --- the system -----------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class RunningSystem:
    workdir: Path
    server: RunningServer
    operator: OperatorConsole
    testbed: BleTestbed
    boxes: list[RunningBox]
    phones: list[PhoneCli]

    def box(self, box_id: str | None = None) -> RunningBox:
        for box in self.boxes:
            if box_id is None or box.box_id == box_id:
                return box
        raise KeyError(box_id)


async def eventually(check: Callable[[], Any], what: str, *, timeout_s: float | None = None) -> Any:
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


@contextlib.contextmanager
def _radio(directory: Path, controllers: int) -> Iterator[ControllerPool]:
    directory.mkdir(parents=True, exist_ok=True)
    with RadioProcess.start(controllers=controllers, log_path=directory / "radio.log") as radio:
        yield ControllerPool(radio.endpoints)


@contextlib.asynccontextmanager
async def running_system(
    workdir: Path,
    *,
    box_ids: Sequence[str] = DEFAULT_BOX_IDS,
    phones: int = DEFAULT_PHONES,
    box_policy: dict[str, Any] | None = None,
    plant_time_scale: float = PLANT_TIME_SCALE,
    uplink_on: bool = True,
) -> AsyncIterator[RunningSystem]:
    """Everything up in `workdir` (radio, server, plants, boxes, phones); torn down on leaving.

    The server gets a default tariff first, so every box sells at a signed price from the start.
    With `uplink_on`, waits until every box has reached the server over 4G once; without, every box
    starts with its 4G switched off and has never talked to the server."""
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        pool = stack.enter_context(_radio(workdir / "radio", len(box_ids) + phones + SPARE_CONTROLLERS))
        server = RunningServer(workdir / "server")
        await server.init()
        await server.start()
        stack.push_async_callback(server.stop)
        operator = OperatorConsole(server)
        stack.push_async_callback(operator.aclose)
        await operator.call(
            "POST", "/v1/operator/tariffs", json={"default_price_fen_per_kwh": PRICE_FEN_PER_KWH}, expect=201
        )
        plants = [
            await stack.enter_async_context(
                plant_process(
                    outlets=OUTLETS_PER_BOX,
                    time_scale=plant_time_scale,
                    log_path=workdir / f"plant-{box_id}.log",
                )
            )
            for box_id in box_ids
        ]
        # closed first: the boxes and the phones go before the plants, the server and the radio
        testbed = BleTestbed(pool, log_dir=workdir / "logs")
        stack.push_async_callback(testbed.aclose)
        boxes = []
        for box_id, plant in zip(box_ids, plants, strict=True):
            provisioned, labels = await provision_box(
                operator, server, plant, workdir / box_id, box_id=box_id, policy=box_policy
            )
            node = await testbed.start_node(name=box_id)
            box = RunningBox(
                box_id=box_id, provisioned=provisioned, labels=labels, plant=plant, node=node, testbed=testbed
            )
            if not uplink_on:
                await box.uplink(False)
            await box.start()
            boxes.append(box)
        phone_clis = []
        for n in range(1, phones + 1):
            directory = workdir / f"phone{n}"
            await asyncio.to_thread(directory.mkdir, exist_ok=True)
            node = await testbed.start_node(name=f"phone{n}")
            phone_clis.append(
                PhoneCli(f"phone{n}", phone_number(n), testbed, node, directory / "wallet.sqlite", server)
            )
        if uplink_on:
            for box in boxes:
                await _first_contact(operator, box.box_id)
        yield RunningSystem(
            workdir=workdir, server=server, operator=operator, testbed=testbed, boxes=boxes, phones=phone_clis
        )


async def _first_contact(operator: OperatorConsole, box_id: str) -> None:
    async def seen() -> bool:
        return await operator.box_seen(box_id)

    await eventually(seen, f"{box_id}'s first contact over 4G")
