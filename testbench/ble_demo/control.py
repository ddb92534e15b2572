"""Drive the demo box and the demo phone from a test or a benchmark."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from testbench._process import python_module_argv
from testbench.app_process import AppProcess, Message
from testbench.ble_demo.profile import SERVICE_UUID

DEFAULT_TIMEOUT = 20.0


def box_argv(name: str, *, adapter: str = "hci0", quiet: bool = False) -> list[str]:
    return python_module_argv(
        "testbench.ble_demo.box", "--name", name, "--adapter", adapter, *(["--quiet"] if quiet else [])
    )


def phone_argv(*, adapter: str = "hci0") -> list[str]:
    return python_module_argv("testbench.ble_demo.phone", "--adapter", adapter)


@dataclass(frozen=True, slots=True, kw_only=True)
class PhoneFailure:
    """Why a phone command failed, as bleak reported it."""

    type: str
    message: str
    att_code: int | None = None
    dbus_error: str | None = None


class PhoneCommandError(RuntimeError):
    def __init__(self, command: str, failure: PhoneFailure) -> None:
        super().__init__(f"{command}: {failure.type}: {failure.message}")
        self.failure = failure


@dataclass(frozen=True, slots=True, kw_only=True)
class ScanResult:
    address: str
    name: str | None
    elapsed_ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectResult:
    elapsed_ms: float
    mtu: int
    max_write_without_response_size: int | None
    services: tuple[str, ...]


class DemoBoxProcess:
    """A running demo box (bless)."""

    def __init__(self, process: AppProcess, ready: Message) -> None:
        self.process = process
        self.ready = ready

    @classmethod
    async def attach(cls, process: AppProcess, *, within: float = DEFAULT_TIMEOUT) -> DemoBoxProcess:
        return cls(process, await process.wait_event("ready", within=within))

    async def status(self, *, within: float = DEFAULT_TIMEOUT) -> Message:
        self.process.send({"cmd": "status"})
        return await self.process.wait_event("status", within=within)

    async def notify(self, data: bytes, *, within: float = DEFAULT_TIMEOUT) -> None:
        self.process.send({"cmd": "notify", "data": data.hex()})
        await self.process.wait_event("notified", within=within)

    async def next_write(self, *, within: float = DEFAULT_TIMEOUT, **fields: Any) -> Message:
        return await self.process.wait_event("write", within=within, **fields)


class DemoPhoneProcess:
    """A running demo phone (bleak)."""

    def __init__(self, process: AppProcess) -> None:
        self.process = process

    @classmethod
    async def attach(cls, process: AppProcess, *, within: float = DEFAULT_TIMEOUT) -> DemoPhoneProcess:
        await process.wait_event("ready", within=within)
        return cls(process)

    async def _call(self, command: str, *, wait: float = DEFAULT_TIMEOUT, **arguments: Any) -> Message:
        """Run a phone command; ``wait`` bounds the local wait (longer than the phone's own timeouts)."""
        reply = await self.process.request(command, arguments, within=wait)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise PhoneCommandError(
                command,
                PhoneFailure(
                    type=str(error.get("type", "?")),
                    message=str(error.get("message", "")),
                    att_code=error.get("att_code"),
                    dbus_error=error.get("dbus_error"),
                ),
            )
        return reply

    async def scan(self, name: str, *, service: str = SERVICE_UUID, timeout_s: float = 10.0) -> ScanResult:
        reply = await self._call("scan", wait=timeout_s + 10, name=name, service=service, timeout_s=timeout_s)
        return ScanResult(address=reply["address"], name=reply.get("name"), elapsed_ms=reply["elapsed_ms"])

    async def connect(self, *, timeout_s: float = 10.0) -> ConnectResult:
        reply = await self._call("connect", wait=timeout_s + 10, timeout_s=timeout_s)
        return ConnectResult(
            elapsed_ms=reply["elapsed_ms"],
            mtu=reply["mtu"],
            max_write_without_response_size=reply.get("max_write_without_response_size"),
            services=tuple(reply["services"]),
        )

    async def subscribe(self) -> None:
        await self._call("subscribe")

    async def unsubscribe(self) -> None:
        await self._call("unsubscribe")

    async def read(self, characteristic: str) -> bytes:
        return bytes.fromhex((await self._call("read", characteristic=characteristic))["data"])

    async def write(self, characteristic: str, data: bytes, *, response: bool = True) -> None:
        await self._call("write", characteristic=characteristic, data=data.hex(), response=response)

    async def exchange(
        self,
        data: bytes,
        *,
        characteristic: str = "echo",
        response: bool = True,
        count: int = 1,
        timeout_s: float = 5.0,
    ) -> list[float]:
        """Write ``data``, wait for its echo (``count`` times); round-trip times in milliseconds."""
        reply = await self._call(
            "exchange",
            wait=timeout_s * count + 10,
            data=data.hex(),
            characteristic=characteristic,
            response=response,
            count=count,
            timeout_s=timeout_s,
        )
        return [float(value) for value in reply["round_trips_ms"]]

    async def disconnect(self) -> None:
        await self._call("disconnect")

    async def is_connected(self) -> bool:
        return bool((await self._call("status"))["connected"])

    async def next_notification(self, *, within: float = DEFAULT_TIMEOUT) -> bytes:
        return bytes.fromhex((await self.process.wait_event("notification", within=within))["data"])

    async def wait_disconnected(self, *, within: float = DEFAULT_TIMEOUT) -> float:
        """Wait for bleak's disconnected callback; returns its time.monotonic()."""
        return float((await self.process.wait_event("disconnected", within=within))["t"])
