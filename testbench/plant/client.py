"""A client for the plant's control registers: what `powerbox plant ...` and tests poke it with.

It talks Modbus TCP to CONTROL_UNIT_ID of a running plant, in this process or another. Every
failure (unreachable plant, refused poke) is a PlantControlError with a readable message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from pymodbus.client import AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ModbusPDU

from box_peripheral.hardware.registermap import split_words

from . import controlmap
from .controlmap import CONTROL_UNIT_ID, DeviceFault, PlantStatus

LOOPBACK = "127.0.0.1"

_Send = Callable[[AsyncModbusTcpClient], Awaitable[ModbusPDU]]


@dataclass(frozen=True, slots=True, kw_only=True)
class PlantEndpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class PlantControlError(RuntimeError):
    """The plant could not be reached, or refused a poke."""


@contextlib.contextmanager
def _map_exceptions(what: str, endpoint: PlantEndpoint) -> Iterator[None]:
    try:
        yield
    except PlantControlError:
        raise
    except (ModbusException, OSError) as error:  # OSError covers TimeoutError
        raise PlantControlError(f"{what}: the plant at {endpoint} did not answer ({error})") from error


class PlantControl:
    """Pokes and status for one running plant."""

    def __init__(self, endpoint: PlantEndpoint, *, timeout_s: float = 2.0) -> None:
        self.endpoint = endpoint
        self._timeout_s = timeout_s
        self._client: AsyncModbusTcpClient | None = None
        self._lock = asyncio.Lock()

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, endpoint: PlantEndpoint, *, timeout_s: float = 2.0) -> AsyncIterator[PlantControl]:
        """A connected client that is closed when the block ends."""
        control = cls(endpoint, timeout_s=timeout_s)
        try:
            await control.open()
            yield control
        finally:
            await control.close()

    async def open(self) -> None:
        """Connect and check that a powerbox plant is listening."""
        words = await self._read(controlmap.MAGIC_REGISTER.address(), 2)
        if words[0] != controlmap.MAGIC or words[1] != controlmap.MAP_VERSION:
            raise PlantControlError(
                f"{self.endpoint} is not a powerbox plant (map version {controlmap.MAP_VERSION})"
            )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    # --- reading ---

    async def status(self) -> PlantStatus:
        plant = await self._read(0, controlmap.PLANT_WORDS)
        outlet_count = plant[controlmap.OUTLET_COUNT.address()]
        units = [
            *range(1, outlet_count + 1),
            plant[controlmap.BREAKER_MODULE_UNIT.address()],
            plant[controlmap.DOOR_MODULE_UNIT.address()],
        ]
        words = dict(enumerate(plant))
        for address, count in controlmap.read_ranges(outlet_count, units)[1:]:
            words.update(zip(range(address, address + count), await self._read(address, count), strict=True))
        return controlmap.decode_status(words)

    # --- pokes ---

    async def set_load(self, outlet: int, watts: int) -> None:
        """Plug a load drawing `watts` into `outlet` (0 unplugs it)."""
        await self._write(controlmap.LOAD_W, watts, outlet)

    async def unplug(self, outlet: int) -> None:
        await self.set_load(outlet, 0)

    async def overload(self, outlet: int, percent_of_rated: int = 150) -> int:
        """Plug in a load above the outlet's rated power; returns its watts."""
        rated = (await self.status()).outlet(outlet).rated_w
        watts = rated * percent_of_rated // 100
        await self.set_load(outlet, watts)
        return watts

    async def open_door(self, outlet: int) -> None:
        """Open a door by hand; outlet 0 is the metering box."""
        await self._set_door(outlet, closed=False)

    async def close_door(self, outlet: int) -> None:
        await self._set_door(outlet, closed=True)

    async def set_time_scale(self, time_scale_milli: int) -> None:
        """1000 is real time, 60_000 makes a real second a simulated minute, 0 pauses the clock."""
        await self._write(controlmap.TIME_SCALE_MILLI, time_scale_milli)

    async def advance(self, milliseconds: int) -> None:
        """Jump the simulated clock ahead; energy flows through closed breakers meanwhile."""
        await self._write(controlmap.ADVANCE_MS, milliseconds)

    async def set_fault(self, unit: int, fault: DeviceFault, *, exception_code: int = 4) -> None:
        """Make the field device at `unit` misbehave (DeviceFault.NONE heals it)."""
        await self._write(controlmap.FAULT_EXCEPTION_CODE, exception_code, unit)
        await self._write(controlmap.FAULT_KIND, fault, unit)

    async def set_bus_silent(self, silent: bool) -> None:
        """No field device answers while the bus is silent (a cut RS485 cable)."""
        await self._write(controlmap.BUS_SILENT, int(silent))

    async def jump_energy_backwards(self, outlet: int, wh: int) -> None:
        """The outlet's energy register drops by `wh` more (rounded up to the meter's 10 Wh)."""
        setback = (await self.status()).outlet(outlet).energy_setback_wh
        await self._write(controlmap.ENERGY_SETBACK_WH, setback + wh, outlet)

    async def clear_faults(self) -> None:
        """Every device healthy, the bus answering, every energy setback gone."""
        await self._write(controlmap.CLEAR_FAULTS, 1)

    # --- internals ---

    async def _set_door(self, outlet: int, *, closed: bool) -> None:
        if outlet == 0:
            await self._write(controlmap.METERING_DOOR_CLOSED, int(closed))
        else:
            await self._write(controlmap.DOOR_CLOSED, int(closed), outlet)

    async def _write(self, register: controlmap.ControlRegister, value: int, index: int = 0) -> None:
        what = f"setting {register.name}" + (f" of {index}" if index else "")
        try:
            words = split_words(int(value), register.words)
        except (TypeError, ValueError):
            raise PlantControlError(f"{what}: {value!r} does not fit the register") from None
        address = register.address(index)
        response = await self._request(
            what, lambda client: client.write_registers(address, words, device_id=CONTROL_UNIT_ID)
        )
        if response.isError():
            reason = {
                2: "it has no such register (no such outlet or unit id?)",
                3: "it cannot take that value",
            }.get(response.exception_code, f"Modbus exception {response.exception_code}")
            raise PlantControlError(f"{what} to {value}: the plant refused: {reason}")

    async def _read(self, address: int, count: int) -> list[int]:
        what = f"reading control registers {address:#06x}+{count}"
        response = await self._request(
            what,
            lambda client: client.read_holding_registers(address, count=count, device_id=CONTROL_UNIT_ID),
        )
        if response.isError() or len(response.registers) != count:
            raise PlantControlError(f"{what}: the plant refused ({response})")
        return list(response.registers)

    async def _request(self, what: str, send: _Send) -> ModbusPDU:
        """Send, reconnecting once if the plant went away and came back."""
        with _map_exceptions(what, self.endpoint):
            async with self._lock:
                for attempt in (1, 2):
                    try:
                        async with asyncio.timeout(2 * self._timeout_s):
                            return await send(await self._connected())
                    except (ModbusException, OSError):
                        await self.close()
                        if attempt == 2:
                            raise
        raise AssertionError("unreachable")

    async def _connected(self) -> AsyncModbusTcpClient:
        if self._client is not None and self._client.connected:
            return self._client
        client = AsyncModbusTcpClient(
            self.endpoint.host,
            port=self.endpoint.port,
            name="plant-control",
            timeout=self._timeout_s,
            retries=0,
            reconnect_delay=0,
        )
        if not await client.connect():
            client.close()
            raise PlantControlError(f"cannot connect to the plant at {self.endpoint}")
        self._client = client
        return client
