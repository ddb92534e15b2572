"""The plant as a real Modbus TCP server (pymodbus), speaking the maps of docs/hardware.md §2.

Each field device is a pymodbus SimDevice whose `action` hook fills its registers from the
PlantModel on every read and hands every write to it, so a reading is always the physics at
that instant. Faults are applied on the way in (`_PlantBus`): a silent or absent device raises
NoSuchIdException, which the server (started with `ignore_missing_devices`) answers with
nothing at all, as a dead RS485 device would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from pymodbus.constants import ExcCodes
from pymodbus.exceptions import NoSuchIdException
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from pymodbus.simulator.simcore import SimCore

from box_peripheral.hardware.registermap import (
    ACTIVE_IMPORT_ENERGY,
    ENERGY_WORDS,
    INSTANTANEOUS_START,
    INSTANTANEOUS_WORDS,
    METER_FUNCTION_CODE,
    RELAY_MODULE_CHANNELS,
    join_words,
)

from . import controlmap
from .client import LOOPBACK, PlantControl, PlantEndpoint
from .controlmap import CONTROL_REGISTER_COUNT, CONTROL_UNIT_ID, DeviceFault, RegisterSlot
from .model import DEFAULT_RATED_W, PlantClock, PlantError, PlantModel, scale_to_milli

logger = logging.getLogger(__name__)

READ_COILS, READ_DISCRETE_INPUTS, WRITE_COIL, WRITE_COILS = 1, 2, 5, 15
READ_HOLDING, WRITE_REGISTER, WRITE_REGISTERS = 3, 6, 16
STANDARD_EXCEPTION_CODES = frozenset(int(code) for code in ExcCodes)


def _bit_blocks() -> tuple[list[SimData], list[SimData]]:
    """Sixteen coils and sixteen discrete inputs (pymodbus packs bits by sixteen)."""
    return (
        [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
        [SimData(0, values=[False] * 16, datatype=DataType.BITS)],
    )


def _no_registers() -> list[SimData]:
    return [SimData(0, datatype=DataType.INVALID)]


def _pack_bits(bits: list[bool]) -> int:
    return sum(1 << index for index, bit in enumerate(bits) if bit)


class _PlantBus(SimCore):
    """The RS485 bus behind the TCP server: it routes by unit id like pymodbus's SimCore, but a
    unit id with no device, or a silent one, gets no answer at all, and a device in the
    `exception` fault refuses every request, whatever its address."""

    def __init__(self, model: PlantModel, devices: list[SimDevice]) -> None:
        super().__init__(devices)
        self._model = model

    def _refusal(self, device_id: int) -> ExcCodes | None:
        if device_id not in self.devices:
            raise NoSuchIdException(f"nothing on the bus at unit id {device_id}")
        fault = self._model.fault(device_id)
        if fault.kind is DeviceFault.SILENT:
            raise NoSuchIdException(f"unit {device_id} is silent (injected)")
        if fault.kind is DeviceFault.EXCEPTION:
            code = fault.exception_code
            return ExcCodes(code) if code in STANDARD_EXCEPTION_CODES else ExcCodes.DEVICE_FAILURE
        return None

    async def async_getValues(  # noqa: N802 - overrides pymodbus's name
        self, device_id: int, func_code: int, address: int, count: int = 1
    ) -> list[int] | list[bool] | ExcCodes:
        if (refusal := self._refusal(device_id)) is not None:
            return refusal
        return await super().async_getValues(device_id, func_code, address, count)

    async def async_setValues(  # noqa: N802 - overrides pymodbus's name
        self, device_id: int, func_code: int, address: int, values: list[int] | list[bool]
    ) -> ExcCodes | None:
        if (refusal := self._refusal(device_id)) is not None:
            return refusal
        return await super().async_setValues(device_id, func_code, address, values)


class _Meter:
    """An ABB B21 at unit id = outlet number."""

    def __init__(self, model: PlantModel, outlet: int) -> None:
        self._model = model
        self._outlet = outlet

    def device(self) -> SimDevice:
        coils, inputs = _bit_blocks()
        holding = [
            SimData(ACTIVE_IMPORT_ENERGY, count=ENERGY_WORDS, datatype=DataType.REGISTERS),
            SimData(INSTANTANEOUS_START, count=INSTANTANEOUS_WORDS, datatype=DataType.REGISTERS),
        ]
        return SimDevice(self._outlet, simdata=(coils, inputs, holding, _no_registers()), action=self.action)

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code != METER_FUNCTION_CODE:
            return ExcCodes.ILLEGAL_FUNCTION
        shown = self._model.meter_registers(self._outlet)
        energy_at = ACTIVE_IMPORT_ENERGY - start_address
        registers[energy_at : energy_at + ENERGY_WORDS] = shown.energy_words()
        instant_at = INSTANTANEOUS_START - start_address
        registers[instant_at : instant_at + INSTANTANEOUS_WORDS] = shown.instantaneous_words()
        return None


class _RelayModule:
    """A Waveshare Modbus RTU Relay (D): eight relays as coils, eight inputs."""

    def __init__(
        self,
        model: PlantModel,
        unit: int,
        *,
        relays: Callable[[], list[bool]],
        set_relay: Callable[[int, bool], None],
        inputs: Callable[[], list[bool]],
    ) -> None:
        self._model = model
        self._unit = unit
        self._relays = relays
        self._set_relay = set_relay
        self._inputs = inputs

    def device(self) -> SimDevice:
        coils, inputs = _bit_blocks()
        return SimDevice(
            self._unit, simdata=(coils, inputs, _no_registers(), _no_registers()), action=self.action
        )

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code in (WRITE_COIL, WRITE_COILS) and set_values is not None:
            if address + len(set_values) > RELAY_MODULE_CHANNELS:
                return ExcCodes.ILLEGAL_ADDRESS
            for offset, on in enumerate(set_values):
                self._set_relay(address + offset, bool(on))
            return None  # pymodbus stores the written bits itself
        # The bit blocks start at register 0, which holds channels 0-15.
        if function_code in (READ_COILS, WRITE_COIL, WRITE_COILS):
            registers[0] = _pack_bits(self._relays())
        elif function_code == READ_DISCRETE_INPUTS:
            registers[0] = _pack_bits(self._inputs())
        else:
            return ExcCodes.ILLEGAL_FUNCTION
        return None


class _ControlUnit:
    """The simulation-only control registers (docs/hardware.md §6.2)."""

    def __init__(self, model: PlantModel) -> None:
        self._model = model
        self._layout = controlmap.register_layout(model.outlets, model.field_units)

    def device(self) -> SimDevice:
        coils, inputs = _bit_blocks()
        holding = [SimData(0, count=CONTROL_REGISTER_COUNT, datatype=DataType.REGISTERS)]
        return SimDevice(
            CONTROL_UNIT_ID, simdata=(coils, inputs, holding, _no_registers()), action=self.action
        )

    async def action(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if function_code in (WRITE_REGISTER, WRITE_REGISTERS) and set_values is not None:
            return self._write(address, [int(value) for value in set_values])
        if function_code not in (READ_HOLDING, WRITE_REGISTER, WRITE_REGISTERS):
            return ExcCodes.ILLEGAL_FUNCTION
        for register_address, word in controlmap.encode_status(self._model.status()).items():
            index = register_address - start_address
            if 0 <= index < len(registers):
                registers[index] = word
        return None

    def _write(self, address: int, words: list[int]) -> ExcCodes | None:
        """Whole writable registers only; each is applied in address order."""
        writes: list[tuple[RegisterSlot, int]] = []
        position, end = address, address + len(words)
        while position < end:
            slot = self._layout.get(position)
            if slot is None or not slot.register.writable or position + slot.register.words > end:
                return ExcCodes.ILLEGAL_ADDRESS
            start = position - address
            writes.append((slot, join_words(words[start : start + slot.register.words])))
            position += slot.register.words
        try:
            for slot, value in writes:
                self._apply(slot, value)
        except PlantError as error:
            logger.info("control write refused: %s", error)
            return ExcCodes.ILLEGAL_VALUE
        return None

    def _apply(self, slot: RegisterSlot, value: int) -> None:
        model, index = self._model, slot.index
        match slot.register:
            case controlmap.TIME_SCALE_MILLI:
                model.set_time_scale(value)
            case controlmap.ADVANCE_MS:
                model.advance(value)
            case controlmap.BUS_SILENT:
                model.bus_silent = bool(value)
            case controlmap.METERING_DOOR_CLOSED:
                model.set_door(0, closed=bool(value))
            case controlmap.CLEAR_FAULTS:
                if value:
                    model.clear_faults()
            case controlmap.LOAD_W:
                model.set_load(index, value)
            case controlmap.DOOR_CLOSED:
                model.set_door(index, closed=bool(value))
            case controlmap.ENERGY_SETBACK_WH:
                model.set_energy_setback(index, value)
            case controlmap.FAULT_KIND:
                model.set_fault(index, value, model.fault(index).exception_code)
            case controlmap.FAULT_EXCEPTION_CODE:
                model.set_fault(index, model.fault(index).kind, value)
            case _:
                raise PlantError(f"{slot.register.name} is read-only")


def plant_devices(model: PlantModel) -> list[SimDevice]:
    """Every Modbus device of the plant: the meters, the two relay modules, the control unit."""
    wiring = model.wiring
    breakers = _RelayModule(
        model,
        wiring.breaker_module_unit_id,
        relays=model.breaker_relays,
        set_relay=model.set_breaker_relay,
        inputs=lambda: [False] * RELAY_MODULE_CHANNELS,  # unwired
    )
    doors = _RelayModule(
        model,
        wiring.door_module_unit_id,
        relays=model.door_module_relays,
        set_relay=model.set_door_module_relay,
        inputs=model.door_module_inputs,
    )
    return [
        *(_Meter(model, outlet).device() for outlet in model.outlets),
        breakers.device(),
        doors.device(),
        _ControlUnit(model).device(),
    ]


class PlantServer:
    """The Modbus TCP listener in front of a PlantModel; it can go away and come back."""

    def __init__(self, model: PlantModel, *, host: str = LOOPBACK, port: int = 0) -> None:
        self.model = model
        self._host = host
        self._port = port
        self._server: ModbusTcpServer | None = None

    @property
    def endpoint(self) -> PlantEndpoint:
        return PlantEndpoint(host=self._host, port=self._port)

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Listen (again, on the same port once one was chosen). Raises OSError if it cannot."""
        if self._server is not None:
            return
        devices = plant_devices(self.model)
        server = ModbusTcpServer(devices, address=(self._host, self._port), ignore_missing_devices=True)
        server.context = _PlantBus(self.model, devices)
        try:
            await server.serve_forever(background=True)
        except RuntimeError as error:
            raise OSError(f"the plant cannot listen on {self._host}:{self._port}") from error
        listener = server.transport
        if isinstance(listener, asyncio.Server) and listener.sockets:
            self._port = int(listener.sockets[0].getsockname()[1])
        self._server = server
        logger.info("plant listening on %s:%d", self._host, self._port)

    async def stop(self) -> None:
        """Close the listener and drop every connection: to the box, the bus is gone."""
        server, self._server = self._server, None
        if server is not None:
            # What ModbusBaseServer.shutdown() does (it is untyped): end serving, close everything.
            if not server.serving.done():
                server.serving.set_result(True)
            server.close()
            # A few turns of the loop let in-process clients see their connection drop now,
            # rather than on their next request's timeout.
            for _ in range(4):
                await asyncio.sleep(0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Plant:
    """A plant running in this process: its model (poke it directly) and a control client."""

    model: PlantModel
    server: PlantServer
    control: PlantControl

    @property
    def endpoint(self) -> PlantEndpoint:
        return self.server.endpoint

    @contextlib.asynccontextmanager
    async def offline(self) -> AsyncIterator[None]:
        """The whole bus is unreachable inside the block (connections refused), then back."""
        await self.server.stop()
        try:
            yield
        finally:
            await self.server.start()


@contextlib.asynccontextmanager
async def running_plant(
    *,
    outlets: int = 4,
    time_scale: float = 1.0,
    rated_w: int = DEFAULT_RATED_W,
    host: str = LOOPBACK,
    port: int = 0,
) -> AsyncIterator[Plant]:
    """Run a plant in this event loop on `host:port` (0: a free port) until the block ends."""
    clock = PlantClock(time_scale_milli=scale_to_milli(time_scale))
    model = PlantModel(outlets=outlets, rated_w=rated_w, clock=clock)
    server = PlantServer(model, host=host, port=port)
    await server.start()
    try:
        async with PlantControl.connect(server.endpoint, timeout_s=0.5) as control:  # loopback
            yield Plant(model=model, server=server, control=control)
    finally:
        await server.stop()
